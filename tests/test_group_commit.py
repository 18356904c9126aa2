"""Writes that wait for the manager's database thread share one transaction."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg.errors
import pytest
from pydantic import BaseModel
from sqlalchemy import event, select, text

from taskmill import BaseTask, Database, TaskManager, TaskStatus
from taskmill.models import TaskEventModel
from tests.conftest import eventually, read_event_reasons, read_row
from tests.tasks import BlockingTask, NoOp
from tests.test_faults import hold_write_lock

S = TaskStatus
MakeManager = Callable[..., TaskManager]


def skip_unless_sqlite(manager: TaskManager) -> None:
    if manager.database.dialect != "sqlite":
        pytest.skip("on PostgreSQL, create() writes on its caller's thread")


def count_commits(database: Database) -> list[int]:
    """Count the commits of write transactions on the database from now on."""
    commits: list[int] = []

    @event.listens_for(database.engine, "before_cursor_execute")
    def note_write(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            conn.info["wrote"] = True

    @event.listens_for(database.engine, "commit")
    def counted(connection: Any) -> None:
        if connection.info.pop("wrote", False):
            commits.append(1)

    return commits


def test_waiting_creates_share_commit(
    make_manager: MakeManager, database_url: str, database: Database
) -> None:
    # Long intervals: no poll or lease renewal writes during the test.
    manager = make_manager(NoOp, poll_interval=60.0, lease_duration=300.0)
    skip_unless_sqlite(manager)
    time.sleep(0.2)
    commits = count_commits(manager.database)
    created: list[str] = []

    def create() -> None:
        created.append(manager.create("noop", start=False).id)

    with hold_write_lock(database_url):
        first = threading.Thread(target=create)
        first.start()
        # The lock holds up the write of the first create, and the next four
        # queue behind it meanwhile.
        time.sleep(0.3)
        others = [threading.Thread(target=create) for _ in range(4)]
        for thread in others:
            thread.start()
        time.sleep(0.3)
        assert not created, "a create returned before its commit"
    for thread in [first, *others]:
        thread.join(timeout=10)
    assert len(created) == 5
    assert len(commits) == 2
    for task_id in created:
        assert read_row(database, task_id)["status"] == S.PAUSED
        assert read_event_reasons(database, task_id) == ["created held until started"]


def record_transactions(database: Database) -> list[list[str]]:
    """Record the statements of each write transaction committed from now on."""
    transactions: list[list[str]] = []

    @event.listens_for(database.engine, "before_cursor_execute")
    def note(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        conn.info.setdefault("statements", []).append(statement)

    @event.listens_for(database.engine, "commit")
    def committed(connection: Any) -> None:
        statements = connection.info.pop("statements", [])
        if any(s.lstrip().upper().startswith(("INSERT", "UPDATE")) for s in statements):
            transactions.append(statements)

    return transactions


def test_new_task_claimed_in_its_create_commit(
    make_manager: MakeManager, database: Database
) -> None:
    manager = make_manager(NoOp, poll_interval=60.0, lease_duration=300.0)
    skip_unless_sqlite(manager)
    time.sleep(0.2)
    transactions = record_transactions(manager.database)
    task = manager.create("noop")
    assert task.status == S.PENDING
    manager.wait(task.id, {S.FINISHED})
    # A worker was free, so the transaction that stored the task claimed it.
    [stored] = [t for t in transactions if any("INSERT INTO tasks " in s for s in t)]
    claims = [s for s in stored if s.startswith("UPDATE tasks") and "attempts" in s]
    assert len(claims) == 1
    reasons = read_event_reasons(database, task.id)
    assert reasons == ["created", f"claimed by {manager.runner_id}", "finished"]


def test_ending_run_hands_its_worker_to_next_task(
    make_manager: MakeManager, database: Database
) -> None:
    manager = make_manager(
        BlockingTask, NoOp, max_workers=1, poll_interval=60.0, lease_duration=300.0
    )
    first = manager.create("blocking", {"seconds": 0.5})
    manager.wait(first.id, {S.RUNNING})
    # The only worker is busy, so these wait in the queue.
    queued = [manager.create("noop").id for _ in range(4)]
    transactions = record_transactions(manager.database)
    for task_id in queued:
        manager.wait(task_id, {S.FINISHED})

    def ends_and_claims(statements: list[str]) -> bool:
        # An outcome's UPDATE checks the owner; a claim's adds one to attempts.
        ends = [s for s in statements if "tasks.owner = " in s]
        claims = [s for s in statements if "tasks.attempts + " in s]
        return len(ends) == 1 and len(claims) == 1

    # Each outcome but the last claimed the next task in its own transaction.
    assert sum(ends_and_claims(t) for t in transactions) == 4
    # The history lists the handover in order: a run ends, then the next starts.
    ended = [first.id, *queued]
    with database.read() as session:
        rows = session.execute(
            select(TaskEventModel.task_id, TaskEventModel.to_status)
            .where(TaskEventModel.task_id.in_(ended))
            .where(TaskEventModel.to_status != S.PENDING)
            .order_by(TaskEventModel.id)
        ).all()
    expected = [
        (task_id, status) for task_id in ended for status in (S.RUNNING, S.FINISHED)
    ]
    assert [tuple(row) for row in rows] == expected


def not_storable(database: Database, task_id: str) -> Exception:
    """The error of a driver that rejects a statement, unlike a full disk, for good."""
    message = f"rejected the outcome of {task_id}"
    if database.dialect == "sqlite":
        return sqlite3.IntegrityError(message)
    return psycopg.errors.CheckViolation(message)


def test_unstorable_outcome_fails_alone(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    manager = make_manager(BlockingTask, max_workers=3)
    tasks = [manager.create("blocking", {"seconds": 0.3}).id for _ in range(3)]
    eventually(lambda: all(manager.get(t).status == S.RUNNING for t in tasks))
    bad = tasks[1]

    @event.listens_for(manager.database.engine, "before_cursor_execute")
    def reject(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        for values in getattr(context, "compiled_parameters", None) or []:
            if values.get("p_id") == bad and values.get("p_status") == S.FINISHED:
                raise not_storable(manager.database, bad)

    # While the database thread is held, the three runs end and their
    # outcomes wait together for its next write.
    caplog.set_level(logging.INFO, logger="taskmill.manager")
    gate = threading.Event()
    assert manager._executor is not None
    manager._executor.submit(gate.wait, 10)
    time.sleep(0.6)
    gate.set()
    ended = {t: manager.wait(t, timeout=10) for t in tasks}
    assert ended[bad].status == S.FAILED
    error = ended[bad].error
    assert error is not None
    assert error.phase == "record"
    assert f"rejected the outcome of {bad}" in error.message
    for task_id in tasks:
        if task_id != bad:
            assert ended[task_id].status == S.FINISHED
            assert ended[task_id].result == "done"
    eventually(lambda: not manager.live_task_ids() & set(tasks))
    batch_failures = [
        r for r in caplog.records if getattr(r, "event", "") == "manager.batch_failed"
    ]
    assert len(batch_failures) == 1
    assert "3 outcomes" in batch_failures[0].getMessage()


def test_create_inside_write_fails_fast(make_manager: MakeManager) -> None:
    # As in a checkpoint's effects: the thread's own write is open, and the
    # database thread would wait for it while the create waited for that thread.
    manager = make_manager(NoOp)
    errors: list[BaseException] = []

    def create_inside_a_write() -> None:
        with manager.database.write():
            try:
                manager.create("noop")
            except RuntimeError as exc:
                errors.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=create_inside_a_write)
    thread.start()
    thread.join(timeout=10)
    assert time.monotonic() - started < 5
    assert len(errors) == 1
    assert "already open on this thread" in str(errors[0])
    assert manager.list() == []


@pytest.mark.parametrize("producers", [1, 4])
def test_tasks_finish_with_history(
    make_manager: MakeManager, database: Database, producers: int
) -> None:
    manager = make_manager(NoOp, max_workers=4)
    created: list[str] = []
    lock = threading.Lock()

    def produce() -> None:
        for _ in range(40 // producers):
            task_id = manager.create("noop").id
            with lock:
                created.append(task_id)

    threads = [threading.Thread(target=produce) for _ in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(created) == 40
    eventually(lambda: not manager.live_task_ids())
    for task_id in created:
        assert read_row(database, task_id)["status"] == S.FINISHED
        reasons = read_event_reasons(database, task_id)
        assert reasons[0] == "created"
        assert reasons[1].startswith("claimed by ")
        assert reasons[2:] == ["finished"]


class ThreadSleepParams(BaseModel):
    seconds: float


class AsyncThreadSleep(BaseTask[ThreadSleepParams]):
    """An async task that waits for a blocking call on a thread."""

    name = "async_thread_sleep"
    params_model = ThreadSleepParams

    async def pre(self) -> None:
        pass

    async def run(self) -> None:
        await asyncio.to_thread(time.sleep, self.params.seconds)

    async def post(self) -> None:
        pass


def test_to_thread_in_hook_leaves_creates_alone(make_manager: MakeManager) -> None:
    manager = make_manager(AsyncThreadSleep, NoOp)
    sleeper = manager.create("async_thread_sleep", {"seconds": 5.0})
    manager.wait(sleeper.id, {S.RUNNING})
    time.sleep(0.2)
    started = time.monotonic()
    task = manager.create("noop")
    # Far less than the 5 s that the hook's thread sleeps.
    assert time.monotonic() - started < 2.5
    assert manager.wait(task.id, timeout=2.5).status == S.FINISHED
    assert manager.get(sleeper.id).status == S.RUNNING


@contextmanager
def row_locked(url: str, task_id: str) -> Iterator[None]:
    """Hold a lock on the task's row, from another connection, inside the block."""
    locker = Database(url)
    try:
        with locker.write() as session:
            session.execute(
                text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": task_id}
            )
            yield
    finally:
        locker.dispose()


