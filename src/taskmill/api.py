"""The FastAPI router that lists, creates, controls and streams tasks.

Mount it in an app whose lifespan runs the manager::

    manager = TaskManager("sqlite:///./tasks.db")
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager), prefix="/api")

The router also serves the dashboard at ``/dashboard`` under its prefix.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from starlette.exceptions import HTTPException

from taskmill._json import clean_text
from taskmill.dashboard import add_dashboard_routes
from taskmill.database import is_transient
from taskmill.exceptions import (
    InvalidParams,
    InvalidTransition,
    ManagerNotRunning,
    TaskmillError,
    TaskNotFound,
    UnknownTaskType,
)
from taskmill.feed import Batch, Subscription, feed_for
from taskmill.manager import TaskManager
from taskmill.schemas import (
    TaskBatchCreate,
    TaskCreate,
    TaskEventInfo,
    TaskInfo,
    TaskTypeInfo,
    nesting_depth,
)
from taskmill.status import Action, TaskStatus

logger = logging.getLogger(__name__)

#: The largest page that ``GET /tasks`` returns.
MAX_PAGE = 500
#: The largest offset: SQLite integers are 64-bit.
MAX_OFFSET = 2**62
#: Milliseconds that a browser waits before it reconnects a dropped stream.
STREAM_RETRY_MS = 2000
#: Seconds between two checks of an open stream that the manager still runs.
STREAM_CHECK_INTERVAL = 1.0
#: A 422 response leaves out the input of an error if it nests deeper than this.
MAX_ECHOED_DEPTH = 32
#: A 422 response leaves out the input of an error whose JSON would have more
#: characters than this (counted roughly: strings, numbers and separators).
MAX_ECHOED_CHARS = 4096


def create_router(
    manager: TaskManager,
    *,
    dependencies: Sequence[Any] | None = None,
    control_dependencies: Sequence[Any] | None = None,
    dashboard: bool = True,
) -> APIRouter:
    """Build the task endpoints for ``manager``, and its dashboard at ``/dashboard``.

    ``dependencies`` (FastAPI ``Depends(...)``) apply to every endpoint, the
    dashboard and the streams included, e.g. to require authentication.
    ``control_dependencies`` apply, after those, only to the endpoints that
    change state: ``POST /tasks``, ``POST /tasks/batch`` and the actions
    (start, resume, pause, stop, restart), e.g. to let every user read but
    only some control.
    ``dashboard=False`` leaves out the dashboard page and its assets; the
    streams stay, as part of the API.
    """

    def require_running() -> None:
        if not manager.is_running:
            raise ManagerNotRunning("serve task requests")

    control = list(control_dependencies or [])
    router = APIRouter(
        tags=["tasks"],
        route_class=_TaskmillRoute,
        dependencies=[*(dependencies or []), Depends(require_running)],
        responses={
            503: {"model": ErrorBody, "description": "The manager is not running."}
        },
    )
    not_found: dict[int | str, dict[str, Any]] = {
        404: {"model": ErrorBody, "description": "No task with that id."}
    }
    create_errors: dict[int | str, dict[str, Any]] = {
        400: {
            "model": ErrorBody,
            "description": "The body cannot be parsed: not UTF-8, nested too "
            "deeply, or an integer with too many digits.",
        },
        404: {"model": ErrorBody, "description": "Unknown task type."},
    }

    @router.get("/task-types")
    def list_task_types() -> list[TaskTypeInfo]:
        """List the registered task types with the JSON schema of their params."""
        return [
            TaskTypeInfo(
                name=name,
                description=_first_line(task_class.__doc__),
                params_schema=task_class.params_model.model_json_schema(),
            )
            for name, task_class in sorted(manager.task_types.items())
        ]

    @router.post(
        "/tasks",
        status_code=status.HTTP_201_CREATED,
        dependencies=control,
        responses=create_errors,
    )
    def create_task(body: TaskCreate) -> TaskInfo:
        """Create a task; it runs as soon as a worker is free unless `start` is false."""
        return manager.create(body.name, body.params, start=body.start)

    @router.post(
        "/tasks/batch",
        status_code=status.HTTP_201_CREATED,
        dependencies=control,
        responses=create_errors,
    )
    def create_tasks(body: TaskBatchCreate) -> list[TaskInfo]:
        """Create tasks of one type in one transaction: all of them, or none
        if any params are invalid (the error's `loc` gives their index)."""
        return manager.create_many(body.name, body.params, start=body.start)

    @router.get("/tasks")
    def list_tasks(
        status: Annotated[list[TaskStatus] | None, Query()] = None,
        name: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> list[TaskInfo]:
        """List tasks newest first, filtered by status (repeatable) and name."""
        return manager.list(
            statuses=status or (), name=name, limit=limit, offset=offset
        )

    # Before GET /tasks/{task_id}, which would match /tasks/stream too.
    _add_stream_routes(router, manager, not_found)

    @router.get("/tasks/{task_id}", responses=not_found)
    def read_task(task_id: str) -> TaskInfo:
        return manager.get(task_id)

    @router.get("/tasks/{task_id}/events", responses=not_found)
    def list_task_events(task_id: str) -> list[TaskEventInfo]:
        """List the status transitions of a task, oldest first."""
        return manager.events(task_id)

    for action in Action:
        router.add_api_route(
            f"/tasks/{{task_id}}/{action.value}",
            _action_endpoint(manager, action),
            methods=["POST"],
            status_code=status.HTTP_202_ACCEPTED,
            dependencies=control,
            response_model=TaskInfo,
            name=f"{action.value}_task",
            summary=f"{action.value.capitalize()} a task",
            responses={
                **not_found,
                409: {
                    "model": TransitionErrorBody,
                    "description": "The task's status does not allow it.",
                },
            },
        )
    if dashboard:
        add_dashboard_routes(router)
    return router


_STREAM_TASKS_DOC = (
    "A `text/event-stream`. `counts` events carry the number of tasks per "
    "status, `task` events a task (as `GET /tasks/{id}`) each time it changed, "
    "at most once per poll of the database (about 0.3 s); a `reload` event "
    "means more tasks changed than one message carries, so reload the list."
)
_STREAM_TASK_DOC = (
    "A `text/event-stream`: first the task (`task`) and its history "
    "(`history`, a list of events), then the same each time they change, at "
    "most once per poll of the database (about 0.3 s)."
)


def _add_stream_routes(
    router: APIRouter,
    manager: TaskManager,
    not_found: dict[int | str, dict[str, Any]],
) -> None:
    @router.get(
        "/tasks/stream",
        response_class=EventSourceResponse,
        responses={200: {"description": _STREAM_TASKS_DOC}},
    )
    async def stream_tasks() -> AsyncIterator[ServerSentEvent]:
        """Stream the changes of all tasks as server-sent events."""
        with feed_for(manager.database).subscribe() as subscription:
            async for event in _task_changes(manager, subscription):
                yield event

    def require_task(task_id: str) -> None:
        manager.get(task_id)  # Raises TaskNotFound, a 404, before the stream starts.

    @router.get(
        "/tasks/{task_id}/stream",
        response_class=EventSourceResponse,
        dependencies=[Depends(require_task)],
        responses={**not_found, 200: {"description": _STREAM_TASK_DOC}},
    )
    async def stream_task(task_id: str) -> AsyncIterator[ServerSentEvent]:
        """Stream one task and its history as server-sent events."""
        with feed_for(manager.database).subscribe(task_id) as subscription:
            async for event in _one_task_changes(manager, subscription):
                yield event


async def _next_batch(subscription: Subscription) -> Batch | None:
    """Wait for changes; return None after ``STREAM_CHECK_INTERVAL`` without any."""
    try:
        async with asyncio.timeout(STREAM_CHECK_INTERVAL):
            return await subscription.next_batch()
    except TimeoutError:
        return None


async def _task_changes(
    manager: TaskManager, subscription: Subscription
) -> AsyncIterator[ServerSentEvent]:
    """Yield the events of the all-tasks stream until the manager stops."""
    retry: int | None = STREAM_RETRY_MS
    while manager.is_running:
        batch = await _next_batch(subscription)
        if batch is None:
            continue
        if batch.closed:
            return
        if batch.counts is not None:
            counts = {status.value: number for status, number in batch.counts.items()}
            yield ServerSentEvent(event="counts", data=counts, retry=retry)
            retry = None
        if batch.reload:
            yield ServerSentEvent(event="reload", data={})
        for task in batch.tasks:
            yield ServerSentEvent(event="task", data=task)


async def _one_task_changes(
    manager: TaskManager, subscription: Subscription
) -> AsyncIterator[ServerSentEvent]:
    """Yield the events of a one-task stream until the manager stops.

    The subscription starts before the first read, so no change falls
    between the two; changes that the first read already contains are skipped.
    """
    task_id = subscription.task_id
    assert task_id is not None
    try:
        task, history = await asyncio.to_thread(
            _read_task_and_history, manager, task_id
        )
    except (SQLAlchemyError, TaskmillError) as exc:
        # Not named "error": browsers fire their own "error" event on a dropped stream.
        yield ServerSentEvent(event="unavailable", data={"detail": str(exc)})
        return
    yield ServerSentEvent(event="task", data=task, retry=STREAM_RETRY_MS)
    yield ServerSentEvent(event="history", data=history)
    updated_at = task.updated_at
    last_event_id = max((event.id for event in history), default=0)
    while manager.is_running:
        batch = await _next_batch(subscription)
        if batch is None:
            continue
        if batch.closed:
            return
        new_events = [event for event in batch.events if event.id > last_event_id]
        if new_events:
            last_event_id = new_events[-1].id
            yield ServerSentEvent(event="history", data=new_events)
        for task in batch.tasks:
            if task.updated_at > updated_at:
                updated_at = task.updated_at
                yield ServerSentEvent(event="task", data=task)


def _read_task_and_history(
    manager: TaskManager, task_id: str
) -> tuple[TaskInfo, list[TaskEventInfo]]:
    return manager.get(task_id), manager.events(task_id)


def _action_endpoint(manager: TaskManager, action: Action) -> Callable[[str], TaskInfo]:
    def endpoint(task_id: str) -> TaskInfo:
        return manager.act(task_id, action)

    endpoint.__doc__ = {
        Action.START: "Run a task that was created held or is paused.",
        Action.RESUME: "Run a paused task again from its checkpoint.",
        Action.PAUSE: "Hold a pending task, or pause a running one at its next checkpoint.",
        Action.STOP: "End a task; a running one stops at its next checkpoint.",
        Action.RESTART: "Run a finished, failed or stopped task again from the start.",
    }[action]
    return endpoint


class ErrorBody(BaseModel):
    detail: str


class TransitionErrorBody(BaseModel):
    detail: str
    status: TaskStatus
    allowed_actions: list[Action]


def _first_line(text: str | None) -> str | None:
    return text.strip().splitlines()[0] if text and text.strip() else None


class _TaskmillRoute(APIRoute):
    """Turns taskmill's errors into HTTP responses, in this one place."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except TaskmillError as exc:
                return _error_response(exc)
            except SQLAlchemyError as exc:
                if not is_transient(exc):
                    raise
                reason = exc.orig if isinstance(exc, DBAPIError) else exc
                logger.warning(
                    "Task database unavailable: %s",
                    reason,
                    extra={"event": "api.database_unavailable"},
                )
                # The reason goes to the log only: it may name the database
                # server, its address and its users.
                return JSONResponse(
                    {"detail": "The task database is unavailable; retry later."},
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
            except RequestValidationError as exc:
                # FastAPI's own handler echoes the input back, and fails on a
                # NaN or an unpaired surrogate in it.
                errors = [_without_large_input(error) for error in exc.errors()]
                detail = _json_safe(jsonable_encoder(errors))
                return JSONResponse({"detail": detail}, status_code=422)
            except HTTPException as exc:
                # FastAPI answers a body that json.loads() rejects with anything
                # but a JSONDecodeError with a 400 that does not say why. It
                # raises Starlette's HTTPException, the base of FastAPI's.
                cause = exc.__cause__
                if exc.detail != _FASTAPI_BODY_ERROR or not isinstance(
                    cause, _BODY_PARSE_ERRORS
                ):
                    raise
                detail = _body_parse_error_message(cause)
                return JSONResponse({"detail": detail}, status_code=400)

        return handle


#: The detail of the 400 that FastAPI (0.165) returns for such a body.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"
#: What json.loads() raises, besides JSONDecodeError, on a body it cannot parse.
_BODY_PARSE_ERRORS = (UnicodeDecodeError, RecursionError, ValueError)


def _body_parse_error_message(cause: Exception) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"The request body is not valid UTF-8 ({cause.reason} at byte "
            f"{cause.start}); send JSON encoded in UTF-8."
        )
    if isinstance(cause, RecursionError):
        return (
            "The request body is JSON nested too deeply to parse; "
            "nest its objects and arrays less deeply."
        )
    if "integer string conversion" in str(cause):
        return (
            "The request body has an integer of more than "
            f"{sys.get_int_max_str_digits()} digits; send it as a string."
        )
    return f"The request body is not valid JSON: {clean_text(str(cause))}"


def _without_large_input(error: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the echoed ``input`` of a validation error if it is large or nests deeply.

    A batch of too many tasks would otherwise come back whole in the error.
    Encoding the input back recurses once per level, so an input nested a few
    hundred levels deep would exceed Python's recursion limit.
    """
    value = error.get("input")
    if _fits(value, MAX_ECHOED_CHARS) and nesting_depth(value) <= MAX_ECHOED_DEPTH:
        return dict(error)
    return {key: value for key, value in error.items() if key != "input"}


def _fits(value: Any, max_chars: int) -> bool:
    """Tell whether ``value`` as JSON has at most about ``max_chars`` characters.

    Counting stops as soon as it passes ``max_chars``, so a huge value costs
    little more than a small one.
    """
    chars = 0
    stack = [value]
    while stack and chars <= max_chars:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
            chars += 2 + 2 * len(item)
        elif isinstance(item, list | tuple):
            stack.extend(item)
            chars += 2 + len(item)
        else:
            chars += len(str(item)) + 2
    return chars <= max_chars


def _json_safe(value: Any) -> Any:
    """Replace what a JSON response cannot encode: NaN, infinities, lone surrogates."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    return value


def _error_response(exc: TaskmillError) -> JSONResponse:
    if isinstance(exc, InvalidParams):
        detail = [
            {
                "loc": ["body", "params", *error["loc"]],
                "msg": error["msg"],
                "type": error.get("type", "value_error"),
            }
            for error in exc.errors
        ]
        return JSONResponse({"detail": detail, "message": str(exc)}, status_code=422)
    if isinstance(exc, InvalidTransition):
        content = {
            "detail": str(exc),
            "status": exc.current.value,
            "allowed_actions": [action.value for action in exc.allowed],
        }
        return JSONResponse(content, status_code=409)
    if isinstance(exc, TaskNotFound | UnknownTaskType):
        return JSONResponse({"detail": str(exc)}, status_code=404)
    if isinstance(exc, ManagerNotRunning):
        return JSONResponse({"detail": str(exc)}, status_code=503)
    return JSONResponse({"detail": str(exc)}, status_code=400)
