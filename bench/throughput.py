"""Throughput: no-op tasks per second, created and run to FINISHED, beside references.

Every variant runs in one ``measure()`` call, so their ratios compare figures
taken under the same load. Each taskmill variant uses a fresh SQLite file in
a temporary directory, a manager with ``max_workers=4`` and default
intervals, and one producer that creates the tasks one after another while
the manager runs them. The clock starts before the first task is created and
stops when the last one is FINISHED. Afterwards the benchmark checks that
every task is FINISHED with its three history rows (created, claimed,
finished), all committed.

- ``taskmill``: ``TaskManager.create()`` in the process that runs the tasks,
  with 0, 10 or 1,000 ``set_progress()`` calls in each task's ``run()``, on
  SQLite with ``synchronous=NORMAL`` (the default); the no-op tasks also
  with ``synchronous=FULL``, and created by ``create_many()`` in batches of
  100 (``taskmill_noop_batch_tasks_per_s``).
- ``taskmill_http``: ``POST /tasks`` from this process to a uvicorn server
  process (``bench.tasks:create_app``) on 127.0.0.1, over one keep-alive
  connection.

References:

- Huey's ``SqliteHuey`` with its defaults (WAL, ``synchronous=OFF``) and a
  consumer of 4 worker threads in this process, on the same no-op tasks.
- FastAPI's ``BackgroundTasks``: ``POST /tasks`` through httpx's
  ``ASGITransport`` to an in-process app whose endpoint adds a no-op
  background task. Nothing is stored, so this is a ceiling for the cost of
  dispatch alone.
- Raw ``sqlite3``: one 200-byte row per ``BEGIN IMMEDIATE ... COMMIT`` in WAL
  mode with ``synchronous=NORMAL`` (taskmill's setting) and ``FULL``, and rows
  in batches of 1,000 per commit, in the same temporary directory.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
from fastapi import BackgroundTasks, FastAPI
from huey import SqliteHuey

from bench.common import Benchmark, Figures, Sizes, tail
from bench.tasks import DATABASE_URL_VARIABLE, WORKERS_VARIABLE, NoOp
from taskmill import Database, TaskManager

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Tasks that run at once: taskmill's ``max_workers`` and Huey's worker threads.
WORKERS = 4
#: Maximum time in seconds that one variant may take before it raises TimeoutError.
VARIANT_TIMEOUT = 300.0
#: Seconds between two checks whether the last task has finished.
DONE_POLL = 0.005
#: Maximum time in seconds that the server process may take to start.
SERVER_START_TIMEOUT = 30.0
#: Tasks per ``create_many()`` call of the batched taskmill variant.
BATCH_TASKS = 100
#: Rows per commit of the batched raw SQLite variant.
BATCH_ROWS = 1000
#: The payload of each raw SQLite row: about the size of a task row's text.
ROW_PAYLOAD = "x" * 200


def measure(sizes: Sizes) -> Figures:
    figures: Figures = {}
    with tempfile.TemporaryDirectory(prefix="taskmill-bench-throughput-") as name:
        directory = Path(name)
        tasks = sizes["tasks"]
        for reports, synchronous, key in (
            (0, "NORMAL", "taskmill_noop_tasks_per_s"),
            (0, "FULL", "taskmill_noop_full_tasks_per_s"),
            (10, "NORMAL", "taskmill_progress10_tasks_per_s"),
            (1000, "NORMAL", "taskmill_progress1000_tasks_per_s"),
        ):
            path = directory / f"taskmill-{reports}-{synchronous}.db"
            figures[key] = _taskmill_python(path, tasks, reports, synchronous)
        figures["taskmill_noop_batch_tasks_per_s"] = _taskmill_python(
            directory / "taskmill-batch.db", tasks, 0, "NORMAL", batch=BATCH_TASKS
        )
        figures["taskmill_http_noop_tasks_per_s"] = _taskmill_http(
            directory / "taskmill-http.db", sizes["http_tasks"], directory
        )
        figures["huey_sqlite_noop_tasks_per_s"] = _huey_sqlite(
            directory / "huey.db", sizes["huey_tasks"]
        )
        figures["fastapi_background_noop_tasks_per_s"] = asyncio.run(
            _fastapi_background(sizes["fastapi_tasks"])
        )
        figures["sqlite_raw_commits_per_s"] = _sqlite_commits(
            directory / "raw-normal.db", sizes["sqlite_commits"], "NORMAL"
        )
        figures["sqlite_raw_commits_full_per_s"] = _sqlite_commits(
            directory / "raw-full.db", sizes["sqlite_full_commits"], "FULL"
        )
        figures["sqlite_batched_rows_per_s"] = _sqlite_batched(
            directory / "raw-batched.db", sizes["sqlite_batched_rows"]
        )
    noop = figures["taskmill_noop_tasks_per_s"]
    figures["taskmill_to_huey_ratio"] = noop / figures["huey_sqlite_noop_tasks_per_s"]
    figures["taskmill_progress1000_to_noop_ratio"] = (
        figures["taskmill_progress1000_tasks_per_s"] / noop
    )
    return figures


# -- taskmill --


def _taskmill_python(
    path: Path, tasks: int, reports: int, synchronous: str, batch: int = 1
) -> float:
    database = Database(f"sqlite:///{path}", synchronous=synchronous)
    manager = TaskManager(database, max_workers=WORKERS)
    manager.register(NoOp)
    manager.startup()
    try:
        started = time.perf_counter()
        for first in range(0, tasks, batch):
            if batch == 1:
                manager.create(NoOp.name, {"reports": reports})
            else:
                count = min(batch, tasks - first)
                manager.create_many(NoOp.name, [{"reports": reports}] * count)
        _wait_until_idle(manager)
        elapsed = time.perf_counter() - started
    finally:
        manager.shutdown()
        database.dispose()
    _check_all_finished(path, tasks)
    return tasks / elapsed


def _wait_until_idle(manager: TaskManager) -> None:
    """Return once the manager tracks no unfinished task.

    The manager stops tracking a task after it has committed the task's final
    status, so this returns after the last FINISHED commit.
    """
    deadline = time.monotonic() + VARIANT_TIMEOUT
    while manager.live_task_ids():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(manager.live_task_ids())} tasks are still unfinished after "
                f"{VARIANT_TIMEOUT} s."
            )
        time.sleep(DONE_POLL)


def _taskmill_http(path: Path, tasks: int, directory: Path) -> float:
    with _server(f"sqlite:///{path}", directory / "server.log") as base_url:
        body = {"name": NoOp.name, "params": {"reports": 0}}
        with (
            httpx.Client(base_url=base_url, timeout=30.0) as client,
            closing(sqlite3.connect(path)) as connection,
        ):
            started = time.perf_counter()
            for _ in range(tasks):
                response = client.post("/tasks", json=body)
                if response.status_code != 201:
                    raise RuntimeError(
                        f"POST /tasks returned {response.status_code}: {response.text}"
                    )
            _wait_until_finished(connection, tasks)
            elapsed = time.perf_counter() - started
    _check_all_finished(path, tasks)
    return tasks / elapsed


def _wait_until_finished(connection: sqlite3.Connection, tasks: int) -> None:
    """Return once ``tasks`` tasks are FINISHED, read from the database file."""
    deadline = time.monotonic() + VARIANT_TIMEOUT
    query = "SELECT count(*) FROM tasks WHERE status = 'FINISHED'"
    while True:
        # Each read is a transaction of its own, so it reads the latest commit.
        (finished,) = connection.execute(query).fetchone()
        connection.commit()
        if finished >= tasks:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Only {finished} of {tasks} tasks are FINISHED after "
                f"{VARIANT_TIMEOUT} s."
            )
        time.sleep(DONE_POLL)


@contextmanager
def _server(database_url: str, log_path: Path) -> Iterator[str]:
    """Run ``bench.tasks:create_app`` under uvicorn on 127.0.0.1; yield its URL."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "bench.tasks:create_app",
        "--app-dir",
        str(REPO_ROOT),
        "--host",
        "127.0.0.1",
        f"--port={port}",
        "--log-level=warning",
        "--no-access-log",
    ]
    environment = {
        **os.environ,
        DATABASE_URL_VARIABLE: database_url,
        WORKERS_VARIABLE: str(WORKERS),
    }
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=log)
    try:
        _wait_for_server(process, base_url, log_path)
        yield base_url
    finally:
        # uvicorn shuts down on SIGTERM, which runs the manager's shutdown.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _free_port() -> int:
    # The port is free when this returns. Another process could take it before
    # the server binds it, and the server's start then fails with its log shown.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_server(
    process: subprocess.Popen[bytes], base_url: str, log_path: Path
) -> None:
    """Return once ``GET /task-types`` returns 200, which needs a running manager."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"The server process exited with code {process.returncode} before "
                f"it was ready; its log is {log_path}:\n{tail(log_path)}"
            )
        try:
            response = httpx.get(f"{base_url}/task-types", timeout=1.0)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if response.status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(
        f"The server did not respond within {SERVER_START_TIMEOUT} s; "
        f"its log is {log_path}:\n{tail(log_path)}"
    )


def _check_all_finished(path: Path, tasks: int) -> None:
    """Raise unless the file contains ``tasks`` FINISHED tasks with 3 history rows each."""
    with closing(sqlite3.connect(path)) as connection:
        statuses = dict(
            connection.execute("SELECT status, count(*) FROM tasks GROUP BY status")
        )
        (events,) = connection.execute("SELECT count(*) FROM task_events").fetchone()
    if statuses != {"FINISHED": tasks}:
        raise RuntimeError(
            f"Expected {tasks} FINISHED tasks in {path}, found {statuses}."
        )
    if events != 3 * tasks:
        raise RuntimeError(
            f"Expected {3 * tasks} history rows in {path} (created, claimed, "
            f"finished), found {events}."
        )


# -- references --


def _huey_sqlite(path: Path, tasks: int) -> float:
    huey = SqliteHuey(name="bench", filename=str(path))
    done = threading.Event()
    # itertools.count is a C iterator: next() on it is atomic under the GIL.
    counter = itertools.count(1)

    @huey.task()
    def noop() -> None:
        if next(counter) == tasks:
            done.set()

    consumer = huey.create_consumer(
        workers=WORKERS, worker_type="thread", periodic=False
    )
    # Consumer.start() installs its own signal handlers; put ours back after.
    handlers = {
        signum: signal.getsignal(signum)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    consumer.start()
    try:
        started = time.perf_counter()
        for _ in range(tasks):
            noop()
        if not done.wait(VARIANT_TIMEOUT):
            raise TimeoutError(
                f"Huey ran fewer than {tasks} tasks in {VARIANT_TIMEOUT} s."
            )
        elapsed = time.perf_counter() - started
    finally:
        consumer.stop(graceful=True)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return tasks / elapsed


async def _fastapi_background(tasks: int) -> float:
    counter = itertools.count(1)
    app = FastAPI()

    def noop() -> None:
        next(counter)

    @app.post("/tasks", status_code=202)
    async def create_task(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(noop)
        return {"status": "accepted"}

    # ASGITransport returns a response once the app has returned, which
    # Starlette does after the background task has run.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://bench"
    ) as client:
        started = time.perf_counter()
        for _ in range(tasks):
            response = await client.post("/tasks")
            if response.status_code != 202:
                raise RuntimeError(f"POST /tasks returned {response.status_code}.")
        elapsed = time.perf_counter() - started
    ran = next(counter) - 1
    if ran != tasks:
        raise RuntimeError(f"{ran} of {tasks} background tasks ran.")
    return tasks / elapsed


def _open_raw(path: Path, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: this code issues BEGIN and COMMIT itself.
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(f"PRAGMA synchronous = {synchronous}")
    connection.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)"
    )
    return connection


def _sqlite_commits(path: Path, commits: int, synchronous: str) -> float:
    connection = _open_raw(path, synchronous)
    try:
        started = time.perf_counter()
        for _ in range(commits):
            # IMMEDIATE, as taskmill begins its write transactions.
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO items (payload) VALUES (?)", (ROW_PAYLOAD,))
            connection.execute("COMMIT")
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    return commits / elapsed


def _sqlite_batched(path: Path, rows: int) -> float:
    connection = _open_raw(path, "NORMAL")
    batch = [(ROW_PAYLOAD,)] * BATCH_ROWS
    batches = max(1, rows // BATCH_ROWS)
    try:
        started = time.perf_counter()
        for _ in range(batches):
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany("INSERT INTO items (payload) VALUES (?)", batch)
            connection.execute("COMMIT")
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    return batches * BATCH_ROWS / elapsed


BENCHMARK = Benchmark(
    name="throughput",
    description="no-op tasks per second to FINISHED, beside Huey, FastAPI and sqlite3",
    sizes={
        "tasks": 1500,
        "http_tasks": 1500,
        "huey_tasks": 20_000,
        "fastapi_tasks": 5000,
        "sqlite_commits": 50_000,
        "sqlite_full_commits": 10_000,
        "sqlite_batched_rows": 500_000,
    },
    quick_sizes={
        "tasks": 50,
        "http_tasks": 50,
        "huey_tasks": 500,
        "fastapi_tasks": 200,
        "sqlite_commits": 500,
        "sqlite_full_commits": 100,
        "sqlite_batched_rows": 10_000,
    },
    measure=measure,
)
