"""Scale: startup, memory and reads of a manager on a database with many tasks.

The benchmark fills SQLite files with bulk INSERTs through SQLAlchemy Core on
taskmill's own tables, in batches of 20,000 rows, once per run of
bench/run.py: the repeats reuse them. The rows look like those that taskmill
writes. Each task has a UUID, params, timestamps two seconds apart and one
history row. A FINISHED task has a result, an owner and its run's timestamps,
and its history row is the RUNNING -> FINISHED transition. A PAUSED or
PENDING task has the history row of its creation. The schema comes from
``Database.create_schema()``, so the files are at taskmill's current revision.

- ``finished``: 1,000,000 FINISHED tasks with 10,000 PAUSED ones spread among
  them.
- ``paused``: the 10,000 PAUSED tasks alone, so that the difference from
  ``finished`` is the cost of the FINISHED rows.
- ``pending``: 100,000 PENDING tasks, copied afresh for each repeat because
  the manager starts running them.
- ``empty``: the schema alone, for comparison.

Startup runs bench/startup.py in a fresh process per file: it times
``TaskManager(...)``, ``register(NoOp)`` and ``startup()`` with
``max_workers=4``, and reads the process's RSS right after. The reads run in
this process, on a manager with ``max_workers=0`` on the ``finished`` file,
through httpx's ``ASGITransport`` to a FastAPI app with ``create_router()``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine, Table, create_engine, event, insert

from bench.common import Benchmark, Figures, Sizes, percentile
from bench.tasks import NoOp
from taskmill import Database, TaskManager, TaskStatus, create_router
from taskmill.models import BackgroundTaskModel, TaskEventModel

STARTUP_SCRIPT = Path(__file__).resolve().with_name("startup.py")
#: Rows per INSERT batch, each batch committed on its own.
BATCH_ROWS = 20_000
#: Maximum time in seconds that one startup process may run.
STARTUP_TIMEOUT = 300.0
#: Requests made and not counted before each read figure, to warm the caches.
WARMUP_REQUESTS = 20
#: The ``owner`` of the stored FINISHED tasks: a runner id in taskmill's format.
OWNER = "bench-host:4242:0a1b2c"
#: The ``created_at`` of the first stored task.
FIRST_CREATED_AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

_tasks = cast(Table, BackgroundTaskModel.__table__)
_events = cast(Table, TaskEventModel.__table__)


@dataclass(frozen=True)
class FilledDatabase:
    path: Path
    #: Ids of FINISHED tasks picked at random, for the reads by id.
    sample_ids: list[str]


#: Files already filled in this run, by kind and sizes. The temporary
#: directories they are in are deleted when the interpreter exits.
_filled: dict[tuple[str, int, int], FilledDatabase] = {}
_directories: list[tempfile.TemporaryDirectory[str]] = []


def measure(sizes: Sizes) -> Figures:
    finished = _finished_database(sizes["finished"], sizes["paused"], sizes["reads"])
    paused = _finished_database(0, sizes["paused"], 0)
    pending = _pending_database(sizes["pending"])
    with tempfile.TemporaryDirectory(prefix="taskmill-bench-scale-") as name:
        scratch = Path(name)
        empty_path = scratch / "empty.db"
        Database(f"sqlite:///{empty_path}").create_schema()
        pending_path = scratch / "pending.db"
        shutil.copyfile(pending.path, pending_path)
        empty_report = _start_in_new_process(empty_path)
        paused_report = _start_in_new_process(paused.path)
        finished_report = _start_in_new_process(finished.path)
        pending_report = _start_in_new_process(pending_path)
    reads = asyncio.run(_read_latencies(finished, sizes["reads"]))
    return {
        "startup_empty_s": empty_report["startup_s"],
        "startup_empty_rss_mb": empty_report["rss_mib"],
        "startup_10k_paused_s": paused_report["startup_s"],
        "startup_10k_paused_rss_mb": paused_report["rss_mib"],
        "startup_1m_finished_s": finished_report["startup_s"],
        "startup_1m_rss_mb": finished_report["rss_mib"],
        "pending_100k_startup_s": pending_report["startup_s"],
        "pending_100k_rss_mb": pending_report["rss_mib"],
        **reads,
    }


def _start_in_new_process(path: Path) -> dict[str, Any]:
    command = [sys.executable, str(STARTUP_SCRIPT), f"sqlite:///{path}"]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=STARTUP_TIMEOUT, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"bench/startup.py on {path} exited with code {completed.returncode}:\n"
            f"{completed.stderr[-4000:]}"
        )
    report: dict[str, Any] = json.loads(completed.stdout.splitlines()[0])
    return report


async def _read_latencies(database: FilledDatabase, reads: int) -> Figures:
    """Time ``GET /tasks/{id}``, ``manager.get()`` and a filtered ``GET /tasks``."""
    manager = TaskManager(f"sqlite:///{database.path}", max_workers=0)
    manager.register(NoOp)
    await asyncio.to_thread(manager.startup)
    try:
        app = FastAPI()
        app.include_router(create_router(manager, dashboard=False))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bench"
        ) as client:
            by_id = [f"/tasks/{task_id}" for task_id in database.sample_ids]
            get_ms = await _time_requests(client, _cycle(by_id, reads))
            list_url = f"/tasks?status={TaskStatus.PAUSED.value}&limit=50"
            list_ms = await _time_requests(client, _cycle([list_url], reads))
        manager_ms = _time_manager_gets(manager, _cycle(database.sample_ids, reads))
    finally:
        await asyncio.to_thread(manager.shutdown)
    return {
        "get_by_id_p50_ms": percentile(get_ms, 50),
        "get_by_id_p99_ms": percentile(get_ms, 99),
        "manager_get_p50_ms": percentile(manager_ms, 50),
        "list_filtered_p50_ms": percentile(list_ms, 50),
        "list_filtered_p99_ms": percentile(list_ms, 99),
    }


def _cycle(items: list[str], count: int) -> list[str]:
    """Return ``WARMUP_REQUESTS + count`` items, going round ``items``."""
    return [items[index % len(items)] for index in range(WARMUP_REQUESTS + count)]


async def _time_requests(client: httpx.AsyncClient, urls: list[str]) -> list[float]:
    """GET each URL in turn; return the latencies in ms after the warm-up ones."""
    latencies = []
    for url in urls:
        started = time.perf_counter()
        response = await client.get(url)
        latencies.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"GET {url} returned {response.status_code}.")
    return latencies[WARMUP_REQUESTS:]


def _time_manager_gets(manager: TaskManager, task_ids: list[str]) -> list[float]:
    latencies = []
    for task_id in task_ids:
        started = time.perf_counter()
        manager.get(task_id)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies[WARMUP_REQUESTS:]


# -- filling the files --


def _finished_database(finished: int, paused: int, samples: int) -> FilledDatabase:
    key = ("finished", finished, paused)
    if key not in _filled:
        path = _new_directory() / ("finished.db" if finished else "paused.db")
        started = time.monotonic()
        sample_ids = _fill(path, _finished_rows(finished, paused, samples))
        _check_counts(path, {"FINISHED": finished, "PAUSED": paused})
        _log_filled(path, finished + paused, time.monotonic() - started)
        _filled[key] = FilledDatabase(path, sample_ids)
    return _filled[key]


def _pending_database(pending: int) -> FilledDatabase:
    key = ("pending", pending, 0)
    if key not in _filled:
        path = _new_directory() / "pending.db"
        started = time.monotonic()
        _fill(path, _pending_rows(pending))
        _check_counts(path, {"PENDING": pending})
        _log_filled(path, pending, time.monotonic() - started)
        _filled[key] = FilledDatabase(path, [])
    return _filled[key]


def _new_directory() -> Path:
    directory = tempfile.TemporaryDirectory(prefix="taskmill-bench-scale-")
    _directories.append(directory)
    return Path(directory.name)


def _log_filled(path: Path, tasks: int, seconds: float) -> None:
    megabytes = path.stat().st_size / 2**20
    print(
        f"scale: filled {path.name} with {tasks:,} tasks ({megabytes:.0f} MiB) "
        f"in {seconds:.1f} s",
        file=sys.stderr,
        flush=True,
    )


@dataclass(frozen=True)
class _Row:
    task: dict[str, Any]
    event: dict[str, Any]
    #: True when the task's id goes into the sample for the reads by id.
    sampled: bool = False


def _fill(path: Path, rows: Iterator[_Row]) -> list[str]:
    """Create taskmill's schema in a new file and insert ``rows``; return the sampled ids."""
    url = f"sqlite:///{path}"
    Database(url).create_schema()
    engine = _bulk_engine(url)
    sampled: list[str] = []
    try:
        while True:
            batch = list(itertools.islice(rows, BATCH_ROWS))
            if not batch:
                break
            with engine.begin() as connection:
                connection.execute(insert(_tasks), [row.task for row in batch])
                connection.execute(insert(_events), [row.event for row in batch])
            sampled.extend(row.task["id"] for row in batch if row.sampled)
        with engine.connect() as connection:
            # Moves every page into the database file and empties the WAL, so
            # the files that startup opens contain no log to replay.
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    # A fixed seed: every run reads the same tasks in the same order.
    random.Random(1).shuffle(sampled)
    return sampled


