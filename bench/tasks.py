"""The task type and the app that several benchmarks run.

``uvicorn --factory bench.tasks:create_app`` serves the task API on the
database named by ``BENCH_DATABASE_URL``, with ``NoOp`` registered.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel, Field

from taskmill import BaseTask, TaskManager, create_router

#: The environment variable that gives ``create_app()`` its database URL.
DATABASE_URL_VARIABLE = "BENCH_DATABASE_URL"
#: The environment variable that sets the app's ``max_workers`` (4 if unset).
WORKERS_VARIABLE = "BENCH_WORKERS"


class NoOpParams(BaseModel):
    #: How many progress reports ``run()`` makes before it returns.
    reports: int = Field(default=0, ge=0, le=1_000_000)


class NoOp(BaseTask[NoOpParams]):
    """Report progress ``reports`` times and return None: no work of its own."""

    name = "bench_noop"
    params_model = NoOpParams

    def pre(self) -> None:
        pass

    def run(self) -> None:
        reports = self.params.reports
        for done in range(1, reports + 1):
            self.set_progress(done, reports)

    def post(self) -> None:
        pass


def create_app() -> FastAPI:
    """Build an app that serves the task API for ``NoOp`` tasks."""
    manager = TaskManager(
        os.environ[DATABASE_URL_VARIABLE],
        max_workers=int(os.environ.get(WORKERS_VARIABLE, "4")),
    )
    manager.register(NoOp)
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager, dashboard=False))
    return app
