"""Run outcomes: the final status, the history reason and the columns to write."""

from __future__ import annotations

import datetime as dt
import traceback
from dataclasses import dataclass, field
from typing import Any

from taskmill._json import clean_text
from taskmill.exceptions import (
    DatabaseUnavailable,
    PauseRequested,
    StopRequested,
    SuspendRequested,
    _ControlSignal,
)
from taskmill.models import utcnow
from taskmill.status import ControlRequest, TaskStatus


@dataclass(frozen=True)
class Outcome:
    """A status change that ends a run.

    ``crud.end_run()`` writes it for the run itself, and ``crud.change_status()``
    for a run that another runner recovers.
    """

    status: TaskStatus
    reason: str
    values: dict[str, Any] = field(default_factory=dict)

    def honouring(self, control: ControlRequest | None) -> Outcome:
        """Let a stored stop or pause request decide where an unfinished run goes.

        A run that ends PAUSED may have received a stop after the pause it
        honoured. A run that goes back to PENDING at shutdown honoured no
        request at all. In both cases the stored request wins, so nothing a
        user asked for is lost.
        """
        unfinished = (TaskStatus.PAUSED, TaskStatus.PENDING)
        if control == ControlRequest.STOP and self.status in unfinished:
            values = self.values | {
                "finished_at": utcnow(),
                "checkpoint": None,
                "control": None,
            }
            reason = f"{self.reason}; stopped as requested"
            return Outcome(TaskStatus.STOPPED, reason, values)
        if control == ControlRequest.PAUSE and self.status == TaskStatus.PENDING:
            values = self.values | {"control": None}
            return Outcome(
                TaskStatus.PAUSED, f"{self.reason}; paused as requested", values
            )
        return self


def finished(result: Any) -> Outcome:
    values = {
        "result": result,
        "error": None,
        "progress": 100.0,
        "checkpoint": None,
        "finished_at": utcnow(),
        "control": None,
    }
    return Outcome(TaskStatus.FINISHED, "finished", values)


def failed(
    error: dict[str, Any], progress: float, message: str | None, result: Any = None
) -> Outcome:
    values = {
        "error": error,
        "result": result,
        "progress": progress,
        "message": message,
        "finished_at": utcnow(),
        "control": None,
    }
    return Outcome(
        TaskStatus.FAILED, f"failed in {error['phase']}(): {error['type']}", values
    )


def retry_later(
    error: dict[str, Any],
    *,
    failures: int,
    max_attempts: int,
    delay: float,
    progress: float,
    message: str | None,
) -> Outcome:
    """Return the outcome of a failed run that is tried again after ``delay`` seconds.

    The task goes back to PENDING with its last checkpoint, so the retry
    resumes from it. The error stays visible until a run finishes.
    """
    values = {
        "error": error,
        "failures": failures,
        "run_after": utcnow() + dt.timedelta(seconds=delay),
        "owner": None,
        "progress": progress,
        "message": message,
    }
    reason = (
        f"failed in {error['phase']}(): {error['type']}; "
        f"retry {failures} of {max_attempts - 1} in {delay:.1f} s"
    )
    return Outcome(TaskStatus.PENDING, reason, values)


def on_request(signal: _ControlSignal, progress: float, message: str | None) -> Outcome:
    """Return the outcome of a run that a pause, stop or shutdown unwound."""
    where = str(signal.args[0]) if signal.args else "during the run"
    base: dict[str, Any] = {"progress": progress, "message": message, "control": None}
    if isinstance(signal, PauseRequested):
        return Outcome(TaskStatus.PAUSED, f"paused {where}", base | {"owner": None})
    if isinstance(signal, StopRequested):
        values = base | {"finished_at": utcnow(), "checkpoint": None}
        return Outcome(TaskStatus.STOPPED, f"stopped by request {where}", values)
    if isinstance(signal, DatabaseUnavailable):
        reason = f"suspended: {where}; resumes from its last checkpoint"
        return Outcome(TaskStatus.PENDING, reason, base | {"owner": None})
    if not isinstance(signal, SuspendRequested):
        raise TypeError(f"No outcome for control signal {signal!r}")
    reason = (
        f"suspended {where} because the runner shut down; "
        "resumes from its last checkpoint"
    )
    return Outcome(TaskStatus.PENDING, reason, base | {"owner": None})


def error_record(exc: BaseException, phase: str) -> dict[str, Any]:
    """Describe a failure as the JSON stored in the task's ``error``."""
    return {
        "type": type(exc).__name__,
        "message": clean_text(_message_of(exc)),
        "traceback": clean_text("".join(traceback.format_exception(exc))),
        "phase": phase,
    }


def _message_of(exc: BaseException) -> str:
    # A task's exception may have a broken __str__; raising here would leave
    # the task RUNNING with no outcome recorded.
    try:
        return str(exc)
    except Exception as str_error:
        return f"<str() of the exception raised {type(str_error).__name__}>"
