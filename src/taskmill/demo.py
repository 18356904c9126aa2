"""The demo app: the example tasks behind the task API, on SQLite by default.

``uvicorn --factory taskmill.demo:create_app`` serves it, with the dashboard
at ``/dashboard``, where ``/`` redirects. The database URL
comes from ``TASKMILL_DATABASE_URL``, and the number of tasks that each
process runs at once from ``TASKMILL_CONCURRENCY`` (0: the process stores and
controls tasks but runs none, so that ``taskmill worker`` processes run them).

When ``TASKMILL_API_KEY`` is set, the task API and its event streams answer
401 to requests without that key (see ``taskmill.api_key``). The dashboard's
page, script and stylesheet stay public, because they contain no data and a
browser cannot send a header when it opens a page; the page asks for the key
when the API answers 401. ``/health`` and the API docs stay public too.
"""

from __future__ import annotations

import inspect
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import RedirectResponse

from taskmill.api import create_router
from taskmill.api_key import (
    StreamKeyMiddleware,
    api_key_dependency,
    api_key_from_environment,
)
from taskmill.dashboard import add_dashboard_routes
from taskmill.database import DEFAULT_DATABASE_URL
from taskmill.examples import Countdown, DirectoryDigest
from taskmill.feed import close_streams
from taskmill.manager import TaskManager

SignalHandler = Callable[[int, FrameType | None], Any]

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
    """Build the demo app; raise ValueError if an environment variable is invalid."""
    api_key = api_key_from_environment()
    manager = create_manager(database_url)
    app = FastAPI(title="taskmill demo", lifespan=manager.lifespan)
    app.state.manager = manager
    if api_key is None:
        app.include_router(create_router(manager))
    else:
        _include_protected_routes(app, manager, api_key)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    _close_streams_on_exit_signals()
    return app


def _include_protected_routes(app: FastAPI, manager: TaskManager, api_key: str) -> None:
    """Add the task API behind ``api_key``, and the dashboard's files without it."""
    app.add_middleware(StreamKeyMiddleware)
    dependencies = [Depends(api_key_dependency(api_key))]
    app.include_router(
        create_router(manager, dependencies=dependencies, dashboard=False)
    )
    dashboard = APIRouter()
    add_dashboard_routes(dashboard)
    app.include_router(dashboard)


def _close_streams_on_exit_signals() -> None:
    """Make SIGINT and SIGTERM end the open event streams, then do what they did.

    uvicorn waits for open connections before it runs the app's shutdown, so
    a dashboard left open would hold up every stop. uvicorn installs its
    signal handlers before it builds the app, and this chains onto them.
    Where the handlers are Python's defaults (not under uvicorn) or the app
    is built off the main thread, nothing changes; ``taskmill serve`` also
    bounds that wait.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            signal.signal(signum, _closing_streams_first(previous))


def _closing_streams_first(previous: SignalHandler) -> SignalHandler:
    def handle(number: int, frame: FrameType | None) -> None:
        # A signal handler must not take locks that the code it interrupted
        # may hold, so the streams are closed from a thread of their own.
        threading.Thread(
            target=close_streams, name="taskmill-close-streams", daemon=True
        ).start()
        previous(number, frame)

    return handle
