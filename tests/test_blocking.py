"""Blocking code in tasks must not freeze the API, and a blocked loop is reported."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from taskmill import TaskManager, TaskStatus
from tests.conftest import ServerProcess, eventually
from tests.tasks import LoopBlockingTask

MakeManager = Callable[..., TaskManager]
MakeServer = Callable[..., ServerProcess]
S = TaskStatus

#: A bound far above a normal response time on loopback and far below the
#: 4 s blocks below, so a request that waited for a blocked loop exceeds it.
SLOW = 1.0


def timed_get(client: httpx.Client, path: str) -> float:
    started = time.monotonic()
    response = client.get(path)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_blocked_loop_written_to_history(make_manager: MakeManager) -> None:
    manager = make_manager(LoopBlockingTask)
    task = manager.create("async_blocking", {"seconds": 1.8})

    finished = manager.wait(task.id, timeout=10)

    assert finished.status == S.FINISHED
    warnings = [e for e in manager.events(task.id) if e.kind == "warning"]
    assert len(warnings) == 1, warnings
    warning = warnings[0]
    assert warning.reason.startswith("loop_blocked")
    assert "in run() at" in warning.reason
    assert "tasks.py" in warning.reason
    assert "asyncio.to_thread()" in warning.reason
    assert warning.from_status == S.RUNNING
    assert warning.to_status == S.RUNNING
    transitions = [e for e in manager.events(task.id) if e.kind == "transition"]
    assert [e.to_status for e in transitions] == [S.PENDING, S.RUNNING, S.FINISHED]


def test_short_async_waits_leave_no_warning(make_manager: MakeManager) -> None:
    manager = make_manager(LoopBlockingTask)
    task = manager.create("async_blocking", {"seconds": 0.2})

    assert manager.wait(task.id, timeout=10).status == S.FINISHED
    time.sleep(0.5)
    assert all(e.kind == "transition" for e in manager.events(task.id))


@pytest.mark.e2e
def test_blocking_tasks_leave_api_responsive(make_server: MakeServer) -> None:
    server = make_server()
    client = server.client

    created = []
    for name, params in [
        ("blocking", {"seconds": 4}),
        ("async_blocking", {"seconds": 4}),
        ("step", {"n": 40, "step_s": 0.1}),
    ]:
        started = time.monotonic()
        response = client.post("/tasks", json={"name": name, "params": params})
        assert response.status_code == 201, response.text
        assert time.monotonic() - started < SLOW
        created.append(response.json()["id"])
    sync_id, async_id, step_id = created
    eventually(lambda: client.get(f"/tasks/{async_id}").json()["status"] == "RUNNING")

    # Both blocking tasks run now: requests are served from uvicorn's loop
    # and threads, which the tasks do not share.
    durations = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        durations.append(timed_get(client, "/health"))
        durations.append(timed_get(client, f"/tasks/{sync_id}"))
        time.sleep(0.05)
    assert max(durations) < SLOW, durations

    started = time.monotonic()
    paused = client.post(f"/tasks/{step_id}/pause")
    assert paused.status_code == 202, paused.text
    assert time.monotonic() - started < SLOW
    eventually(lambda: client.get(f"/tasks/{step_id}").json()["status"] == "PAUSED")

    def async_finished() -> bool:
        return bool(client.get(f"/tasks/{async_id}").json()["status"] == "FINISHED")

    eventually(async_finished, timeout=15)
    events = client.get(f"/tasks/{async_id}/events").json()
    warnings = [e for e in events if e["kind"] == "warning"]
    assert len(warnings) == 1, events
    assert warnings[0]["reason"].startswith("loop_blocked")
