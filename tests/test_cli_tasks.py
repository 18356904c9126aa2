"""Tests of ``taskmill tasks`` and of the dashboard that ``taskmill serve`` shows.

The commands run in this process through typer's CliRunner, against real
SQLite files; ``watch`` under Ctrl-C and ``serve`` run as subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

from taskmill import TaskManager, TaskStatus
from taskmill.cli import SERVE_CONNECTION_GRACE, _serve_banner, app
from taskmill.cli_tasks import EXIT_INTERRUPTED
from taskmill.examples import Countdown
from tests.conftest import eventually, free_port
from tests.tasks import StepTask
from tests.test_cli import PROCESS_SLACK, CliProcess

INSTANT = {"seconds": 0, "steps": 1}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, ["tasks", *args], env=env)


@pytest.fixture
def store(database_url: str) -> Iterator[TaskManager]:
    """A manager that stores tasks in the test's database but runs none."""
    manager = TaskManager(database_url, max_workers=0)
    manager.register(Countdown)
    manager.register(StepTask)
    manager.startup()
    yield manager
    manager.shutdown()


@pytest.fixture
def runner(make_manager: Callable[..., TaskManager]) -> TaskManager:
    """A manager that runs tasks in this process."""
    return make_manager(Countdown, StepTask)


# -- list --


def test_list_shows_tasks_newest_first(store: TaskManager, database_url: str) -> None:
    first = store.create("countdown", INSTANT, start=False)
    second = store.create("step", {"n": 2})
    result = invoke("list", "--db", database_url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "ID", "NAME", "STATUS", "PROGRESS", "CREATED", "MESSAGE",
    ]  # fmt: skip
    assert lines[1].split()[:3] == [second.id, "step", "PENDING"]
    assert lines[2].split()[:3] == [first.id, "countdown", "PAUSED"]
    assert "0.0 %" in lines[2]


def test_list_filters_by_status_and_name(store: TaskManager, database_url: str) -> None:
    held = store.create("countdown", INSTANT, start=False)
    pending = store.create("countdown", INSTANT)
    step = store.create("step", {"n": 2}, start=False)

    by_status = invoke("list", "--status", "paused", "--db", database_url)
    assert held.id in by_status.output
    assert step.id in by_status.output
    assert pending.id not in by_status.output

    by_name = invoke(
        "list", "--name", "step", "--status", "PENDING", "--db", database_url
    )
    assert by_name.exit_code == 0
    assert by_name.output.strip() == "No tasks match."


def test_list_json_matches_http_api_fields(
    store: TaskManager, database_url: str
) -> None:
    task = store.create("countdown", INSTANT, start=False)
    result = invoke("list", "--json", "--db", database_url)
    assert result.exit_code == 0, result.output
    [listed] = json.loads(result.output)
    assert listed["id"] == task.id
    assert listed["status"] == "PAUSED"
    assert listed["allowed_actions"] == ["start", "resume", "stop"]


def test_list_reads_database_from_environment(
    store: TaskManager, database_url: str
) -> None:
    task = store.create("countdown", INSTANT, start=False)
    result = invoke("list", env={"TASKMILL_DATABASE_URL": database_url})
    assert result.exit_code == 0, result.output
    assert task.id in result.output


def test_list_rejects_unknown_status(database_url: str) -> None:
    result = invoke("list", "--status", "DONE", "--db", database_url)
    assert result.exit_code == 2
    assert "Invalid value for '--status'" in result.output


# -- show --


def test_show_prints_details_and_history(
    runner: TaskManager, database_url: str
) -> None:
    task = runner.create("step", {"n": 3, "step_s": 0, "fail_step": 2})
    runner.wait(task.id)
    result = invoke("show", task.id, "--db", database_url)
    assert result.exit_code == 0, result.output
    output = result.output
    assert f"step {task.id}" in output
    assert "FAILED" in output
    assert "ValueError: boom at 2 (in run)" in output
    assert "Traceback" in output
    assert 'raise ValueError(f"boom at {step}")' in output
    assert "PENDING -> RUNNING" in output
    assert "RUNNING -> FAILED" in output


