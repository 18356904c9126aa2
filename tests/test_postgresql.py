"""What taskmill does on PostgreSQL beyond what both backends share.

Claims that skip each other's locked rows, notifications that wake idle
runners and carry requests, and text that PostgreSQL would reject. The tests
here that both backends can run take ``database_url``; the others take
``postgres_url``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from taskmill import (
    BaseTask,
    Database,
    NoParams,
    TaskManager,
    TaskStatus,
    create_router,
    crud,
)
from taskmill.database import is_transient
from taskmill.examples import Countdown
from tests.conftest import eventually

MakeManager = Callable[..., TaskManager]
S = TaskStatus


class NulMessage(BaseTask[NoParams]):
    """Reports progress and fails with messages that hold NUL characters."""

    name = "nul_message"

    def pre(self) -> None:
        pass

    def run(self) -> None:
        self.set_progress(1, 2, "half\x00way")
        self.checkpoint({"at": "step\x00one"})
        raise ValueError("bad \x00 byte")

    def post(self) -> None:
        pass


def test_nul_characters_are_stored_or_rejected_cleanly(
    make_manager: MakeManager,
) -> None:
    manager = make_manager(NulMessage)
    task = manager.create("nul_message")
    info = manager.wait(task.id)
    assert info.status == S.FAILED
    assert info.error is not None
    assert info.error.type == "ValueError"
    assert info.error.message in ("bad \x00 byte", "bad \ufffd byte")

    app = FastAPI()
    app.include_router(create_router(manager))
    client = TestClient(app)
    assert client.get("/tasks/ab%00cd").status_code == 404
    assert client.get("/tasks/ab%00cd/events").status_code == 404
    assert client.post("/tasks/ab%00cd/pause").status_code == 404
    response = client.get("/tasks", params={"name": "nul\x00message"})
    assert response.status_code == 200
    assert response.json() == []


@pytest.fixture
def two_databases(postgres_url: str) -> Iterator[tuple[Database, Database]]:
    first, second = Database(postgres_url), Database(postgres_url)
    yield first, second
    first.dispose()
    second.dispose()


@pytest.mark.postgresql
def test_concurrent_claims_skip_locked_rows(
    two_databases: tuple[Database, Database],
) -> None:
    first, second = two_databases
    with first.write() as session:
        ids = [crud.create_task(session, name="job", params={}).id for _ in range(3)]
    claim = {"names": ["job"], "limit": 1, "lease": 60.0, "reason": "claimed"}
    with first.write() as session:
        first_claim = crud.claim_due(session, owner="runner-a", **claim)
        assert [task.id for task in first_claim] == ids[:1]
        # The first transaction is still open and holds its row's lock: the
        # second runner takes the next task at once instead of waiting.
        started = time.monotonic()
        with second.write() as other:
            other.execute(text("SET LOCAL lock_timeout = '2s'"))
            second_claim = crud.claim_due(other, owner="runner-b", **claim)
        waited = time.monotonic() - started
    assert [task.id for task in second_claim] == ids[1:2]
    assert waited < 2
    with first.read() as session:
        owners = {task.id: task.owner for task in crud.list_tasks(session)}
    assert owners == {ids[0]: "runner-a", ids[1]: "runner-b", ids[2]: None}


@pytest.mark.postgresql
def test_notifications_wake_an_idle_runner_and_carry_requests(
    make_postgres_manager: MakeManager,
) -> None:
    # Polls far apart: only a notification explains a quick start or pause.
    runner = make_postgres_manager(
        Countdown, poll_interval=60.0, progress_interval=60.0
    )
    web = make_postgres_manager(Countdown, max_workers=0)
    started = time.monotonic()
    # Steps of 10 s: a pause that waited for the next checkpoint would be late.
    task = web.create("countdown", {"seconds": 30, "steps": 3})
    eventually(lambda: runner.get(task.id).status == S.RUNNING, timeout=5)
    assert time.monotonic() - started < 5
    assert task.id in runner.live_task_ids()

    web.pause(task.id)
    assert web.wait(task.id, [S.PAUSED], timeout=5).status == S.PAUSED
    web.resume(task.id)
    eventually(lambda: runner.get(task.id).status == S.RUNNING, timeout=5)
    web.stop(task.id)
    assert web.wait(task.id, [S.STOPPED], timeout=5).status == S.STOPPED


@pytest.mark.postgresql
def test_listener_reconnects_after_its_connection_is_killed(
    make_postgres_manager: MakeManager,
) -> None:
    runner = make_postgres_manager(Countdown, poll_interval=60.0)
    web = make_postgres_manager(Countdown, max_workers=0)

    def kill_listeners() -> int:
        with web.database.write() as session:
            killed = session.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                )
            ).scalar_one()
        return int(killed)

    eventually(lambda: kill_listeners() == 1, timeout=5)
    # Stored while the listener may still be reconnecting: the listener's
    # first act once it is back is a claim of what it missed.
    task = web.create("countdown", {"seconds": 0, "steps": 1})
    assert runner.wait(task.id, timeout=10).status == S.FINISHED
    # And later notifications arrive again.
    second = web.create("countdown", {"seconds": 0, "steps": 1})
    assert runner.wait(second.id, timeout=10).status == S.FINISHED


def test_updated_at_comes_from_the_database_clock(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock is a minute slow still stamps changes with the database's time."""
    database.upgrade()
    slow = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    monkeypatch.setattr(crud, "utcnow", lambda: slow)
    with database.write() as session:
        task = crud.create_task(session, name="job", params={})
        claimed = crud.claim_task(session, task.id, "runner", reason="claimed", lease=5)
    assert claimed is not None
    now = dt.datetime.now(dt.UTC)
    assert abs((task.updated_at - now).total_seconds()) < 5
    assert abs((claimed.updated_at - now).total_seconds()) < 5
    assert claimed.lease_expires_at is not None
    assert abs((claimed.lease_expires_at - now).total_seconds() - 5) < 5


@pytest.mark.postgresql
def test_lease_renewal_skips_a_locked_row(
    two_databases: tuple[Database, Database],
) -> None:
    first, second = two_databases
    with first.write() as session:
        ids = [crud.create_task(session, name="job", params={}).id for _ in range(2)]
        for task_id in ids:
            crud.claim_task(session, task_id, "runner-a", reason="claimed", lease=5)
    with first.write() as session:
        # Another transaction locks one of the runner's rows, as a slow
        # checkpoint or a person in psql would.
        session.execute(
            text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": ids[0]}
        )
        with second.write() as other:
            other.execute(text("SET LOCAL lock_timeout = '2s'"))
            crud.renew_leases(other, "runner-a", lease=600)
    with first.read() as session:
        leases = {task.id: task.lease_expires_at for task in crud.list_tasks(session)}
    now = dt.datetime.now(dt.UTC)
    assert leases[ids[0]] is not None
    assert leases[ids[1]] is not None
    assert (leases[ids[0]] - now).total_seconds() < 60
    assert (leases[ids[1]] - now).total_seconds() > 500


@pytest.mark.postgresql
def test_lock_wait_fails_as_transient_after_busy_timeout(postgres_url: str) -> None:
    holder, database = Database(postgres_url), Database(postgres_url, busy_timeout=0.5)
    try:
        with holder.write() as session:
            session.execute(text("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            with pytest.raises(OperationalError) as caught:
                with database.write() as other:
                    crud.create_task(other, name="job", params={})
            waited = time.monotonic() - started
        assert is_transient(caught.value)
        assert "lock timeout" in str(caught.value)
        assert waited < 10
    finally:
        holder.dispose()
        database.dispose()
