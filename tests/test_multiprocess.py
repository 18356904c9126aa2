"""Several processes run the tasks of one database.

Servers here are ``uvicorn --workers N``: N processes behind one socket, each
with its own TaskManager. Runners are ``python -m tests.runner_process``. The
tests read the database itself for their checks: claim events, leases and
owners, and the ledger that every step writes in its checkpoint's transaction.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, make_url, select
from sqlalchemy.exc import OperationalError

from taskmill import Database, TaskManager, TaskStatus
from taskmill.models import BackgroundTaskModel as Task
from taskmill.models import TaskEventModel as Event
from tests.conftest import ROOT, eventually, free_port
from tests.runner_process import BackoffStepTask, RunnerProcess
from tests.tasks import StepTask, create_ledger, ledger, ledger_steps

pytestmark = pytest.mark.e2e

UNFINISHED = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.PAUSED)


class WorkersServer:
    """``uvicorn tests.app:create_app --factory --workers N`` in its own session."""

    def __init__(
        self, database_url: str, log_path: Path, workers: int, env: dict[str, str]
    ) -> None:
        self.database_url = database_url
        self.log_path = log_path
        self.workers = workers
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, **self.env, "TASKMILL_DATABASE_URL": self.database_url}
        command = [
            sys.executable, "-m", "uvicorn", "tests.app:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        # Each worker's manager logs "Task manager <id> started" once it runs.
        while self.log().count("Task manager ") < self.workers:
            if self.process.poll() is not None:
                raise AssertionError(f"Server exited; log:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.workers} workers not started in {timeout} s; "
                    f"log:\n{self.log()[-5000:]}"
                )
            time.sleep(0.1)

    def client(self, *, new_connections: bool = False) -> httpx.Client:
        """Return a client; with ``new_connections``, every request opens a new one.

        The kernel hands each new connection to one of the workers, so only
        new connections spread requests over the processes.
        """
        headers = {"connection": "close"} if new_connections else {}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def make_workers(tmp_path: Path) -> Iterator[Callable[..., WorkersServer]]:
    """Start ``uvicorn --workers N`` servers on a database, and kill them after the test."""
    servers: list[WorkersServer] = []

    def make(url: str, workers: int, **env: str) -> WorkersServer:
        # The ledger's create_all() begins as a read and then writes, and SQLite
        # fails such a write at once with "database is locked" when another
        # worker wrote first, so the tables are made before the workers start.
        database = Database(url)
        try:
            database.create_schema()
            create_ledger(database)
        finally:
            database.dispose()
        log_path = tmp_path / f"workers-{len(servers)}.log"
        server = WorkersServer(url, log_path, workers, env)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_runner(
    database_url: str, tmp_path: Path
) -> Iterator[Callable[..., RunnerProcess]]:
    runners: list[RunnerProcess] = []

    def make(**env: str) -> RunnerProcess:
        log_path = tmp_path / f"runner-{len(runners)}.log"
        runner = RunnerProcess(database_url, log_path, env)
        runners.append(runner)
        runner.start()
        return runner

    yield make
    for runner in runners:
        runner.stop()


@pytest.fixture
def store(database_url: str) -> Iterator[TaskManager]:
    """A manager that stores and controls tasks from the test but runs none."""
    manager = TaskManager(database_url, max_workers=0)
    manager.register(StepTask)
    manager.register(BackoffStepTask)
    manager.startup()
    try:
        create_ledger(manager.database)
        yield manager
    finally:
        manager.shutdown()


@pytest.fixture
def sqlite_database(sqlite_url: str) -> Iterator[Database]:
    """A connection of the test's own to its SQLite file, for reading rows."""
    database = Database(sqlite_url)
    yield database
    database.dispose()


# -- reading the database --


def task_row(database: Database, task_id: str) -> dict[str, Any]:
    tasks = Task.__table__
    with database.read() as session:
        found = (
            session.execute(select(tasks).where(tasks.c.id == task_id))
            .mappings()
            .one_or_none()
        )
    assert found is not None, f"no task {task_id}"
    return dict(found)


def count_statuses(database: Database) -> dict[TaskStatus, int]:
    """Return how many tasks have each status."""
    with database.read() as session:
        rows = session.execute(
            select(Task.status, func.count()).group_by(Task.status)
        ).all()
    return {status: count for status, count in rows}


