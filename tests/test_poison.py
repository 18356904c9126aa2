"""A task that kills its server process on every run, under a supervisor that
restarts the server each time it dies.

Each crash is recovered at the next startup and counts as a failed attempt, so
the task ends FAILED after its ``Retry.max_attempts`` instead of crashing the
server forever, and the tasks queued behind it still run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from taskmill import Database
from taskmill.models import BackgroundTaskModel
from tests.conftest import ServerProcess, eventually
from tests.tasks import CrashTask, ledger_steps

pytestmark = pytest.mark.e2e

MakeServer = Callable[..., ServerProcess]

#: Restarts that the supervisor makes at most, twice the crashes expected.
MAX_RESTARTS = 6
#: Seconds that the supervisor runs at most.
SUPERVISE_FOR = 45.0
#: Seconds that the server must stay up once the task has failed.
STAY_UP_FOR = 3.0


def read_status(database: Database, task_id: str) -> str:
    """Read the task's status from the database, with or without a server."""
    with database.read() as session:
        status = session.scalar(
            select(BackgroundTaskModel.status).where(BackgroundTaskModel.id == task_id)
        )
    assert status is not None, f"task {task_id} not found in {database.engine.url}"
    return status


def supervise(server: ServerProcess, database: Database, task_id: str) -> list[int]:
    """Restart the server whenever it died, until the task has ended.

    Returns the exit status of each death. Fails after MAX_RESTARTS restarts
    or SUPERVISE_FOR seconds.
    """
    assert server.process is not None
    exit_codes: list[int] = []
    deadline = time.monotonic() + SUPERVISE_FOR
    while read_status(database, task_id) not in ("FINISHED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, (
            f"task still {read_status(database, task_id)} after "
            f"{SUPERVISE_FOR} s and {len(exit_codes)} restarts\n{server.log()[-3000:]}"
        )
        exit_code = server.process.poll()
        if exit_code is None:
            time.sleep(0.05)
            continue
        exit_codes.append(exit_code)
        assert len(exit_codes) <= MAX_RESTARTS, (
            f"the server died {len(exit_codes)} times: {exit_codes}\n"
            f"{server.log()[-3000:]}"
        )
        server.start()
    return exit_codes


def get_task(server: ServerProcess, task_id: str) -> dict[str, Any]:
    response = server.client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


def test_crashing_task_fails_after_max_attempts(
    make_server: MakeServer, database: Database
) -> None:
    max_attempts = CrashTask.retry.max_attempts
    assert max_attempts == 3
    # One worker, so that the step task waits in the queue behind the crash task.
    server = make_server(TASKMILL_TEST_WORKERS="1", TASKMILL_TEST_POLL="0.2")
    created = server.client.post(
        "/tasks", json={"name": "crash", "params": {"n": 10, "step_s": 0.2}}
    )
    assert created.status_code == 201, created.text
    crash_id = created.json()["id"]
    queued = server.client.post(
        "/tasks", json={"name": "step", "params": {"n": 10, "step_s": 0.02}}
    )
    assert queued.status_code == 201, queued.text
    step_id = queued.json()["id"]

    exit_codes = supervise(server, database, crash_id)
    assert exit_codes == [137] * max_attempts, server.log()[-3000:]

    assert server.process is not None
    stay_up_until = time.monotonic() + STAY_UP_FOR
    while time.monotonic() < stay_up_until:
        assert server.process.poll() is None, server.log()[-3000:]
        time.sleep(0.1)

    crashed = get_task(server, crash_id)
    assert crashed["status"] == "FAILED", crashed
    assert crashed["attempts"] == max_attempts, crashed
    assert crashed["recoveries"] == max_attempts, crashed
    assert crashed["failures"] == max_attempts, crashed
    assert crashed["error"]["type"] == "Interrupted", crashed
    assert (
        "exceeded max attempts (3), last attempt interrupted"
        in crashed["error"]["message"]
    ), crashed

    events = server.client.get(f"/tasks/{crash_id}/events").json()
    claims = [event for event in events if event["to_status"] == "RUNNING"]
    assert len(claims) == max_attempts, events
    recoveries = [e["reason"] for e in events if e["from_status"] == "RUNNING"]
    assert len(recoveries) == max_attempts, events
    for reason in recoveries:
        assert reason.startswith("interrupted: runner "), reason
        assert "its process is gone" in reason, reason
    assert events[-1]["to_status"] == "FAILED", events

    # Each run resumed from the checkpoint of step 1 and crashed in step 2.
    assert ledger_steps(database, crash_id) == [1]

    step = eventually(
        lambda: (task := get_task(server, step_id))["status"] == "FINISHED" and task,
        timeout=10,
    )
    assert step["result"] == {"sum": 55}, step
    assert step["attempts"] == 1, step
    assert ledger_steps(database, step_id) == list(range(1, 11))
