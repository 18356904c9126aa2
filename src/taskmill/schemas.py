"""Pydantic models of what taskmill returns and accepts."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
)

from taskmill.status import Action, ControlRequest, TaskStatus, allowed_actions

#: The deepest nesting of objects and arrays that ``POST /tasks`` accepts in
#: params, the params object itself being level 1. Pydantic 2.14 cannot read
#: back JSON nested more than about 200 levels, so deeper params could never be
#: stored. Its serializer raises ValueError past about 250 levels.
MAX_PARAMS_DEPTH = 100
#: The maximum number of tasks that one ``POST /tasks/batch`` creates.
MAX_BATCH = 1000


class TaskError(BaseModel):
    """The failure of a task: exception type, message, traceback and phase."""

    #: The exception class, e.g. ``"ValueError"``.
    type: str
    message: str
    traceback: str | None = None
    #: The hook that raised (``pre``, ``run``, ``post``) or what ended the run.
    phase: str


class TaskInfo(BaseModel):
    """A snapshot of one task as stored in the database."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    status: TaskStatus
    params: dict[str, Any]
    progress: float = Field(description="Percent done, 0 to 100.")
    message: str | None = Field(description="The last progress message.")
    result: Any = None
    error: TaskError | None = None
    attempts: int = Field(description="How many runs have started.")
    recoveries: int = Field(description="How many runs were taken back after a crash.")
    failures: int = Field(
        description="Runs that raised or crashed since the task was created or "
        "restarted; the task type's retry policy bounds them."
    )
    pending_request: ControlRequest | None = Field(
        validation_alias="control",
        description="A pause or stop that the running task has not reached yet.",
    )
    owner: str | None = Field(description="The runner of the current or last run.")
    lease_expires_at: dt.datetime | None = Field(
        description="Expiry of the owner's claim on a RUNNING task; another runner "
        "takes it back after that."
    )
    heartbeat_at: dt.datetime | None = Field(
        description="When the run last reported progress or saved a checkpoint. "
        "An old value on a RUNNING task means it is stuck in one step."
    )
    run_after: dt.datetime | None = Field(
        description="A PENDING task that failed waits until then for its retry."
    )
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def allowed_actions(self) -> list[Action]:
        return allowed_actions(self.status, self.pending_request)


class TaskEventInfo(BaseModel):
    """One entry of a task's history: a status transition or a warning."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    task_id: str
    from_status: TaskStatus | None
    to_status: TaskStatus
    at: dt.datetime
    reason: str
    kind: Literal["transition", "warning"] = Field(
        default="transition",
        description="A status transition, or a warning about the run that "
        "changed no status (its from and to status are equal).",
    )


def _check_params_depth(params: dict[str, Any]) -> dict[str, Any]:
    depth = nesting_depth(params)
    if depth > MAX_PARAMS_DEPTH:
        raise ValueError(
            f"params are nested {depth} levels deep, more than the "
            f"{MAX_PARAMS_DEPTH} allowed; flatten them"
        )
    return params


#: A task's params as a request sends them: a JSON object of limited depth.
ParamsObject = Annotated[dict[str, Any], AfterValidator(_check_params_depth)]


class TaskCreate(BaseModel):
    """The body of ``POST /tasks``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="A registered task type.", min_length=1)
    params: ParamsObject = Field(default_factory=dict)
    start: bool = Field(
        default=True, description="False creates the task held (PAUSED) until started."
    )


class TaskBatchCreate(BaseModel):
    """The body of ``POST /tasks/batch``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="A registered task type.", min_length=1)
    params: list[ParamsObject] = Field(
        description="The params of each task, in the order in which they are queued.",
        min_length=1,
        max_length=MAX_BATCH,
    )
    start: bool = Field(
        default=True, description="False creates the tasks held (PAUSED) until started."
    )


class TaskTypeInfo(BaseModel):
    """A registered task type and the JSON schema of its params."""

    name: str
    description: str | None
    params_schema: dict[str, Any]


def nesting_depth(value: Any) -> int:
    """Return how deeply lists and dicts nest in ``value``, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest
