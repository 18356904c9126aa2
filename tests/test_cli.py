"""Tests of the ``taskmill`` command line.

Option checks run in this process; workers and servers run as subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from taskmill import Database, TaskManager
from taskmill.cli import app
from taskmill.examples import Countdown
from tests.conftest import (
    ROOT,
    eventually,
    free_port,
    read_event_reasons,
    read_row,
)
from tests.tasks import BlockingTask, StepTask, create_ledger, ledger_steps

#: Seconds that a process may take to start, or to exit beyond its grace.
PROCESS_SLACK = 10.0


def test_serve_rejects_unparsable_database_url() -> None:
    result = CliRunner().invoke(app, ["serve", "--db", "garbage"])
    assert result.exit_code == 2
    assert "cannot open database 'garbage'" in result.output


def test_serve_rejects_unreachable_sqlite_file() -> None:
    result = CliRunner().invoke(app, ["serve", "--db", "sqlite:////no-such-dir/x.db"])
    assert result.exit_code == 2
    assert "unable to open database file" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--workers", "0"], "Invalid value for '--workers'"),
        (["serve", "--concurrency", "-1"], "Invalid value for '--concurrency'"),
        (["serve", "--log-level", "loud"], "unknown logging level 'loud'"),
        (["worker", "--concurrency", "0"], "Invalid value for '--concurrency'"),
        (["worker", "--grace", "-1"], "Invalid value for '--grace'"),
        (["worker", "--grace", "nan"], "Invalid value for '--grace'"),
        (["worker", "--log-level", "loud"], "unknown logging level 'loud'"),
    ],
)
def test_cli_rejects_invalid_option(args: list[str], expected: str) -> None:
    # Each of these is checked before the command opens a database.
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output


# -- processes --


class CliProcess:
    """``python -m taskmill ARGS`` in its own session, with its output in a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "taskmill", *args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = PROCESS_SLACK) -> None:
        def logged() -> bool:
            if text in self.log():
                return True
            if self.process.poll() is not None:
                raise AssertionError(f"Process exited; log:\n{self.log()}")
            return False

        eventually(logged, timeout=timeout, interval=0.05)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; return its exit status."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"Process still running after {timeout} s; log:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


StartCli = Callable[..., CliProcess]


@pytest.fixture
def start_cli(tmp_path: Path, database_url: str) -> Iterator[StartCli]:
    """Start ``taskmill`` processes; kill their process groups afterwards."""
    processes: list[CliProcess] = []
    env = {key: value for key, value in os.environ.items() if "TASKMILL" not in key}
    env["TASKMILL_DATABASE_URL"] = database_url

    def start(*args: str, extra_env: dict[str, str] | None = None) -> CliProcess:
        log_path = tmp_path / f"taskmill-{len(processes)}.log"
        process = CliProcess(list(args), log_path, env | (extra_env or {}))
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()