def _bulk_engine(url: str) -> Engine:
    """Return an engine that trades durability for speed while the file is filled."""
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = OFF")
        cursor.execute("PRAGMA cache_size = -262144")  # 256 MiB
        cursor.close()

    return engine


def _finished_rows(finished: int, paused: int, samples: int) -> Iterator[_Row]:
    """Yield ``finished`` FINISHED tasks with ``paused`` PAUSED ones spread among them."""
    rng = random.Random(0)
    total = finished + paused
    sampled = set(rng.sample(range(total), min(samples, total)))
    # Every `spacing`-th task is PAUSED, until there are `paused` of them.
    spacing = total // paused if paused else total + 1
    paused_left = paused
    for index in range(total):
        created_at = FIRST_CREATED_AT + dt.timedelta(seconds=2 * index)
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if paused_left and index % spacing == spacing - 1:
            paused_left -= 1
            yield _new_task(task_id, index, TaskStatus.PAUSED, created_at)
        else:
            yield _finished_task(task_id, index, created_at, index in sampled)


def _pending_rows(pending: int) -> Iterator[_Row]:
    rng = random.Random(2)
    for index in range(pending):
        created_at = FIRST_CREATED_AT + dt.timedelta(seconds=2 * index)
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        yield _new_task(task_id, index, TaskStatus.PENDING, created_at)