def test_show_json_includes_history(store: TaskManager, database_url: str) -> None:
    task = store.create("countdown", INSTANT, start=False)
    result = invoke("show", task.id, "--json", "--db", database_url)
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["id"] == task.id
    assert [event["to_status"] for event in body["history"]] == ["PAUSED"]


def test_show_unknown_task_exits_1(store: TaskManager, database_url: str) -> None:
    result = invoke("show", "no-such-id", "--db", database_url)
    assert result.exit_code == 1
    assert result.output.strip() == "Error: Task 'no-such-id' not found."


# -- actions --


@pytest.mark.parametrize("action", ["start", "resume"])
def test_start_or_resume_queues_held_task(
    store: TaskManager, database_url: str, action: str
) -> None:
    task = store.create("countdown", INSTANT, start=False)
    result = invoke(action, task.id, "--db", database_url)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"Task {task.id} (countdown) is now PENDING."
    # The command stores the request; it runs no task itself.
    time.sleep(0.3)
    assert store.get(task.id).status == TaskStatus.PENDING


def test_pause_and_stop_pending_task(store: TaskManager, database_url: str) -> None:
    task = store.create("countdown", INSTANT)
    assert invoke("pause", task.id, "--db", database_url).exit_code == 0
    assert store.get(task.id).status == TaskStatus.PAUSED
    result = invoke("stop", task.id, "--db", database_url)
    assert result.exit_code == 0, result.output
    assert "is now STOPPED" in result.output
    assert store.get(task.id).status == TaskStatus.STOPPED


def test_pause_running_task_reports_pending_request(
    runner: TaskManager, database_url: str
) -> None:
    task = runner.create("countdown", {"seconds": 5, "steps": 50})
    eventually(lambda: runner.get(task.id).status == TaskStatus.RUNNING)
    result = invoke("pause", task.id, "--db", database_url)
    assert result.exit_code == 0, result.output
    assert "is RUNNING; it will pause at its next checkpoint" in result.output
    assert runner.wait(task.id, [TaskStatus.PAUSED], timeout=5).status == "PAUSED"


def test_restart_finished_task(runner: TaskManager, database_url: str) -> None:
    task = runner.create("countdown", INSTANT)
    runner.wait(task.id)
    result = invoke("restart", task.id, "--db", database_url)
    assert result.exit_code == 0, result.output
    assert runner.wait(task.id).attempts == 2


def test_disallowed_action_exits_1(store: TaskManager, database_url: str) -> None:
    task = store.create("countdown", INSTANT, start=False)
    result = invoke("restart", task.id, "--db", database_url)
    assert result.exit_code == 1
    message = result.output.strip()
    assert message.startswith("Error: Cannot restart task")
    assert "it is PAUSED" in message
    assert "Actions allowed now: start, resume, stop." in message
    assert store.get(task.id).status == TaskStatus.PAUSED


@pytest.mark.parametrize("action", ["start", "resume", "pause", "stop", "restart"])
def test_action_on_unknown_task_exits_1(
    store: TaskManager, database_url: str, action: str
) -> None:
    result = invoke(action, "no-such-id", "--db", database_url)
    assert result.exit_code == 1
    assert result.output.strip() == "Error: Task 'no-such-id' not found."


# -- the database --


def test_missing_database_file_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    result = invoke("list", "--db", f"sqlite:///{path}")
    assert result.exit_code == 1
    assert f"Database file {path} does not exist" in result.output
    assert not path.exists()


def test_database_without_tasks_table_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    path.touch()
    result = invoke("list", "--db", f"sqlite:///{path}")
    assert result.exit_code == 1
    assert "has no tasks table" in result.output


