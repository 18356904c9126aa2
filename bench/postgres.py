"""PostgreSQL: end-to-end throughput, and runner processes that share a backlog.

The benchmark runs on the PostgreSQL server whose admin URL is in
``TASKMILL_BENCH_POSTGRES_URL`` (by default the local server as user
``postgres``). Each variant gets a database of its own, named
``taskmill_bench_<pid>_<n>``, migrated with ``Database.upgrade()`` and dropped
``WITH (FORCE)`` afterwards. When the server cannot be reached, the benchmark
prints one line to stderr and returns no figures, unless the environment
variable ``CI`` is set: then it raises RuntimeError.

Throughput is measured as bench/throughput.py measures it on SQLite. One
manager with ``max_workers=4`` and default intervals runs ``NoOp`` tasks with
0, 10 or 1,000 ``set_progress()`` calls, which one producer creates with
``TaskManager.create()`` in the same process. The clock runs from before the
first ``create()`` until the manager tracks no unfinished task. The no-op
variant also runs on a SQLite file in the same ``measure()`` call, so that
the ratio of the two compares figures taken under the same load.

Scaling stores a backlog of ``Sleep`` tasks, each of which waits 50 ms in
``self.sleep()``, through a manager with ``max_workers=0``. It then starts 1,
2 or 4 runner processes (bench/postgres_runner.py), each with
``max_workers=8`` and ``poll_interval=0.2``. Once every runner has printed
``ready``, the benchmark sends ``go`` to all of them, which start their
managers, and times until every task is FINISHED, read from the database
every 10 ms. The time that the processes take to be ready is a figure of its
own. Ideally each runner finishes 8 / 0.05 s = 160 tasks per second. Each
runner also counts, from ``go`` until it is stopped, the transactions that its
manager commits (reads included) and the CPU time of its process, which show
where the time went.

After each variant the benchmark checks that every task is FINISHED with its
three history rows (created, claimed, finished).
"""

from __future__ import annotations

import itertools
import os
import select as select_module
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from sqlalchemy import URL, Table, create_engine, func, make_url, select, text
from sqlalchemy.exc import SQLAlchemyError

from bench.common import Benchmark, Figures, Sizes, tail
from bench.postgres_runner import GO, READY, RUNNER_WORKERS, STATS_PREFIX, Sleep
from bench.tasks import NoOp
from bench.throughput import WORKERS
from taskmill import Database, TaskManager, TaskStatus
from taskmill.models import BackgroundTaskModel, TaskEventModel

#: The environment variable with the SQLAlchemy URL of a database on the server
#: that may create and drop databases.
ADMIN_URL_VARIABLE = "TASKMILL_BENCH_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
#: Set (CI sets it) to fail, not skip, when the server cannot be reached.
REQUIRE_VARIABLE = "CI"
RUNNER_SCRIPT = Path(__file__).resolve().with_name("postgres_runner.py")
#: How many runner processes each scaling variant starts.
RUNNER_COUNTS = (1, 2, 4)
#: Seconds that each ``Sleep`` task waits.
SLEEP_SECONDS = 0.05
#: Seconds that connecting to the server may take before it counts as unreachable.
CONNECT_TIMEOUT = 5
#: Maximum time in seconds that one variant may take before it raises TimeoutError.
VARIANT_TIMEOUT = 300.0
#: Maximum time in seconds that the runner processes may take to print ``ready``.
RUNNER_START_TIMEOUT = 60.0
#: Seconds between two checks whether the last task of a throughput variant has
#: finished, as in bench/throughput.py.
IDLE_POLL = 0.005
#: Seconds between two counts of FINISHED tasks while runner processes work.
FINISHED_POLL = 0.01

_tasks = cast(Table, BackgroundTaskModel.__table__)
_events = cast(Table, TaskEventModel.__table__)
#: Numbers the databases that this process creates.
_database_numbers = itertools.count(1)
#: Whether the reason for skipping was printed: repeats print it only once.
_skip_reported = False