def history(
    database: Database, task_id: str
) -> list[tuple[TaskStatus | None, TaskStatus, str]]:
    with database.read() as session:
        rows = session.execute(
            select(Event.from_status, Event.to_status, Event.reason)
            .where(Event.task_id == task_id)
            .order_by(Event.id)
        ).all()
    return [(old, new, reason) for old, new, reason in rows]


def count_claims(database: Database) -> dict[str, int]:
    """Return how many times each task went from PENDING to RUNNING."""
    with database.read() as session:
        rows = session.execute(
            select(Event.task_id, func.count())
            .where(
                Event.from_status == TaskStatus.PENDING,
                Event.to_status == TaskStatus.RUNNING,
            )
            .group_by(Event.task_id)
        ).all()
    return {task_id: count for task_id, count in rows}


def summarize_ledger(database: Database) -> dict[str, tuple[int, int, int]]:
    """Return the count, first and last step of each task's ledger rows."""
    step = ledger.c.step
    with database.read() as session:
        rows = session.execute(
            select(
                ledger.c.task_id, func.count(), func.min(step), func.max(step)
            ).group_by(ledger.c.task_id)
        ).all()
    return {task_id: (count, first, last) for task_id, count, first, last in rows}


def count_transitions(
    events: list[tuple[TaskStatus | None, TaskStatus, str]], old: str | None, new: str
) -> int:
    return sum(1 for event in events if event[:2] == (old, new))


def wait_for_row(
    database: Database,
    task_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float,
) -> dict[str, Any]:
    """Poll the task's row until ``predicate`` holds; fail with the last row."""
    deadline = time.monotonic() + timeout
    while True:
        row = task_row(database, task_id)
        if predicate(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"Task row not as expected within {timeout} s: {row}")
        time.sleep(0.02)


def wait_until_settled(database: Database, timeout: float) -> None:
    """Wait until no task is PENDING, RUNNING or PAUSED."""

    def count_unfinished() -> int:
        with database.read() as session:
            count: int = session.execute(
                select(func.count()).where(Task.status.in_(UNFINISHED))
            ).scalar_one()
            return count

    eventually(lambda: count_unfinished() == 0, timeout=timeout, interval=0.1)


def owner_pid(owner: str | None) -> int | None:
    """Return the process id in a runner id (``host:pid:random``)."""
    if owner is None:
        return None
    return int(owner.rsplit(":", 2)[1])


def served_by(response: httpx.Response) -> int:
    return int(response.headers["x-server-pid"])


def step_body(n: int, step_s: float) -> dict[str, Any]:
    return {"name": "step", "params": {"n": n, "step_s": step_s}}


def act_through_other_process(
    server: WorkersServer, task_id: str, action: str, avoid: int | None
) -> httpx.Response:
    """Send an action on a connection that a process other than ``avoid`` serves.

    A keep-alive connection stays with the process that accepted it, so the
    action goes to the process that served the probe before it.
    """
    for _ in range(50):
        with server.client() as client:
            pid = served_by(client.get("/health"))
            if pid == avoid:
                continue
            response = client.post(f"/tasks/{task_id}/{action}")
            assert served_by(response) == pid, "the connection changed process"
            return response
    raise AssertionError(f"50 connections all went to process {avoid}")


def post_all(
    server: WorkersServer, bodies: list[dict[str, Any]], threads: int
) -> list[httpx.Response]:
    """POST each body to /tasks from several threads, each on a new connection."""
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def send(body: dict[str, Any]) -> httpx.Response:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = server.client(new_connections=True)
            with lock:
                clients.append(client)
        return client.post("/tasks", json=body)

    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(send, bodies))
    finally:
        for client in clients:
            client.close()


# -- one burst through four workers --