@pytest.mark.postgresql
def test_row_lock_holds_up_no_create(
    make_postgres_manager: MakeManager, postgres_url: str
) -> None:
    manager = make_postgres_manager(
        BlockingTask, NoOp, url=Database(postgres_url, busy_timeout=5.0)
    )
    task = manager.create("blocking", {"seconds": 0.3})
    manager.wait(task.id, {S.RUNNING})
    with row_locked(postgres_url, task.id):
        # The run ends, and its outcome waits for the lock on the database
        # thread; new tasks are stored all the same.
        time.sleep(0.5)
        started = time.monotonic()
        created = [manager.create("noop", start=False).id for _ in range(3)]
        batch = manager.create_many("noop", [{}, {}], start=False)
        # Well under the 5 s that the outcome waits for the lock.
        assert time.monotonic() - started < 2.5
        assert manager.get(task.id).status == S.RUNNING
    assert len(created) == 3
    assert len(batch) == 2
    assert manager.wait(task.id, timeout=10).status == S.FINISHED


@pytest.mark.postgresql
def test_row_lock_fails_only_its_write(
    make_postgres_manager: MakeManager, postgres_url: str
) -> None:
    manager = make_postgres_manager(
        BlockingTask, NoOp, url=Database(postgres_url, busy_timeout=1.0)
    )
    task = manager.create("blocking", {"seconds": 0.5})
    manager.wait(task.id, {S.RUNNING})
    gate = threading.Event()
    created: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            created.append(manager.create("noop", start=False).id)
        except Exception as exc:
            errors.append(exc)

    with row_locked(postgres_url, task.id):
        # Hold the database thread while the run ends, so that its outcome
        # waits for the lock in a transaction. The creates write on their
        # own threads meanwhile.
        assert manager._executor is not None
        manager._executor.submit(gate.wait, 10)
        time.sleep(0.8)
        threads = [threading.Thread(target=create) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        gate.set()
        for thread in threads:
            thread.join(timeout=10)
    # The outcome waited for the row lock and failed; the creates did not.
    assert errors == []
    assert len(created) == 3
    assert manager.wait(task.id, timeout=10).status == S.FINISHED