def _new_task(
    task_id: str, index: int, status: TaskStatus, created_at: dt.datetime
) -> _Row:
    """Return a task that was created as ``status`` and has not run."""
    task = {
        **_task_defaults(task_id, index, created_at),
        "status": status,
        "progress": 0.0,
        "attempts": 0,
        "updated_at": created_at,
    }
    reason = "created" if status == TaskStatus.PENDING else "created held until started"
    event_row = _event(task_id, None, status, created_at, reason)
    return _Row(task, event_row)


def _finished_task(
    task_id: str, index: int, created_at: dt.datetime, sampled: bool
) -> _Row:
    started_at = created_at + dt.timedelta(milliseconds=50)
    finished_at = started_at + dt.timedelta(milliseconds=200)
    task = {
        **_task_defaults(task_id, index, created_at),
        "status": TaskStatus.FINISHED,
        "result": {"items": index % 1000, "skipped": 0},
        "progress": 100.0,
        "attempts": 1,
        "owner": OWNER,
        "heartbeat_at": started_at,
        "started_at": started_at,
        "finished_at": finished_at,
        "updated_at": finished_at,
    }
    event_row = _event(
        task_id, TaskStatus.RUNNING, TaskStatus.FINISHED, finished_at, "finished"
    )
    return _Row(task, event_row, sampled)


def _task_defaults(task_id: str, index: int, created_at: dt.datetime) -> dict[str, Any]:
    # executemany() needs every row to bind the same columns.
    return {
        "id": task_id,
        "name": NoOp.name,
        "params": {"reports": 0, "batch": index % 500},
        "result": None,
        "error": None,
        "message": None,
        "checkpoint": None,
        "recoveries": 0,
        "failures": 0,
        "control": None,
        "owner": None,
        "lease_expires_at": None,
        "heartbeat_at": None,
        "run_after": None,
        "created_at": created_at,
        "started_at": None,
        "finished_at": None,
    }


def _event(
    task_id: str,
    from_status: TaskStatus | None,
    to_status: TaskStatus,
    at: dt.datetime,
    reason: str,
) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "from_status": from_status,
        "to_status": to_status,
        "at": at,
        "reason": reason,
        "kind": "transition",
    }


def _check_counts(path: Path, expected: dict[str, int]) -> None:
    expected = {status: count for status, count in expected.items() if count}
    with closing(sqlite3.connect(path)) as connection:
        counts = dict(
            connection.execute("SELECT status, count(*) FROM tasks GROUP BY status")
        )
        (events,) = connection.execute("SELECT count(*) FROM task_events").fetchone()
    if counts != expected or events != sum(expected.values()):
        raise RuntimeError(
            f"{path} contains tasks {counts} and {events} history rows; expected "
            f"{expected} and one history row per task."
        )


BENCHMARK = Benchmark(
    name="scale",
    description="startup, memory and reads with 1,000,000 finished tasks",
    sizes={"finished": 1_000_000, "paused": 10_000, "pending": 100_000, "reads": 1000},
    quick_sizes={"finished": 2000, "paused": 20, "pending": 1000, "reads": 50},
    measure=measure,
)