def test_burst_through_workers_runs_each_task_once(
    make_workers: Callable[..., WorkersServer], database_url: str, database: Database
) -> None:
    server = make_workers(database_url, 4)
    rng = random.Random(1000)
    sizes = [rng.choice((1, 2)) for _ in range(1000)]
    started = time.monotonic()

    responses = post_all(server, [step_body(n, 0) for n in sizes], threads=8)
    posted = time.monotonic()

    codes = Counter(response.status_code for response in responses)
    assert codes == {201: len(sizes)}, [
        r.text for r in responses if r.status_code != 201
    ]
    pids = Counter(served_by(response) for response in responses)
    assert len(pids) >= 2, f"all requests went to one process: {pids}"
    expected = {
        response.json()["id"]: n for response, n in zip(responses, sizes, strict=True)
    }

    wait_until_settled(database, timeout=60)
    settled = time.monotonic()

    assert count_statuses(database) == {TaskStatus.FINISHED: len(sizes)}

    claims = count_claims(database)
    assert set(claims) == set(expected)
    claimed_again = {task_id: count for task_id, count in claims.items() if count != 1}
    assert claimed_again == {}

    steps_by_task = summarize_ledger(database)
    assert set(steps_by_task) == set(expected)
    wrong_ledger = {
        task_id: steps
        for task_id, steps in steps_by_task.items()
        if steps != (expected[task_id], 1, expected[task_id])
    }
    assert wrong_ledger == {}

    with database.read() as session:
        rows = session.execute(select(Task.id, Task.result, Task.owner)).all()
    wrong_results = {
        task_id: result
        for task_id, result, _ in rows
        if result != {"sum": expected[task_id] * (expected[task_id] + 1) // 2}
    }
    assert wrong_results == {}
    runner_pids = Counter(owner_pid(owner) for _, _, owner in rows)
    assert len(runner_pids) >= 2, f"one process ran every task: {runner_pids}"

    print(
        f"\n{len(sizes)} tasks posted in {posted - started:.1f} s to processes "
        f"{dict(pids)}, run by {dict(runner_pids)}, all finished after "
        f"{settled - started:.1f} s"
    )


# -- pause, resume and stop through a process that does not run the task --


def test_actions_through_other_workers_take_effect(
    make_workers: Callable[..., WorkersServer], database_url: str, database: Database
) -> None:
    server = make_workers(database_url, 4)
    with server.client() as client:
        response = client.post("/tasks", json=step_body(10, 0.3))
    assert response.status_code == 201, response.text
    task_id = response.json()["id"]

    running = wait_for_row(
        database,
        task_id,
        lambda row: row["status"] == "RUNNING" and row["progress"] >= 10,
        timeout=10,
    )
    runner = owner_pid(running["owner"])

    response = act_through_other_process(server, task_id, "pause", avoid=runner)
    assert response.status_code == 202, response.text
    paused = wait_for_row(
        database, task_id, lambda row: row["status"] == "PAUSED", timeout=2
    )
    assert paused["owner"] is None
    assert paused["control"] is None
    assert 0 < paused["progress"] < 100

    # Twenty reads or more on new connections, until two processes served them.
    # Every process reads the same row.
    with server.client(new_connections=True) as client:
        reads = [client.get(f"/tasks/{task_id}") for _ in range(20)]
        while len({served_by(read) for read in reads}) < 2 and len(reads) < 100:
            reads.append(client.get(f"/tasks/{task_id}"))
    assert {read.status_code for read in reads} == {200}
    read_pids = {served_by(read) for read in reads}
    assert len(read_pids) >= 2, f"all reads went to one process: {read_pids}"
    bodies = [read.json() for read in reads]
    assert all(body == bodies[0] for body in bodies), bodies
    assert bodies[0]["status"] == "PAUSED"
    assert bodies[0]["progress"] == paused["progress"]

    response = act_through_other_process(server, task_id, "resume", avoid=runner)
    assert response.status_code == 202, response.text
    resumed = wait_for_row(
        database, task_id, lambda row: row["status"] != "PAUSED", timeout=2
    )
    assert resumed["status"] in ("PENDING", "RUNNING", "FINISHED")
    finished = wait_for_row(
        database, task_id, lambda row: row["status"] not in UNFINISHED, timeout=15
    )
    assert finished["status"] == "FINISHED"
    assert finished["result"] == {"sum": 55}
    assert ledger_steps(database, task_id) == list(range(1, 11))
    events = history(database, task_id)
    assert count_transitions(events, "RUNNING", "FINISHED") == 1
    assert count_transitions(events, "RUNNING", "PAUSED") == 1
    assert count_transitions(events, "PAUSED", "PENDING") == 1
    assert count_transitions(events, "PENDING", "RUNNING") == 2

    with server.client() as client:
        response = client.post("/tasks", json=step_body(10, 0.3))
    assert response.status_code == 201, response.text
    stopped_id = response.json()["id"]
    running = wait_for_row(
        database,
        stopped_id,
        lambda row: row["status"] == "RUNNING" and row["progress"] >= 10,
        timeout=10,
    )

    response = act_through_other_process(
        server, stopped_id, "stop", avoid=owner_pid(running["owner"])
    )
    assert response.status_code == 202, response.text
    stopped = wait_for_row(
        database, stopped_id, lambda row: row["status"] != "RUNNING", timeout=2
    )
    assert stopped["status"] == "STOPPED"
    steps = ledger_steps(database, stopped_id)
    assert steps == list(range(1, len(steps) + 1))
    assert 1 <= len(steps) < 10
    assert count_transitions(history(database, stopped_id), "RUNNING", "STOPPED") == 1


# -- SQLite under concurrent writers --


@dataclass
class LoadReport:
    """What a mixed read and create load saw."""

    codes: Counter[int] = field(default_factory=Counter)
    pids: Counter[int] = field(default_factory=Counter)
    created: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    slowest_create: float = 0.0


def run_mixed_load(
    server: WorkersServer,
    task_ids: list[str],
    duration: float,
    rate: float = 50.0,
    seed: int = 50,
) -> LoadReport:
    """Send ``rate`` requests a second for ``duration`` seconds: 70 % GET, 30 % POST.

    Each request opens a new connection, so both workers serve some. The
    schedule does not wait for responses, and it sends at most
    ``rate * duration`` requests.
    """
    rng = random.Random(seed)
    report = LoadReport()
    lock = threading.Lock()
    known = list(task_ids)
    local = threading.local()
    clients: list[httpx.Client] = []

    def client() -> httpx.Client:
        existing = getattr(local, "client", None)
        if existing is None:
            existing = local.client = server.client(new_connections=True)
            with lock:
                clients.append(existing)
        assert isinstance(existing, httpx.Client)
        return existing

    def send(create: bool, task_id: str) -> None:
        started = time.monotonic()
        try:
            if create:
                response = client().post("/tasks", json=step_body(2, 0))
            else:
                response = client().get(f"/tasks/{task_id}")
        except httpx.TransportError as exc:
            with lock:
                report.transport_errors.append(repr(exc))
            return
        elapsed = time.monotonic() - started
        with lock:
            report.codes[response.status_code] += 1
            report.pids[served_by(response)] += 1
            if response.status_code >= 500:
                report.server_errors.append(response.text)
            if create and response.status_code == 201:
                report.created.append(response.json()["id"])
                known.append(response.json()["id"])
                report.slowest_create = max(report.slowest_create, elapsed)

    futures: list[Future[None]] = []
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        for index in range(int(rate * duration)):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            create = rng.random() < 0.3
            with lock:
                task_id = rng.choice(known)
            futures.append(pool.submit(send, create, task_id))
        for future in futures:
            future.result(timeout=60)
    for each in clients:
        each.close()
    return report


class ExternalWriteLock(threading.Thread):
    """Hold SQLite's write lock from a separate connection for ``hold`` seconds."""

    def __init__(self, database_path: Path, after: float, hold: float) -> None:
        super().__init__(name="external-write-lock")
        self.database_path = database_path
        self.after = after
        self.hold = hold
        #: When the lock was taken, in UTC.
        self.locked_at: dt.datetime | None = None
        #: Seconds that the lock was held, once it was released.
        self.held: float | None = None

    def run(self) -> None:
        time.sleep(self.after)
        connection = sqlite3.connect(
            self.database_path, timeout=10, isolation_level=None
        )
        try:
            connection.execute("BEGIN IMMEDIATE")
            self.locked_at = dt.datetime.now(dt.UTC)
            locked = time.monotonic()
            time.sleep(self.hold)
            connection.execute("ROLLBACK")
            self.held = time.monotonic() - locked
        finally:
            connection.close()


@pytest.mark.parametrize(
    ("duration", "external_lock"),
    [(10.0, False), (6.0, True)],
    ids=["load", "load_and_external_lock"],
)
def test_sqlite_writers_contend_without_errors(
    make_workers: Callable[..., WorkersServer],
    sqlite_url: str,
    sqlite_database: Database,
    duration: float,
    external_lock: bool,
) -> None:
    database = sqlite_database
    server = make_workers(sqlite_url, 2, TASKMILL_TEST_WORKERS="8")
    started = time.monotonic()
    # About 1.5 s per task in two rounds of the 16 workers: the external lock,
    # 1.5 s in, comes while they run.
    responses = post_all(server, [step_body(50, 0.03)] * 20, threads=4)
    assert {response.status_code for response in responses} == {201}
    long_ids = [response.json()["id"] for response in responses]

    database_path = Path(str(make_url(sqlite_url).database))
    locker = ExternalWriteLock(database_path, after=1.5, hold=2.0)
    if external_lock:
        locker.start()
    report = run_mixed_load(server, long_ids, duration)
    if external_lock:
        locker.join(timeout=30)
        assert locker.held == pytest.approx(2.0, abs=0.5)
    wait_until_settled(database, timeout=30)
    settled = time.monotonic()

    assert report.server_errors == []
    assert report.transport_errors == []
    assert len(report.pids) == 2, f"requests went to {dict(report.pids)}"
    log = server.log()
    assert "database is locked" not in log
    assert "OperationalError" not in log
    assert "database unavailable" not in log

    assert count_statuses(database) == {
        TaskStatus.FINISHED: len(long_ids) + len(report.created)
    }
    for task_id in long_ids:
        row = task_row(database, task_id)
        assert row["result"] == {"sum": 1275}
        assert row["progress"] == 100
        assert ledger_steps(database, task_id) == list(range(1, 51))
    for task_id in report.created:
        assert ledger_steps(database, task_id) == [1, 2]
    if external_lock:
        # The lock came while the long tasks ran, and creates waited for it.
        assert locker.locked_at is not None
        last_end = max(
            task_row(database, task_id)["finished_at"] for task_id in long_ids
        )
        assert last_end > locker.locked_at
        assert report.slowest_create > 1.0

    print(
        f"\n{sum(report.codes.values())} requests {dict(report.codes)} over "
        f"{dict(report.pids)}; {len(report.created)} created; slowest create "
        f"{report.slowest_create:.2f} s; all settled after {settled - started:.1f} s"
    )


# -- leases across processes --

LEASE = 2.0
RUNNER_ENV = {
    "TASKMILL_TEST_LEASE": str(LEASE),
    "TASKMILL_TEST_POLL": "0.2",
    "TASKMILL_TEST_WORKERS": "2",
}


def gated_step_params(gate: Path) -> dict[str, Any]:
    """Return params of a 10-step task whose step 3 waits until ``gate`` exists.

    Runner A waits at the gate while runner B starts, because starting B can
    take longer than the 2 s that the whole task runs.
    """
    return {"n": 10, "step_s": 0.2, "gate_step": 3, "gate_file": str(gate)}


def freeze_outside_write(
    runner: RunnerProcess, database_url: str, task_id: str
) -> None:
    """SIGSTOP the runner at a moment when it holds no lock on the task's row.

    A process stopped inside a write transaction keeps its locks until it
    resumes, and no lease can take them back. On SQLite its write lock keeps
    every other writer out. On PostgreSQL its row lock keeps out every other
    writer of the task. The probe takes that lock without waiting for it:
    BEGIN IMMEDIATE on SQLite, SELECT ... FOR UPDATE NOWAIT on PostgreSQL.
    """
    probe = Database(database_url, busy_timeout=0.3)
    try:
        for _ in range(20):
            runner.signal(signal.SIGSTOP)
            try:
                with probe.write() as session:
                    session.execute(
                        select(Task.id)
                        .where(Task.id == task_id)
                        .with_for_update(nowait=True)
                    )
                return
            except OperationalError:
                runner.signal(signal.SIGCONT)
                time.sleep(0.05)
    finally:
        probe.dispose()
    raise AssertionError("the runner held a lock on the task at each of 20 tries")


def test_frozen_runner_loses_task_after_lease(
    make_runner: Callable[..., RunnerProcess],
    store: TaskManager,
    database_url: str,
    database: Database,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    runner_a = make_runner(**RUNNER_ENV)
    task_id = store.create("step", gated_step_params(gate)).id
    running = wait_for_row(
        database,
        task_id,
        lambda row: row["status"] == "RUNNING" and row["progress"] >= 20,
        timeout=10,
    )
    owner_a = running["owner"]
    assert runner_a.owns(owner_a)
    runner_b = make_runner(**RUNNER_ENV)
    gate.touch()

    freeze_outside_write(runner_a, database_url, task_id)
    frozen_at = time.monotonic()
    lease_end = store.get(task_id).lease_expires_at
    assert lease_end is not None
    # The lease that A last renewed: B must leave the task alone until it ends.
    left = (lease_end - dt.datetime.now(dt.UTC)).total_seconds()
    assert left > 0.5, f"the lease had only {left:.2f} s left when A froze"
    samples = 0
    while dt.datetime.now(dt.UTC) < lease_end - dt.timedelta(seconds=0.1):
        row = task_row(database, task_id)
        assert row["status"] == "RUNNING", row
        assert row["owner"] == owner_a, row
        samples += 1
        time.sleep(0.05)
    held = time.monotonic() - frozen_at
    assert held > LEASE / 2, f"A held the task only {held:.2f} s after it froze"
    assert samples > 5

    taken = wait_for_row(
        database,
        task_id,
        lambda row: (
            row["owner"] != owner_a and row["status"] in ("RUNNING", "FINISHED")
        ),
        timeout=10,
    )
    assert runner_b.owns(taken["owner"])
    recovered = [
        event
        for event in history(database, task_id)
        if event[:2] == ("RUNNING", "PENDING")
    ]
    assert len(recovered) == 1, recovered
    assert owner_a in recovered[0][2]
    assert "lease expired" in recovered[0][2]

    finished = wait_for_row(
        database, task_id, lambda row: row["status"] != "RUNNING", timeout=10
    )
    assert finished["status"] == "FINISHED"
    assert runner_b.owns(finished["owner"])

    runner_a.signal(signal.SIGCONT)
    lost = f"Task {task_id} (step) was taken back"
    eventually(lambda: lost in runner_a.log(), timeout=5)
    time.sleep(0.5)

    final = task_row(database, task_id)
    assert final["status"] == "FINISHED"
    assert runner_b.owns(final["owner"])
    assert final["result"] == {"sum": 55}
    assert final["recoveries"] == 1
    assert ledger_steps(database, task_id) == list(range(1, 11))
    events = history(database, task_id)
    assert count_transitions(events, "RUNNING", "FINISHED") == 1
    assert count_transitions(events, "PENDING", "RUNNING") == 2
    # The stale run ends as a lost run. Its next checkpoint must find that it
    # lost the task before the step's effects hit the ledger's unique
    # constraint, or it logs an IntegrityError as a failure of a FINISHED task.
    stale_failures = [
        line
        for line in runner_a.log().splitlines()
        if task_id in line and ("ERROR" in line or "failed" in line)
    ]
    assert stale_failures == []


def test_new_runner_leaves_live_runners_task(
    make_runner: Callable[..., RunnerProcess], store: TaskManager, database: Database
) -> None:
    runner_a = make_runner(**RUNNER_ENV)
    task_id = store.create("step", {"n": 25, "step_s": 0.2}).id
    running = wait_for_row(
        database, task_id, lambda row: row["status"] == "RUNNING", timeout=10
    )
    owner_a = running["owner"]
    assert runner_a.owns(owner_a)

    runner_b = make_runner(**RUNNER_ENV)
    b_started = time.monotonic()
    owners: set[str | None] = set()
    deadline = time.monotonic() + 15
    row = running
    while row["status"] == "RUNNING" and time.monotonic() < deadline:
        owners.add(row["owner"])
        time.sleep(0.05)
        row = task_row(database, task_id)
    b_watched = time.monotonic() - b_started

    assert row["status"] == "FINISHED", row
    assert owners == {owner_a}
    assert b_watched > LEASE, f"the task ended {b_watched:.1f} s after B started"
    assert row["recoveries"] == 0
    assert ledger_steps(database, task_id) == list(range(1, 26))
    assert count_transitions(history(database, task_id), "PENDING", "RUNNING") == 1
    assert task_id not in runner_b.log()


def test_requests_reach_sleeping_task_in_other_process(
    make_runner: Callable[..., RunnerProcess], store: TaskManager, database: Database
) -> None:
    runner = make_runner(**RUNNER_ENV)
    # Each step sleeps 10 s: only the runner's poll of stored requests can
    # wake the run before the step's checkpoint.
    task_id = store.create("step", {"n": 2, "step_s": 10}).id
    wait_for_row(database, task_id, lambda row: row["status"] == "RUNNING", 10)

    store.pause(task_id)
    paused = wait_for_row(
        database, task_id, lambda row: row["status"] != "RUNNING", timeout=2
    )
    assert paused["status"] == "PAUSED"
    assert "in sleep()" in history(database, task_id)[-1][2]

    store.resume(task_id)
    running = wait_for_row(
        database, task_id, lambda row: row["status"] == "RUNNING", timeout=5
    )
    assert runner.owns(running["owner"])

    store.stop(task_id)
    stopped = wait_for_row(
        database, task_id, lambda row: row["status"] != "RUNNING", timeout=2
    )
    assert stopped["status"] == "STOPPED"
    assert ledger_steps(database, task_id) == []


def test_request_to_frozen_runner_applies_at_takeover(
    make_runner: Callable[..., RunnerProcess],
    store: TaskManager,
    database_url: str,
    database: Database,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    runner_a = make_runner(**RUNNER_ENV)
    task_id = store.create("step", gated_step_params(gate)).id
    running = wait_for_row(
        database,
        task_id,
        lambda row: row["status"] == "RUNNING" and row["progress"] >= 20,
        timeout=10,
    )
    make_runner(**RUNNER_ENV)
    gate.touch()
    freeze_outside_write(runner_a, database_url, task_id)
    store.stop(task_id)

    stopped = wait_for_row(
        database,
        task_id,
        lambda row: row["status"] != "RUNNING",
        timeout=LEASE + 5,
    )
    runner_a.signal(signal.SIGCONT)
    assert stopped["status"] == "STOPPED"
    events = history(database, task_id)
    assert events[-1][:2] == ("RUNNING", "STOPPED")
    assert running["owner"] in events[-1][2]
    assert "stopped as requested" in events[-1][2]
    assert count_transitions(events, "PENDING", "RUNNING") == 1

    # The frozen run wakes up, fails to store its next step, and ends.
    eventually(lambda: f"Task {task_id} (step) was taken back" in runner_a.log(), 5)
    steps = ledger_steps(database, task_id)
    assert steps == list(range(1, len(steps) + 1))
    assert task_row(database, task_id)["status"] == "STOPPED"


def test_runner_shutdown_hands_task_to_other_runner(
    make_runner: Callable[..., RunnerProcess],
    store: TaskManager,
    database: Database,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    runner_a = make_runner(**RUNNER_ENV)
    task_id = store.create("step", gated_step_params(gate)).id
    wait_for_row(
        database,
        task_id,
        lambda row: row["status"] == "RUNNING" and row["progress"] >= 20,
        timeout=10,
    )
    runner_b = make_runner(**RUNNER_ENV)
    gate.touch()

    assert runner_a.term() == 0
    taken = wait_for_row(
        database,
        task_id,
        lambda row: row["status"] != "PENDING" and runner_b.owns(row["owner"]),
        timeout=3,
    )
    assert taken["recoveries"] == 0
    finished = wait_for_row(
        database, task_id, lambda row: row["status"] != "RUNNING", timeout=10
    )
    assert finished["status"] == "FINISHED"
    assert ledger_steps(database, task_id) == list(range(1, 11))
    suspended = [
        e for e in history(database, task_id) if e[:2] == ("RUNNING", "PENDING")
    ]
    assert len(suspended) == 1
    assert "shut down" in suspended[0][2]


def test_tasks_in_backoff_leave_due_tasks_visible(
    make_runner: Callable[..., RunnerProcess], store: TaskManager, database: Database
) -> None:
    # A runner with one worker reads the 64 oldest PENDING tasks at each poll.
    # Once the first 64 wait 600 s for their retry, the tasks created after
    # them are due, and a runner must still find them.
    make_runner(**{**RUNNER_ENV, "TASKMILL_TEST_WORKERS": "1"})
    params = {"n": 1, "step_s": 0, "fail_step": 1}
    waiting = [store.create("step_backoff", params).id for _ in range(70)]
    for task_id in waiting[:64]:
        wait_for_row(database, task_id, lambda row: row["failures"] == 1, 20)
    due_id = store.create("step", {"n": 1, "step_s": 0}).id

    due = wait_for_row(
        database, due_id, lambda row: row["status"] != "PENDING", timeout=5
    )
    assert due["status"] in ("RUNNING", "FINISHED")
    never_run = [
        task_id
        for task_id in waiting[64:]
        if task_row(database, task_id)["attempts"] == 0
    ]
    assert never_run == []
