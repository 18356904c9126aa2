"""The demo app: the example tasks behind the task API, on SQLite by default.

``uvicorn --factory taskmill.demo:create_app`` serves it; the database URL
comes from ``TASKMILL_DATABASE_URL``.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from taskmill.api import create_router
from taskmill.database import DEFAULT_DATABASE_URL
from taskmill.examples import Countdown, DirectoryDigest
from taskmill.manager import TaskManager

DATABASE_URL_VARIABLE = "TASKMILL_DATABASE_URL"


def create_manager(database_url: str | None = None) -> TaskManager:
    url = database_url or os.environ.get(DATABASE_URL_VARIABLE, DEFAULT_DATABASE_URL)
    manager = TaskManager(url)
    manager.register(Countdown)
    manager.register(DirectoryDigest)
    return manager


def create_app(database_url: str | None = None) -> FastAPI:
    manager = create_manager(database_url)
    app = FastAPI(title="taskmill demo", lifespan=manager.lifespan)
    app.state.manager = manager
    app.include_router(create_router(manager))

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