def test_unparsable_database_url_exits_1() -> None:
    result = invoke("list", "--db", "garbage")
    assert result.exit_code == 1
    assert "Cannot open database 'garbage'" in result.output


# -- watch --


def test_watch_follows_task_until_finished(
    runner: TaskManager, database_url: str
) -> None:
    task = runner.create("countdown", {"seconds": 0.5, "steps": 5})
    result = invoke("watch", task.id, "--interval", "0.05", "--db", database_url)
    assert result.exit_code == 0, result.output
    assert f"Watching countdown {task.id}" in result.output
    assert "RUNNING -> FINISHED" in result.output
    assert f"Task {task.id} finished; result: " + '{"steps": 5}' in result.output


def test_watch_exits_1_when_task_fails(runner: TaskManager, database_url: str) -> None:
    task = runner.create("step", {"n": 3, "step_s": 0.05, "fail_step": 2})
    result = invoke("watch", task.id, "--interval", "0.05", "--db", database_url)
    assert result.exit_code == 1, result.output
    assert "failed in run: ValueError: boom at 2" in result.output


def test_watch_unknown_task_exits_1(store: TaskManager, database_url: str) -> None:
    result = invoke("watch", "no-such-id", "--db", database_url)
    assert result.exit_code == 1
    assert "Task 'no-such-id' not found." in result.output


def test_watch_exits_cleanly_on_ctrl_c(
    store: TaskManager, database_url: str, tmp_path: Path
) -> None:
    task = store.create("countdown", INSTANT, start=False)
    env = {**os.environ, "TASKMILL_DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"}
    watcher = CliProcess(["tasks", "watch", task.id], tmp_path / "watch.log", env)
    try:
        watcher.wait_for_log("Ctrl-C stops watching")
        watcher.signal(signal.SIGINT)
        assert watcher.wait(timeout=PROCESS_SLACK) == EXIT_INTERRUPTED
    finally:
        watcher.kill()
    log = watcher.log()
    assert "Stopped watching; the task goes on." in log
    assert "Traceback" not in log
    assert store.get(task.id).status == TaskStatus.PAUSED


# -- taskmill serve --


def test_serve_banner_names_dashboard() -> None:
    banner = _serve_banner("sqlite:///./x.db", "127.0.0.1", 8000, 1, 4)
    assert "dashboard at http://127.0.0.1:8000/dashboard" in banner
    ipv6 = _serve_banner("sqlite:///./x.db", "::1", 8000, 1, 4)
    assert "dashboard at http://[::1]:8000/dashboard" in ipv6


@pytest.mark.e2e
def test_serve_stops_with_stream_open(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if "TASKMILL" not in key}
    args = ["serve", "--port", str(port), "--db", database_url]
    server = CliProcess(args, tmp_path / "serve.log", env | {"PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}/dashboard"
        server.wait_for_log(f"dashboard at {url}")
        with httpx.Client(timeout=10) as client:
            eventually(lambda: _is_up(client, url), timeout=20, interval=0.1)
            assert "<title>taskmill</title>" in client.get(url).text
            with client.stream(
                "GET", f"http://127.0.0.1:{port}/tasks/stream"
            ) as stream:
                assert stream.status_code == 200
                started = time.monotonic()
                server.signal(signal.SIGTERM)
                # uvicorn waits for open connections before the app's
                # shutdown: the demo ends its streams on SIGTERM.
                status = server.wait(timeout=SERVE_CONNECTION_GRACE + PROCESS_SLACK)
                elapsed = time.monotonic() - started
    finally:
        server.kill()
    log = server.log()
    # uvicorn ends by raising the signal that it handled.
    assert status == -signal.SIGTERM, log
    assert elapsed < SERVE_CONNECTION_GRACE, log
    assert "Waiting for connections to close" not in log
    assert "Exception in ASGI application" not in log
    assert "Application shutdown complete" in log


def _is_up(client: httpx.Client, url: str) -> Any:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False