def wait_for_status(
    database: Database, task_id: str, status: str, timeout: float = PROCESS_SLACK
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        row = read_row(database, task_id)
        return row if row["status"] == status else None

    row: dict[str, Any] = eventually(reached, timeout=timeout, interval=0.05)
    return row


def create_stored_task(database_url: str, name: str, params: dict[str, Any]) -> str:
    """Store a PENDING task through a manager that is never started."""
    manager = TaskManager(database_url)
    try:
        for task_class in (Countdown, StepTask, BlockingTask):
            manager.register(task_class)
        manager.database.create_schema()
        create_ledger(manager.database)
        return manager.create(name, params).id
    finally:
        manager.database.dispose()


def stop_worker(worker: CliProcess, grace: float) -> float:
    """Send SIGTERM, check the exit status is 0, and return the seconds it took."""
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    status = worker.wait(timeout=grace + PROCESS_SLACK)
    assert status == 0, worker.log()
    return time.monotonic() - started


# -- taskmill worker --


def test_worker_runs_demo_task_stored_elsewhere(
    start_cli: StartCli, database: Database, database_url: str
) -> None:
    task_id = create_stored_task(
        database_url, "countdown", {"seconds": 0.5, "steps": 5}
    )

    worker = start_cli("worker", "--db", database_url, "--concurrency", "2")
    worker.wait_for_log("started on")
    finished = wait_for_status(database, task_id, "FINISHED")
    stop_worker(worker, grace=10)

    assert finished["result"] == {"steps": 5}
    log = worker.log()
    assert (
        f"started on {database_url}: runs task types countdown, directory_digest" in log
    )
    assert "up to 2 at once" in log
    assert "started with 2 workers" in log, "--concurrency did not reach the manager"
    assert "stopped" in log.splitlines()[-1], log
    assert "Traceback" not in log


def test_worker_sigterm_requeues_for_next_worker(
    start_cli: StartCli, database: Database, database_url: str
) -> None:
    steps = 30
    grace = 3.0
    task_id = create_stored_task(database_url, "step", {"n": steps, "step_s": 0.1})

    first = start_cli(
        "worker", "--app", "tests.worker_app:manager", "--grace", str(grace)
    )
    eventually(
        lambda: (read_row(database, task_id)["checkpoint"] or {}).get("step", 0) >= 3,
        timeout=PROCESS_SLACK,
    )
    elapsed = stop_worker(first, grace)

    assert elapsed < grace + 3, f"exit took {elapsed:.1f} s\n{first.log()}"
    suspended = read_row(database, task_id)
    assert suspended["status"] == "PENDING", suspended
    assert suspended["owner"] is None, suspended
    saved_step = suspended["checkpoint"]["step"]
    assert 3 <= saved_step < steps, suspended
    reasons = read_event_reasons(database, task_id)
    assert "shut down" in reasons[-1], reasons
    assert "Traceback" not in first.log()

    second = start_cli("worker", "--app", "tests.worker_app:create_manager")
    finished = wait_for_status(database, task_id, "FINISHED")
    stop_worker(second, grace=2)

    assert finished["attempts"] == 2, finished
    assert finished["recoveries"] == 0, finished
    # Each step writes its ledger row with its checkpoint, once: the second
    # run began after the saved step and repeated none.
    assert ledger_steps(database, task_id) == list(range(1, steps + 1))


def test_worker_second_signal_lets_shutdown_finish(
    start_cli: StartCli, database: Database, database_url: str
) -> None:
    grace = 1.5
    task_id = create_stored_task(database_url, "blocking", {"seconds": 60})

    worker = start_cli("worker", "--app", "tests.worker_app:app", "--grace", str(grace))
    wait_for_status(database, task_id, "RUNNING")
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    worker.wait_for_log("received SIGTERM; stopping")
    worker.signal(signal.SIGINT)
    status = worker.wait(timeout=grace + PROCESS_SLACK)
    elapsed = time.monotonic() - started

    log = worker.log()
    assert status == 0, log
    assert elapsed >= grace, f"exited after {elapsed:.1f} s, before the grace"
    assert elapsed < grace + 3, f"exit took {elapsed:.1f} s\n{log}"
    assert "received SIGINT again while stopping" in log
    assert "Traceback" not in log
    row = read_row(database, task_id)
    assert row["status"] == "PENDING", row
    reasons = read_event_reasons(database, task_id)
    assert "shut down" in reasons[-1], reasons


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("tests.worker_app", "'tests.worker_app' is not of the form MODULE:ATTRIBUTE"),
        ("no_such_module:app", "names module 'no_such_module', which was not found"),
        ("tests.worker_app:missing", "names attribute 'missing'"),
        ("tests.worker_app:not_a_manager", "is an object of type int"),
        (
            "tests.worker_app:app_without_manager",
            "is a FastAPI app without a TaskManager in app.state.manager",
        ),
        (
            "tests.worker_app:create_with_argument",
            "is a callable that requires arguments",
        ),
        ("tests.worker_app:create_nothing", "returned an object of type NoneType"),
    ],
)
def test_worker_rejects_invalid_app(
    start_cli: StartCli, target: str, expected: str
) -> None:
    worker = start_cli("worker", "--app", target)
    status = worker.wait(timeout=PROCESS_SLACK)

    log = worker.log()
    assert status == 2, log
    errors = [line for line in log.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, log
    assert errors[0].startswith("Error: Invalid value for '--app': "), log
    assert expected in errors[0]
    assert "MODULE:ATTRIBUTE naming a TaskManager" in errors[0]
    assert "Traceback" not in log


def test_worker_rejects_db_with_app(start_cli: StartCli, database_url: str) -> None:
    worker = start_cli(
        "worker", "--app", "tests.worker_app:manager", "--db", database_url
    )
    status = worker.wait(timeout=PROCESS_SLACK)

    log = worker.log()
    assert status == 2, log
    assert "Invalid value for '--db': cannot be combined with --app" in log
    assert "Traceback" not in log


def test_worker_rejects_demo_without_concurrency(
    start_cli: StartCli, database_url: str
) -> None:
    worker = start_cli(
        "worker", "--db", database_url, extra_env={"TASKMILL_CONCURRENCY": "0"}
    )
    status = worker.wait(timeout=PROCESS_SLACK)

    log = worker.log()
    assert status == 2, log
    assert "Invalid value for 'TASKMILL_CONCURRENCY': the manager runs no tasks" in log
    assert "Pass --concurrency N" in log
    assert "Traceback" not in log


def test_worker_reports_failed_startup(start_cli: StartCli) -> None:
    worker = start_cli("worker", "--app", "tests.worker_app:create_memory_manager")
    status = worker.wait(timeout=PROCESS_SLACK)

    log = worker.log()
    assert status == 1, log
    assert "starting the task manager on sqlite:// failed" in log
    assert "in-memory SQLite database" in log
    assert "Traceback" not in log


# -- taskmill serve --


def wait_until_healthy(server: CliProcess, client: httpx.Client) -> None:
    def healthy() -> bool:
        if server.process.poll() is not None:
            raise AssertionError(f"Server exited; log:\n{server.log()}")
        try:
            return client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    eventually(healthy, timeout=20, interval=0.1)


def wait_for_http_status(
    client: httpx.Client, task_id: str, status: str, timeout: float = PROCESS_SLACK
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        task: dict[str, Any] = client.get(f"/tasks/{task_id}").json()
        return task if task["status"] == status else None

    task: dict[str, Any] = eventually(reached, timeout=timeout, interval=0.05)
    return task


def test_serve_with_two_workers_runs_tasks(
    start_cli: StartCli, database_url: str
) -> None:
    port = free_port()
    server = start_cli(
        "serve", "--workers", "2", "--port", str(port), "--db", database_url
    )
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        wait_until_healthy(server, client)
        created = client.post(
            "/tasks", json={"name": "countdown", "params": {"seconds": 0.5, "steps": 5}}
        )
        assert created.status_code == 201, created.text
        finished = wait_for_http_status(client, created.json()["id"], "FINISHED")

    assert finished["result"] == {"steps": 5}
    log = server.log()
    assert "2 web processes each running up to 4 tasks at once" in log
    assert log.count("Started server process") == 2, log
    # taskmill's own records reach the log from both web processes.
    assert log.count("started with 4 workers") == 2, log


def test_serve_concurrency_zero_defers_to_worker(
    start_cli: StartCli, database_url: str
) -> None:
    port = free_port()
    server = start_cli(
        "serve", "--concurrency", "0", "--port", str(port), "--db", database_url
    )
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        wait_until_healthy(server, client)
        created = client.post(
            "/tasks", json={"name": "countdown", "params": {"seconds": 0.5, "steps": 5}}
        )
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]
        # Longer than the manager's poll interval (1 s), after which a
        # runner would have claimed it.
        time.sleep(1.5)
        waiting = client.get(f"/tasks/{task_id}").json()
        assert waiting["status"] == "PENDING", waiting
        assert waiting["attempts"] == 0, waiting

        worker = start_cli("worker", "--db", database_url)
        finished = wait_for_http_status(client, task_id, "FINISHED")

    assert finished["result"] == {"steps": 5}
    assert "run none" in server.log()
    stop_worker(worker, grace=10)
