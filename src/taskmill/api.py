"""The FastAPI router that lists, creates and controls tasks.

Mount it in an app whose lifespan runs the manager::

    manager = TaskManager("sqlite:///./tasks.db")
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager), prefix="/api")
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from taskmill.exceptions import (
    InvalidParams,
    InvalidTransition,
    ManagerNotRunning,
    TaskmillError,
    TaskNotFound,
    UnknownTaskType,
)
from taskmill.manager import TaskManager
from taskmill.schemas import TaskCreate, TaskEventInfo, TaskInfo, TaskTypeInfo
from taskmill.status import Action, TaskStatus

#: The largest page that ``GET /tasks`` returns.
MAX_PAGE = 500


def create_router(
    manager: TaskManager, *, dependencies: Sequence[Any] | None = None
) -> APIRouter:
    """Build the task endpoints for ``manager``.

    ``dependencies`` (FastAPI ``Depends(...)``) apply to every endpoint, e.g.
    to require authentication.
    """
    router = APIRouter(
        tags=["tasks"],
        route_class=_TaskmillRoute,
        dependencies=list(dependencies or []),
    )

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

    @router.post("/tasks", status_code=status.HTTP_201_CREATED)
    def create_task(body: TaskCreate) -> TaskInfo:
        """Create a task; it runs as soon as a worker is free unless `start` is false."""
        _require_running(manager, "create a task")
        return manager.create(body.name, body.params, start=body.start)

    @router.get("/tasks")
    def list_tasks(
        status: Annotated[list[TaskStatus] | None, Query()] = None,
        name: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[TaskInfo]:
        """List tasks newest first, filtered by status (repeatable) and name."""
        return manager.list(
            statuses=status or (), name=name, limit=limit, offset=offset
        )

    @router.get("/tasks/{task_id}")
    def read_task(task_id: str) -> TaskInfo:
        return manager.get(task_id)

    @router.get("/tasks/{task_id}/events")
    def list_task_events(task_id: str) -> list[TaskEventInfo]:
        """List the status transitions of a task, oldest first."""
        return manager.events(task_id)

    for action in Action:
        router.add_api_route(
            f"/tasks/{{task_id}}/{action.value}",
            _action_endpoint(manager, action),
            methods=["POST"],
            status_code=status.HTTP_202_ACCEPTED,
            response_model=TaskInfo,
            name=f"{action.value}_task",
            summary=f"{action.value.capitalize()} a task",
            responses={409: {"description": "The task's status does not allow it."}},
        )
    return router


def _action_endpoint(manager: TaskManager, action: Action) -> Callable[[str], TaskInfo]:
    def endpoint(task_id: str) -> TaskInfo:
        _require_running(manager, f"{action.value} a task")
        return manager.act(task_id, action)

    endpoint.__doc__ = {
        Action.START: "Run a task that was created held or is paused.",
        Action.RESUME: "Run a paused task again from its checkpoint.",
        Action.PAUSE: "Hold a pending task, or pause a running one at its next checkpoint.",
        Action.STOP: "End a task; a running one stops at its next checkpoint.",
        Action.RESTART: "Run a finished, failed or stopped task again from the start.",
    }[action]
    return endpoint


def _require_running(manager: TaskManager, operation: str) -> None:
    if not manager.is_running:
        raise ManagerNotRunning(operation)


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

        return handle


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
