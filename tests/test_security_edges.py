"""Edge cases of the security features that the other test modules leave open.

One covers the API key that uvicorn's trace logging would write to the log,
the others terminal control sequences in task data that ``taskmill tasks``
prints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from click.testing import Result
from pydantic import BaseModel
from typer.testing import CliRunner

from taskmill import BaseTask, TaskManager, TaskStatus
from taskmill.cli import app
from tests.conftest import eventually

API_KEY = "edge-case-key-7f3a9c"
#: Sets the terminal's title, clears the screen and turns the text red.
CONTROL_SEQUENCES = "\x1b]0;title\x07\x1b[2J\x1b[31m"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, ["tasks", *args])


# -- the API key in the log --


def test_trace_log_rejected_with_api_key(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvicorn's trace logging writes each request's scope, stream key included.
    monkeypatch.setenv("TASKMILL_API_KEY", API_KEY)
    args = ["serve", "--db", database_url, "--log-level", "trace"]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    assert "--log-level" in result.output
    assert "debug" in result.output
    assert API_KEY not in result.output


# -- terminal control sequences in `taskmill tasks` --


class EchoParams(BaseModel):
    text: str


class EchoFailure(BaseTask[EchoParams]):
    """Report the text as progress, then fail with an error that quotes it.

    Task code often puts a caller's input in a message, as an import task
    does with the URL that it failed to fetch.
    """

    name = "echo_failure"
    params_model = EchoParams

    def pre(self) -> None:
        pass

    def run(self) -> Any:
        self.set_progress(50, message=f"Fetching {self.params.text}")
        raise ValueError(f"Cannot fetch {self.params.text}")

    def post(self) -> None:
        pass


@pytest.fixture
def failed_task_id(make_manager: Callable[..., TaskManager]) -> str:
    manager = make_manager(EchoFailure)
    task = manager.create("echo_failure", {"text": f"http://x/{CONTROL_SEQUENCES}"})
    eventually(lambda: manager.get(task.id).status == TaskStatus.FAILED)
    return task.id


def test_tasks_show_escapes_control_characters(
    failed_task_id: str, database_url: str
) -> None:
    result = invoke("show", failed_task_id, "--db", database_url)
    assert result.exit_code == 0, result.output
    assert "Cannot fetch" in result.output
    assert "\x1b" not in result.output


def test_tasks_list_escapes_control_characters(
    failed_task_id: str, database_url: str
) -> None:
    result = invoke("list", "--db", database_url)
    assert result.exit_code == 0, result.output
    assert failed_task_id in result.output
    assert "\x1b" not in result.output
