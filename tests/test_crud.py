from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event, select, text

from taskmill import Database, InvalidTransition, TaskNotFound, TaskStatus, crud
from taskmill.models import TaskEventModel
from taskmill.status import ControlRequest

S = TaskStatus


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.create_schema()
    yield database
    database.dispose()


@pytest.fixture
def sqlite_database(sqlite_url: str) -> Iterator[Database]:
    database = Database(sqlite_url)
    database.create_schema()
    yield database
    database.dispose()


def make_task(database: Database, status: TaskStatus = S.PENDING) -> str:
    with database.write() as session:
        return crud.create_task(session, name="job", params={"n": 1}, status=status).id


def claim(database: Database, task_id: str, owner: str = "r1") -> crud.RunToken:
    with database.write() as session:
        task = crud.claim_task(session, task_id, owner, reason="claimed", lease=60)
    assert task is not None
    return crud.RunToken(owner, task.attempts)


def events(database: Database, task_id: str) -> list[tuple[object, object]]:
    with database.read() as session:
        return [
            (e.from_status, e.to_status) for e in crud.list_events(session, task_id)
        ]


def test_create_task_stores_row_and_event(database: Database) -> None:
    task_id = make_task(database)
    with database.read() as session:
        task = crud.get_task(session, task_id)
    assert task.status == S.PENDING
    assert task.params == {"n": 1}
    assert task.attempts == 0
    assert task.progress == 0.0
    assert events(database, task_id) == [(None, S.PENDING)]


def test_create_task_held(database: Database) -> None:
    task_id = make_task(database, S.PAUSED)
    assert events(database, task_id) == [(None, S.PAUSED)]


def test_create_task_rejects_running(database: Database) -> None:
    with pytest.raises(ValueError, match="RUNNING"), database.write() as session:
        crud.create_task(session, name="job", params={}, status=S.RUNNING)


def test_timestamps_are_aware_utc(database: Database) -> None:
    task_id = make_task(database)
    with database.read() as session:
        task = crud.get_task(session, task_id)
    assert task.created_at.tzinfo is dt.UTC
    assert abs(dt.datetime.now(dt.UTC) - task.created_at) < dt.timedelta(seconds=10)


def test_sqlite_runs_in_wal_mode(sqlite_database: Database) -> None:
    with sqlite_database.read() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA busy_timeout")).scalar() == 30000


def test_get_task_unknown_id(database: Database) -> None:
    with pytest.raises(TaskNotFound, match="'nope'"), database.read() as session:
        crud.get_task(session, "nope")


def test_list_tasks_newest_first_with_filters(database: Database) -> None:
    ids = [make_task(database) for _ in range(5)]
    with database.write() as session:
        crud.create_task(session, name="other", params={})
        crud.change_status(session, ids[0], S.PAUSED, reason="test")
    with database.read() as session:
        newest = crud.list_tasks(session, name="job")
        paused = crud.list_tasks(session, statuses=[S.PAUSED])
        page = crud.list_tasks(session, name="job", limit=2, offset=1)
        both = crud.list_tasks(session, statuses=[S.PAUSED, S.PENDING])
    assert [t.id for t in newest] == ids[::-1]
    assert [t.id for t in paused] == [ids[0]]
    assert [t.id for t in page] == ids[::-1][1:3]
    assert len(both) == 6


def test_list_events_unknown_task(database: Database) -> None:
    with pytest.raises(TaskNotFound), database.read() as session:
        crud.list_events(session, "nope")


def test_change_status_writes_history_row(database: Database) -> None:
    task_id = make_task(database)
    with database.write() as session:
        task = crud.change_status(session, task_id, S.PAUSED, reason="held")
    assert task.status == S.PAUSED
    with database.read() as session:
        last = session.scalars(
            select(TaskEventModel).order_by(TaskEventModel.id.desc()).limit(1)
        ).one()
    assert (last.from_status, last.to_status, last.reason) == (
        S.PENDING,
        S.PAUSED,
        "held",
    )


def test_change_status_rejects_transition_outside_table(database: Database) -> None:
    task_id = make_task(database)
    with (
        pytest.raises(InvalidTransition, match="FINISHED"),
        database.write() as session,
    ):
        crud.change_status(session, task_id, S.FINISHED, reason="no")
    with database.read() as session:
        assert crud.get_task(session, task_id).status == S.PENDING
    assert events(database, task_id) == [(None, S.PENDING)]


def test_status_and_history_roll_back_together(database: Database) -> None:
    task_id = make_task(database)
    with pytest.raises(RuntimeError), database.write() as session:
        crud.change_status(session, task_id, S.PAUSED, reason="held")
        raise RuntimeError("abort the transaction")
    with database.read() as session:
        assert crud.get_task(session, task_id).status == S.PENDING
    assert events(database, task_id) == [(None, S.PENDING)]


def test_claim_task_once(database: Database) -> None:
    task_id = make_task(database)
    token = claim(database, task_id)
    with database.write() as session:
        second = crud.claim_task(session, task_id, "r2", reason="claimed", lease=60)
        task = crud.get_task(session, task_id)
    assert second is None
    assert token == crud.RunToken("r1", 1)
    assert task.status == S.RUNNING
    assert task.owner == "r1"
    assert task.started_at is not None


