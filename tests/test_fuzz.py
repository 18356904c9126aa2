"""Fuzz the HTTP API with schemathesis, from the app's own OpenAPI schema.

Every generated request, valid or not, must get a documented status code
other than 5xx, with a body and content type that match the schema. The
app runs in-process over ASGI, so no socket is opened.

``TASKMILL_FUZZ_EXAMPLES`` sets the examples per operation (default 50, which
keeps the run under a minute); the seed is fixed, so a run repeats.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from taskmill import BaseTask, TaskManager, create_router
from tests.tasks import NoOp

MAX_EXAMPLES = int(os.environ.get("TASKMILL_FUZZ_EXAMPLES", "50"))

# An example took about 10 ms on a developer machine. The timeout adds five
# times that to pytest's default minute, so that larger runs finish.
pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(60 + MAX_EXAMPLES // 20)]

# positive_data_acceptance is left out: the schema types params as any object,
# so a request that fits it may still carry params that the task type rejects.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


class Shape(BaseModel):
    sides: int = Field(default=3, ge=3, le=64)


class EchoParams(BaseModel):
    count: int = Field(default=1, ge=0, le=1_000)
    ratio: float = 0.5
    label: str = Field(default="", max_length=100)
    colour: Colour = Colour.RED
    shapes: list[Shape] = Field(default_factory=list, max_length=10)


class Echo(BaseTask[EchoParams]):
    """Return the params at once, or fail if the label is "fail".

    Its params model gives ``GET /task-types`` a schema with bounds, an enum
    and a nested model to return.
    """

    name = "echo"
    params_model = EchoParams

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, Any]:
        if self.params.label == "fail":
            raise ValueError("The label 'fail' makes the run fail.")
        return self.params.model_dump(mode="json")

    def post(self) -> None:
        pass


@pytest.fixture
def fuzz_manager(make_manager: Callable[..., TaskManager]) -> TaskManager:
    """A manager with quick task types only."""
    manager = make_manager(NoOp, Echo, max_workers=2)
    return manager


@pytest.fixture
def task_ids(fuzz_manager: TaskManager) -> list[str]:
    """Ids of a held, a finished and a failed task, for the fuzzer to act on."""
    held = fuzz_manager.create("echo", start=False)
    finished = fuzz_manager.create("echo", {"label": "done", "shapes": [{}]})
    failed = fuzz_manager.create("echo", {"label": "fail"})
    for task in (finished, failed):
        fuzz_manager.wait(task.id, timeout=10)
    return [held.id, finished.id, failed.id]


@pytest.fixture
def fuzz_app(fuzz_manager: TaskManager) -> FastAPI:
    # No lifespan: make_manager has started the manager and stops it at teardown.
    app = FastAPI()
    app.include_router(create_router(fuzz_manager))
    return app


def _schema_app() -> FastAPI:
    """Build an app for its OpenAPI schema only: the manager never starts."""
    app = FastAPI()
    app.include_router(create_router(TaskManager("sqlite://")))
    return app


# Loaded at import, because schemathesis.pytest.from_fixture() fails on
# pytest 9 (schemathesis 4.32 sets the removed Node._nodeid). The requests go
# to each test's own app through call_and_validate(app=...).
schema = schemathesis.openapi.from_asgi("/openapi.json", _schema_app()).exclude(
    # The event streams never end by themselves, and their 200 body is an
    # event stream that the schema does not describe; tests/test_streams.py
    # covers them. The dashboard routes are not in the schema at all.
    path_regex=r"/stream$",
)


@schema.parametrize()
@schema.given(data=st.data())
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    # The fixtures are set up once per operation and shared by its examples,
    # which is intended: the tasks that earlier examples created stay.
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_schema(
    case: Any, data: st.DataObject, fuzz_app: FastAPI, task_ids: list[str]
) -> None:
    # Random ids reach only the 404 path: half the time, act on a real task.
    if "task_id" in case.path_parameters and data.draw(st.booleans()):
        case.path_parameters["task_id"] = data.draw(st.sampled_from(task_ids))
    case.call_and_validate(app=fuzz_app, checks=CHECKS)
