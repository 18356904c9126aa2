"""SIGTERM during a deploy: the server suspends its runs, exits, and a new one continues."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from taskmill import Database, TaskStatus
from taskmill.models import BackgroundTaskModel
from tests.conftest import ServerProcess, eventually, read_row
from tests.tasks import ledger_steps

MakeServer = Callable[..., ServerProcess]
GRACE = 2.0


def count_running(database: Database) -> int:
    with database.read() as session:
        count: int = session.execute(
            select(func.count())
            .select_from(BackgroundTaskModel)
            .where(BackgroundTaskModel.status == TaskStatus.RUNNING)
        ).scalar_one()
        return count


def event_reasons(server: ServerProcess, task_id: str) -> list[str]:
    events = server.client.get(f"/tasks/{task_id}/events").json()
    return [event["reason"] for event in events]


def wait_for(server: ServerProcess, task_id: str, status: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        info: dict[str, Any] = server.client.get(f"/tasks/{task_id}").json()
        return info if info["status"] == status else None

    found: dict[str, Any] = eventually(reached, timeout=30, interval=0.05)
    return found


@pytest.mark.e2e
def test_sigterm_mid_run_continues_after_restart(
    make_server: MakeServer, database: Database
) -> None:
    server = make_server(TASKMILL_TEST_GRACE=str(GRACE))
    params = {"n": 10, "step_s": 0.3}
    task_id = server.client.post("/tasks", json={"name": "step", "params": params})
    task_id = task_id.json()["id"]
    eventually(lambda: server.client.get(f"/tasks/{task_id}").json()["progress"] >= 20)

    elapsed = server.term(timeout=GRACE + 10)

    assert elapsed < GRACE + 3, f"exit took {elapsed:.1f} s"
    row = read_row(database, task_id)
    assert row["status"] == "PENDING", row
    assert row["owner"] is None
    assert row["lease_expires_at"] is None
    assert count_running(database) == 0
    steps = ledger_steps(database, task_id)
    assert row["progress"] == 10 * len(steps), (row["progress"], steps)
    assert row["checkpoint"] == {"step": len(steps)}
    log = server.log()
    for complaint in ("engine closed", "connection closed", "Traceback"):
        assert complaint not in log, log

    server.restart()
    reasons = event_reasons(server, task_id)
    suspended = [r for r in reasons if r.startswith("suspended")]
    assert len(suspended) == 1, reasons
    assert "shut down" in suspended[0]
    finished = wait_for(server, task_id, "FINISHED")
    assert finished["result"] == {"sum": 55}
    assert finished["recoveries"] == 0
    assert finished["failures"] == 0
    assert ledger_steps(database, task_id) == list(range(1, 11))


@pytest.mark.e2e
def test_sigterm_during_blocking_step(
    make_server: MakeServer, database: Database
) -> None:
    grace = 1.0
    server = make_server(TASKMILL_TEST_GRACE=str(grace))
    response = server.client.post(
        "/tasks", json={"name": "blocking", "params": {"seconds": 4}}
    )
    task_id = response.json()["id"]
    wait_for(server, task_id, "RUNNING")

    # The hook never reaches a checkpoint: the grace bounds the exit.
    elapsed = server.term(timeout=grace + 10)

    assert elapsed < grace + 3, f"exit took {elapsed:.1f} s"
    row = read_row(database, task_id)
    assert row["status"] == "PENDING", row
    assert row["recoveries"] == 1
    assert row["failures"] == 0
    server.restart()
    finished = wait_for(server, task_id, "FINISHED")
    assert finished["attempts"] == 2
    assert finished["recoveries"] == 1