def measure(sizes: Sizes) -> Figures:
    server = _open_server()
    if server is None:
        return {}
    try:
        figures = _throughput(server, sizes["tasks"])
        figures |= _scaling(server, sizes["scaling_tasks"])
    finally:
        server.dispose()
    return figures


# -- the server --


class PostgresServer:
    """An admin connection that creates a migrated database per variant."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self.admin = create_engine(
            self.url,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": CONNECT_TIMEOUT},
        )

    def check(self) -> None:
        with self.admin.connect() as connection:
            connection.execute(text("SELECT 1"))

    @contextmanager
    def fresh_database(self) -> Iterator[str]:
        """Create and migrate a database; yield its URL, and drop it afterwards."""
        name = f"taskmill_bench_{os.getpid()}_{next(_database_numbers)}"
        self._execute(f"CREATE DATABASE {name}")
        try:
            url = self.url.set(database=name).render_as_string(hide_password=False)
            database = Database(url)
            try:
                database.upgrade()
            finally:
                database.dispose()
            yield url
        finally:
            # FORCE: a runner process that had to be killed may leave connections.
            self._execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def dispose(self) -> None:
        self.admin.dispose()

    def _execute(self, statement: str) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(statement))


def _open_server() -> PostgresServer | None:
    """Return the server to measure on, or None (after one line) if it is unreachable.

    Raises RuntimeError instead when ``CI`` is set.
    """
    global _skip_reported
    # An invalid URL raises here, whether CI is set or not.
    url = make_url(os.environ.get(ADMIN_URL_VARIABLE, DEFAULT_ADMIN_URL))
    try:
        server = PostgresServer(url)
        server.check()
    except (ImportError, SQLAlchemyError) as exc:
        # ImportError: psycopg is missing (pip install 'taskmill[postgres]').
        # A DBAPIError's own text wraps the driver's message in SQLAlchemy's.
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        display_url = url.render_as_string(hide_password=True)
        problem = (
            f"PostgreSQL is not reachable at {display_url} ({reason}); set "
            f"{ADMIN_URL_VARIABLE} to the SQLAlchemy URL of a server to measure on"
        )
        if os.environ.get(REQUIRE_VARIABLE):
            raise RuntimeError(
                f"{problem}. {REQUIRE_VARIABLE} is set, so the benchmark fails "
                "instead of skipping."
            ) from exc
        if not _skip_reported:
            print(f"postgres: skipped: {problem}", file=sys.stderr, flush=True)
            _skip_reported = True
        return None
    return server


# -- throughput --


def _throughput(server: PostgresServer, tasks: int) -> Figures:
    figures: Figures = {}
    with server.fresh_database() as url:
        figures["pg_noop_tasks_per_s"] = _run_to_finished(url, tasks, 0)
    # Right after the PostgreSQL figure, so that both see about the same load.
    with tempfile.TemporaryDirectory(prefix="taskmill-bench-postgres-") as directory:
        figures["sqlite_noop_tasks_per_s_same_run"] = _run_to_finished(
            f"sqlite:///{directory}/noop.db", tasks, 0
        )
    for reports, key in (
        (10, "pg_progress10_tasks_per_s"),
        (1000, "pg_progress1000_tasks_per_s"),
    ):
        with server.fresh_database() as url:
            figures[key] = _run_to_finished(url, tasks, reports)
    figures["pg_to_sqlite_noop_ratio"] = (
        figures["pg_noop_tasks_per_s"] / figures["sqlite_noop_tasks_per_s_same_run"]
    )
    return figures


def _run_to_finished(url: str, tasks: int, reports: int) -> float:
    """Create ``tasks`` NoOp tasks and run them in this process; return tasks per second."""
    manager = TaskManager(url, max_workers=WORKERS)
    manager.register(NoOp)
    manager.startup()
    try:
        started = time.perf_counter()
        for _ in range(tasks):
            manager.create(NoOp.name, {"reports": reports})
        _wait_until_idle(manager)
        elapsed = time.perf_counter() - started
    finally:
        manager.shutdown()
    _check_all_finished(url, tasks)
    return tasks / elapsed


def _wait_until_idle(manager: TaskManager) -> None:
    """Return once the manager has committed the final status of every task."""
    deadline = time.monotonic() + VARIANT_TIMEOUT
    while manager.live_task_ids():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(manager.live_task_ids())} tasks are still unfinished after "
                f"{VARIANT_TIMEOUT} s."
            )
        time.sleep(IDLE_POLL)


# -- scaling over runner processes --


@dataclass(frozen=True)
class BacklogRun:
    """The measurements of one scaling variant."""

    tasks_per_s: float
    #: From the start of the runner processes until the last one printed ``ready``.
    start_s: float
    #: Transactions that the runners' managers committed, reads included.
    transactions: int
    #: CPU time of the runner processes, user and system, from ``go`` until the stop.
    cpu_s: float


def _scaling(server: PostgresServer, tasks: int) -> Figures:
    figures: Figures = {}
    with tempfile.TemporaryDirectory(prefix="taskmill-bench-postgres-") as directory:
        for runners in RUNNER_COUNTS:
            with server.fresh_database() as url:
                _store_backlog(url, tasks)
                run = _run_backlog(url, tasks, runners, Path(directory))
            prefix = f"pg_scaling_{runners}_runners"
            figures[f"{prefix}_tasks_per_s"] = run.tasks_per_s
            figures[f"{prefix}_start_s"] = run.start_s
            figures[f"{prefix}_transactions_per_task"] = run.transactions / tasks
            figures[f"{prefix}_cpu_ms_per_task"] = run.cpu_s * 1000 / tasks
    figures["pg_scaling_4_vs_1_ratio"] = (
        figures["pg_scaling_4_runners_tasks_per_s"]
        / figures["pg_scaling_1_runners_tasks_per_s"]
    )
    return figures


def _store_backlog(url: str, tasks: int) -> None:
    """Store ``tasks`` PENDING Sleep tasks through a manager that runs none."""
    manager = TaskManager(url, max_workers=0)
    manager.register(Sleep)
    manager.startup()
    try:
        for _ in range(tasks):
            manager.create(Sleep.name, {"seconds": SLEEP_SECONDS})
    finally:
        manager.shutdown()


def _run_backlog(url: str, tasks: int, runners: int, directory: Path) -> BacklogRun:
    """Run the backlog on ``runners`` runner processes.

    The tasks per second count from the moment the runners receive ``go``.
    """
    logs = [directory / f"runner-{runners}-{index}.log" for index in range(runners)]
    database = Database(url)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # Connect before the clock starts; this also shows that nothing ran yet.
        _count_finished(database)
        spawned = time.perf_counter()
        for log_path in logs:
            with log_path.open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, str(RUNNER_SCRIPT), url],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log,
                    )
                )
        for process, log_path in zip(processes, logs, strict=True):
            _wait_until_ready(process, spawned + RUNNER_START_TIMEOUT, log_path)
        start_seconds = time.perf_counter() - spawned
        started = time.perf_counter()
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(GO)
            process.stdin.flush()
        _wait_until_finished(database, tasks, processes, logs)
        elapsed = time.perf_counter() - started
    finally:
        outputs = _stop_runners(processes)
        database.dispose()
    transactions = 0
    cpu_seconds = 0.0
    for process, output, log_path in zip(processes, outputs, logs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(
                f"A runner process exited with code {process.returncode} when it "
                f"was stopped; its log is {log_path}:\n{tail(log_path)}"
            )
        process_transactions, process_cpu_seconds = _parse_stats(output, log_path)
        transactions += process_transactions
        cpu_seconds += process_cpu_seconds
    _check_all_finished(url, tasks)
    return BacklogRun(
        tasks_per_s=tasks / elapsed,
        start_s=start_seconds,
        transactions=transactions,
        cpu_s=cpu_seconds,
    )


def _wait_until_ready(
    process: subprocess.Popen[bytes], deadline: float, log_path: Path
) -> None:
    assert process.stdout is not None
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError(
                f"A runner process did not print 'ready' within "
                f"{RUNNER_START_TIMEOUT} s; its log is {log_path}:\n{tail(log_path)}"
            )
        readable, _, _ = select_module.select([process.stdout], [], [], remaining)
        if not readable:
            continue
        line = process.stdout.readline()
        if line == READY:
            return
        if not line:
            process.wait(timeout=5)
            raise RuntimeError(
                f"A runner process exited with code {process.returncode} before "
                f"it was ready; its log is {log_path}:\n{tail(log_path)}"
            )


def _wait_until_finished(
    database: Database,
    tasks: int,
    processes: Sequence[subprocess.Popen[bytes]],
    logs: Sequence[Path],
) -> None:
    """Return once ``tasks`` tasks are FINISHED, read from the database."""
    deadline = time.monotonic() + VARIANT_TIMEOUT
    while (finished := _count_finished(database)) < tasks:
        for process, log_path in zip(processes, logs, strict=True):
            if process.poll() is not None:
                raise RuntimeError(
                    f"A runner process exited with code {process.returncode} with "
                    f"{tasks - finished} tasks unfinished; its log is "
                    f"{log_path}:\n{tail(log_path)}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Only {finished} of {tasks} tasks are FINISHED after "
                f"{VARIANT_TIMEOUT} s."
            )
        time.sleep(FINISHED_POLL)


def _count_finished(database: Database) -> int:
    statement = (
        select(func.count())
        .select_from(_tasks)
        .where(_tasks.c.status == TaskStatus.FINISHED)
    )
    with database.read() as session:
        return int(session.execute(statement).scalar_one())


def _stop_runners(processes: Sequence[subprocess.Popen[bytes]]) -> list[bytes]:
    """Send SIGTERM to every runner, then wait for each; kill one that hangs.

    Returns what each runner printed after ``ready``.
    """
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    outputs = []
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        # The process has exited, so this read ends at the end of the pipe.
        outputs.append(process.stdout.read())
        process.stdout.close()
    return outputs


def _parse_stats(output: bytes, log_path: Path) -> tuple[int, float]:
    """Return the committed transactions and CPU seconds of a runner's ``stats`` line."""
    for line in output.splitlines():
        if line.startswith(STATS_PREFIX):
            transactions, cpu_seconds = line.removeprefix(STATS_PREFIX).split()
            return int(transactions), float(cpu_seconds)
    raise RuntimeError(
        f"A runner process printed no stats line when it stopped (output: "
        f"{output!r}); its log is {log_path}:\n{tail(log_path)}"
    )


