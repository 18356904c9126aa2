"""The app that end-to-end tests serve in a subprocess.

``uvicorn --factory tests.app:create_app``; the database URL comes from
``TASKMILL_DATABASE_URL``. It registers the example countdown, a slowed
directory_digest under the demo's name, and the test task types.
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI

from taskmill import TaskManager, create_router
from taskmill.examples import Countdown
from tests.tasks import (
    AsyncSleepTask,
    BlockingTask,
    CrashTask,
    LoopBlockingTask,
    NonResumableStepTask,
    SlowDigest,
    StepTask,
    create_ledger,
)


def create_app() -> FastAPI:
    logging.basicConfig(level=logging.INFO)
    manager = TaskManager(
        os.environ["TASKMILL_DATABASE_URL"],
        max_workers=int(os.environ.get("TASKMILL_TEST_WORKERS", "4")),
        shutdown_grace=float(os.environ.get("TASKMILL_TEST_GRACE", "2")),
        lease_duration=float(os.environ.get("TASKMILL_TEST_LEASE", "60")),
        poll_interval=float(os.environ.get("TASKMILL_TEST_POLL", "1")),
    )
    for task_class in (Countdown, SlowDigest, StepTask, BlockingTask, AsyncSleepTask):
        manager.register(task_class)
    manager.register(NonResumableStepTask)
    manager.register(LoopBlockingTask)
    manager.register(CrashTask)
    manager.database.create_schema()
    create_ledger(manager.database)
    app = FastAPI(lifespan=manager.lifespan)
    app.state.manager = manager
    app.include_router(create_router(manager))

    @app.middleware("http")
    async def name_process(request, call_next):  # type: ignore[no-untyped-def]
        # Names the server process that handled the request, for tests with several.
        response = await call_next(request)
        response.headers["x-server-pid"] = str(os.getpid())
        return response

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