def test_claim_skips_paused_task(database: Database) -> None:
    task_id = make_task(database, S.PAUSED)
    with database.write() as session:
        assert (
            crud.claim_task(session, task_id, "r1", reason="claimed", lease=60) is None
        )


def test_save_checkpoint_returns_pending_request(database: Database) -> None:
    task_id = make_task(database)
    token = claim(database, task_id)
    with database.write() as session:
        first = crud.save_checkpoint(
            session, task_id, token, checkpoint={"i": 1}, progress=10, message="one"
        )
        crud.set_control(session, task_id, ControlRequest.PAUSE)
    with database.write() as session:
        second = crud.save_checkpoint(
            session, task_id, token, checkpoint={"i": 2}, progress=20, message="two"
        )
        task = crud.get_task(session, task_id)
    assert first is None
    assert second == ControlRequest.PAUSE
    assert (task.checkpoint, task.progress, task.message) == ({"i": 2}, 20, "two")


def test_writes_of_a_lost_run_are_rejected(database: Database) -> None:
    task_id = make_task(database)
    stale = claim(database, task_id)
    with database.write() as session:
        crud.change_status(session, task_id, S.PENDING, reason="recovered")
    claim(database, task_id, owner="r2")
    with pytest.raises(crud.RunLost), database.write() as session:
        crud.save_checkpoint(
            session, task_id, stale, checkpoint={}, progress=50, message=None
        )
    with pytest.raises(crud.RunLost), database.write() as session:
        crud.change_status(session, task_id, S.FINISHED, reason="late", run=stale)
    with database.write() as session:
        crud.save_progress(session, [(task_id, stale, 99.0, "stale")])
    with database.read() as session:
        task = crud.get_task(session, task_id)
    assert task.status == S.RUNNING
    assert task.owner == "r2"
    assert task.progress == 0.0


def test_save_progress_of_several_runs(database: Database) -> None:
    first, second = make_task(database), make_task(database)
    tokens = [claim(database, first), claim(database, second)]
    with database.write() as session:
        crud.save_progress(
            session, [(first, tokens[0], 25.0, "a"), (second, tokens[1], 75.0, None)]
        )
    with database.read() as session:
        assert crud.get_task(session, first).progress == 25.0
        assert crud.get_task(session, second).progress == 75.0


def test_record_result_and_error(database: Database) -> None:
    done, failed = make_task(database), make_task(database)
    for task_id in (done, failed):
        claim(database, task_id)
    error = {"type": "ValueError", "message": "bad", "traceback": "tb", "phase": "run"}
    with database.write() as session:
        crud.change_status(
            session, done, S.FINISHED, reason="ok", values={"result": [1, 2]}
        )
        crud.change_status(
            session, failed, S.FAILED, reason="bad", values={"error": error}
        )
    with database.read() as session:
        assert crud.get_task(session, done).result == [1, 2]
        assert crud.get_task(session, failed).error == error
        assert crud.get_task(session, failed).result is None


def test_get_controls(database: Database) -> None:
    first, second = make_task(database), make_task(database)
    with database.write() as session:
        crud.set_control(session, first, ControlRequest.STOP)
    with database.read() as session:
        assert crud.get_controls(session, [first, second]) == {
            first: ControlRequest.STOP
        }
        assert crud.get_controls(session, []) == {}


def test_list_unfinished_ignores_terminal(database: Database) -> None:
    pending, paused, done = (
        make_task(database),
        make_task(database, S.PAUSED),
        make_task(database),
    )
    claim(database, done)
    with database.write() as session:
        crud.change_status(session, done, S.FINISHED, reason="ok")
    with database.read() as session:
        rows = crud.list_unfinished(session)
    assert rows == [(pending, "job", S.PENDING), (paused, "job", S.PAUSED)]


def test_write_transactions_begin_immediate(sqlite_database: Database) -> None:
    statements: list[str] = []

    @event.listens_for(sqlite_database.engine, "before_cursor_execute")
    def record(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        statements.append(statement)

    make_task(sqlite_database)
    with sqlite_database.read() as session:
        crud.list_tasks(session)
    assert "BEGIN IMMEDIATE" in statements
    assert statements.count("BEGIN") == 1


def test_concurrent_status_changes_wait_for_each_other(
    database: Database, database_url: str
) -> None:
    """A second writer of a task waits for the first and reads its change.

    SQLite makes it wait at BEGIN IMMEDIATE; on PostgreSQL it waits for the
    row lock of the first writer's SELECT ... FOR UPDATE. Without the wait, it
    would read PENDING and write a history that forks.
    """
    other = Database(database_url)
    task_id = make_task(database)
    errors: list[Exception] = []

    def stop() -> None:
        try:
            with other.write() as session:
                crud.change_status(session, task_id, S.STOPPED, reason="stopped")
        except Exception as exc:
            errors.append(exc)

    stopper = threading.Thread(target=stop)
    try:
        with database.write() as session:
            crud.change_status(session, task_id, S.PAUSED, reason="held")
            stopper.start()
            time.sleep(0.3)
            waited = stopper.is_alive()
        stopper.join(timeout=10)
    finally:
        other.dispose()
    assert not stopper.is_alive()
    assert errors == []
    assert waited
    assert events(database, task_id) == [
        (None, S.PENDING),
        (S.PENDING, S.PAUSED),
        (S.PAUSED, S.STOPPED),
    ]