# -- checks --


def _check_all_finished(url: str, tasks: int) -> None:
    """Raise unless the database contains ``tasks`` FINISHED tasks with 3 history rows each."""
    database = Database(url)
    try:
        with database.read() as session:
            rows = session.execute(
                select(_tasks.c.status, func.count()).group_by(_tasks.c.status)
            )
            statuses = {str(status): int(count) for status, count in rows}
            events = int(
                session.execute(select(func.count()).select_from(_events)).scalar_one()
            )
    finally:
        database.dispose()
    display_url = make_url(url).render_as_string(hide_password=True)
    if statuses != {TaskStatus.FINISHED.value: tasks}:
        raise RuntimeError(
            f"Expected {tasks} FINISHED tasks in {display_url}, found {statuses}."
        )
    if events != 3 * tasks:
        raise RuntimeError(
            f"Expected {3 * tasks} history rows in {display_url} (created, claimed, "
            f"finished), found {events}."
        )


BENCHMARK = Benchmark(
    name="postgres",
    description=(
        "throughput to FINISHED on PostgreSQL beside SQLite, and 1, 2 and 4 "
        f"runner processes of {RUNNER_WORKERS} workers on a backlog of 50 ms tasks"
    ),
    sizes={"tasks": 400, "scaling_tasks": 640},
    quick_sizes={"tasks": 30, "scaling_tasks": 32},
    measure=measure,
)
