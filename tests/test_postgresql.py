"""What taskmill does on PostgreSQL beyond what both backends share.

Claims that skip each other's locked rows, notifications that wake idle
runners and carry requests, and text that PostgreSQL would reject. The tests
here that both backends can run take ``database_url``; the others take
``postgres_url``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from taskmill import (
    BaseTask,
    Database,
    NoParams,
    TaskManager,
    TaskStatus,
    create_router,
    crud,
)
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
        held = crud.claim_due(session, owner="runner-a", **claim)
        assert [task.id for task in held] == ids[:1]
        # The first transaction is still open and holds its row's lock: the
        # second runner takes the next task at once instead of waiting.
        started = time.monotonic()
        with second.write() as other:
            other.execute(text("SET LOCAL lock_timeout = '2s'"))
            taken = crud.claim_due(other, owner="runner-b", **claim)
        waited = time.monotonic() - started
    assert [task.id for task in taken] == ids[1:2]
    assert waited < 2
    with first.read() as session:
        owners = {task.id: task.owner for task in crud.list_tasks(session)}
    assert owners == {ids[0]: "runner-a", ids[1]: "runner-b", ids[2]: None}


@pytest.mark.postgresql
def test_notifications_wake_an_idle_runner_and_carry_requests(
    make_manager: MakeManager, postgres_url: str
) -> None:
    # Polls far apart: only a notification explains a quick start or pause.
    runner = make_manager(
        Countdown,
        url=postgres_url,
        poll_interval=60.0,
        progress_interval=60.0,
    )
    web = make_manager(Countdown, url=postgres_url, max_workers=0)
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
    make_manager: MakeManager, postgres_url: str
) -> None:
    runner = make_manager(Countdown, url=postgres_url, poll_interval=60.0)
    web = make_manager(Countdown, url=postgres_url, max_workers=0)

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
