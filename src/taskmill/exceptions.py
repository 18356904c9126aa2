"""Errors raised by taskmill.

    TaskmillError                 root of every error below
    ├── TaskNotFound              no task with that id         (HTTP 404)
    ├── UnknownTaskType           no task class by that name   (HTTP 404)
    ├── TaskTypeAlreadyRegistered a second class under a name
    ├── InvalidParams             params fail the class's model (HTTP 422)
    ├── PayloadTooLarge           a value's JSON is over its size limit
    │   ├── ParamsTooLarge        params over max_params_bytes (raised as InvalidParams)
    │   ├── ResultTooLarge        a result over max_result_bytes; the run fails
    │   └── CheckpointTooLarge    a checkpoint over max_checkpoint_bytes
    ├── InvalidTransition         the status does not allow it (HTTP 409)
    ├── ManagerNotRunning         used before startup or after shutdown (HTTP 503)
    └── SchemaOutOfDate           the database needs `taskmill db upgrade`

Control flow inside a task (never raised to users, documented here so that
they are not caught by mistake): ``PauseRequested``, ``StopRequested``,
``SuspendRequested``, ``DatabaseUnavailable``, ``TimeLimitExceeded`` and
``RunTakenBack`` derive
from ``BaseException`` so that task code which catches ``Exception`` cannot
swallow them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from taskmill.status import Action, ControlRequest, TaskStatus, allowed_actions


class TaskmillError(Exception):
    """A taskmill operation failed."""


class TaskNotFound(TaskmillError):
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"Task {task_id!r} not found.")


class UnknownTaskType(TaskmillError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        names = ", ".join(repr(n) for n in self.known) or "none"
        super().__init__(f"Unknown task type {name!r}. Registered task types: {names}.")


class TaskTypeAlreadyRegistered(TaskmillError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"A task type named {name!r} is already registered; "
            "give the class another `name`."
        )


class InvalidParams(TaskmillError):
    """Params that the task class's params model rejects."""

    def __init__(self, name: str, errors: Sequence[Mapping[str, Any]]) -> None:
        self.name = name
        self.errors = list(errors)
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(params)'}: {e['msg']}"
            for e in self.errors
        )
        super().__init__(f"Invalid params for task type {name!r}: {fields}.")


class PayloadTooLarge(TaskmillError):
    """A value whose JSON is larger than the manager's limit for it.

    taskmill raises the subclasses, which name the ``TaskManager`` argument
    that sets each limit.
    """

    #: The ``TaskManager`` argument that sets the limit.
    setting: ClassVar[str] = "a TaskManager limit"
    #: What to do instead, as a sentence.
    advice: ClassVar[str] = "Store less, or raise the limit."

    def __init__(self, label: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"{label} is {size} bytes as JSON (UTF-8), over the limit of {limit} "
            f"bytes set by {self.setting}. {self.advice}"
        )


class ParamsTooLarge(PayloadTooLarge):
    """Params whose JSON exceeds ``max_params_bytes``; reported as ``InvalidParams``."""

    setting = "max_params_bytes"
    advice = (
        "Pass large inputs by reference (a path, a URL or a row id), "
        "or raise max_params_bytes in TaskManager()."
    )


class ResultTooLarge(PayloadTooLarge):
    """A result of ``run()`` whose JSON exceeds ``max_result_bytes``."""

    setting = "max_result_bytes"
    advice = (
        "Store large output elsewhere (a file or a table) and return a "
        "reference to it, or raise max_result_bytes in TaskManager()."
    )


class CheckpointTooLarge(PayloadTooLarge):
    """A checkpoint state whose JSON exceeds ``max_checkpoint_bytes``."""

    setting = "max_checkpoint_bytes"
    advice = (
        "Keep checkpoints to what a run needs to resume, "
        "or raise max_checkpoint_bytes in TaskManager()."
    )


class InvalidTransition(TaskmillError):
    """A status change or user action that the current status does not allow."""

    def __init__(
        self,
        task_id: str,
        current: TaskStatus,
        requested: TaskStatus | Action | str,
        pending: ControlRequest | None = None,
    ) -> None:
        self.task_id = task_id
        self.current = current
        self.requested = requested
        self.pending = pending
        self.allowed = allowed_actions(current, pending)
        names = ", ".join(a.value for a in self.allowed) or "none"
        detail = f" with a {pending.lower()} request pending" if pending else ""
        attempted = (
            f"move task {task_id!r} to {requested}"
            if isinstance(requested, TaskStatus)
            else f"{requested} task {task_id!r}"
        )
        super().__init__(
            f"Cannot {attempted}: it is {current.value}{detail}. "
            f"Actions allowed now: {names}."
        )


class ManagerNotRunning(TaskmillError):
    def __init__(self, operation: str) -> None:
        super().__init__(
            f"Cannot {operation}: the task manager is not running; "
            "call TaskManager.startup() first (the app's lifespan does this)."
        )


class SchemaOutOfDate(TaskmillError):
    """The database's schema is not the one that this version of taskmill uses."""

    def __init__(self, url: object, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        found = "no taskmill tables" if current is None else f"revision {current}"
        super().__init__(
            f"The database {url} has {found}; this version of taskmill needs "
            f"revision {head}. Run `taskmill db upgrade --db <url>` once, from "
            "one machine, before starting taskmill."
        )


class _ControlSignal(BaseException):
    """Unwinds a task's hooks at a checkpoint; handled by the runner only."""


class PauseRequested(_ControlSignal):
    pass


class StopRequested(_ControlSignal):
    pass


class SuspendRequested(_ControlSignal):
    """The manager is shutting down; the run goes back to PENDING."""


class DatabaseUnavailable(_ControlSignal):
    """A checkpoint failed because the database is unavailable; the run goes back to PENDING."""


class TimeLimitExceeded(_ControlSignal):
    """The run exceeded its task type's ``timeout``; it ends FAILED."""


class RunTakenBack(_ControlSignal):
    """The task no longer belongs to this run; the run ends without writing."""
