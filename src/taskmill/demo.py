"""The demo app: the example tasks behind the task API, on SQLite by default.

``uvicorn --factory taskmill.demo:create_app`` serves it. The database URL
comes from ``TASKMILL_DATABASE_URL``, and the number of tasks that each
process runs at once from ``TASKMILL_CONCURRENCY`` (0: the process stores and
controls tasks but runs none, so that ``taskmill worker`` processes run them).
"""

from __future__ import annotations

import inspect
import os

from fastapi import FastAPI

from taskmill.api import create_router
from taskmill.database import DEFAULT_DATABASE_URL
from taskmill.examples import Countdown, DirectoryDigest
from taskmill.manager import TaskManager

DATABASE_URL_VARIABLE = "TASKMILL_DATABASE_URL"
CONCURRENCY_VARIABLE = "TASKMILL_CONCURRENCY"
#: The ``max_workers`` default of ``TaskManager``, used when the variable is unset.
DEFAULT_CONCURRENCY: int = (
    inspect.signature(TaskManager).parameters["max_workers"].default
)


def create_manager(database_url: str | None = None) -> TaskManager:
    """Build a manager with the example task types; it is not started."""
    url = database_url or os.environ.get(DATABASE_URL_VARIABLE, DEFAULT_DATABASE_URL)
    manager = TaskManager(url, max_workers=concurrency_from_environment())
    manager.register(Countdown)
    manager.register(DirectoryDigest)
    return manager


def concurrency_from_environment() -> int:
    """Return ``TASKMILL_CONCURRENCY`` as a number of tasks; raise ValueError if invalid."""
    raw = os.environ.get(CONCURRENCY_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_CONCURRENCY
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"{CONCURRENCY_VARIABLE} must be a whole number of tasks, 0 or more, "
            f"got {raw!r}. Set it to 0 for a process that runs no tasks."
        )
    return value


def create_app(database_url: str | None = None) -> FastAPI:
    manager = create_manager(database_url)
    app = FastAPI(title="taskmill demo", lifespan=manager.lifespan)
    app.state.manager = manager
    app.include_router(create_router(manager))

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
