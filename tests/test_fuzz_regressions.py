"""Request bodies that once got a 5xx or an unexplained 400, each pinned to its 4xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel

from taskmill import BaseTask, TaskManager, create_router
from taskmill.schemas import MAX_PARAMS_DEPTH
from tests.tasks import NoOp


class AnyParams(BaseModel):
    data: Any = None


class AnyData(BaseTask[AnyParams]):
    """Accept any JSON value as ``data`` and return it."""

    name = "any_data"
    params_model = AnyParams

    def pre(self) -> None:
        pass

    def run(self) -> Any:
        return self.params.data

    def post(self) -> None:
        pass


@pytest.fixture
def manager(database_url: str) -> TaskManager:
    manager = TaskManager(database_url, shutdown_grace=1)
    manager.register(NoOp)
    manager.register(AnyData)
    return manager


@pytest.fixture
def client(manager: TaskManager) -> Iterator[TestClient]:
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager))
    with TestClient(app) as client:
        yield client


def post_raw(client: TestClient, body: bytes | str) -> Any:
    headers = {"Content-Type": "application/json"}
    return client.post("/tasks", content=body, headers=headers)


def nested_lists(depth: int) -> str:
    """Return the JSON of ``depth`` lists, each inside the next."""
    return "[" * depth + "]" * depth


def test_body_not_utf8_is_400_naming_encoding(client: TestClient) -> None:
    response = post_raw(client, b'{"name": "\xff"}')
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "not valid UTF-8" in detail
    assert "byte 10" in detail


def test_body_nested_past_parser_is_400(client: TestClient) -> None:
    response = post_raw(
        client, '{"name": "noop", "params": ' + nested_lists(5000) + "}"
    )
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["detail"]


def test_body_integer_too_long_is_400(client: TestClient) -> None:
    body = '{"name": "any_data", "params": {"data": ' + "9" * 5000 + "}}"
    response = post_raw(client, body)
    assert response.status_code == 400
    assert "more than 4300 digits" in response.json()["detail"]


@pytest.mark.parametrize("depth", [MAX_PARAMS_DEPTH, 300, 900])
def test_params_nested_too_deeply_is_422(client: TestClient, depth: int) -> None:
    # The params object is level 1, so the lists in "data" start at level 2.
    body = '{"name": "any_data", "params": {"data": ' + nested_lists(depth) + "}}"
    response = post_raw(client, body)
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "params"]
    assert f"nested {depth + 1} levels deep" in error["msg"]
    assert "input" not in error


def test_params_at_depth_limit_are_accepted(client: TestClient) -> None:
    depth = MAX_PARAMS_DEPTH - 1
    body = '{"name": "any_data", "params": {"data": ' + nested_lists(depth) + "}}"
    response = post_raw(client, body)
    assert response.status_code == 201, response.text


def test_deep_invalid_field_is_422_without_input(client: TestClient) -> None:
    response = post_raw(client, '{"name": ' + nested_lists(900) + "}")
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "name"]
    assert error["type"] == "string_type"
    assert "input" not in error


def test_shallow_invalid_field_keeps_input(client: TestClient) -> None:
    response = client.post("/tasks", json={"name": [[1]]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["input"] == [[1]]


def test_openapi_documents_body_parse_400(client: TestClient) -> None:
    responses = client.get("/openapi.json").json()["paths"]["/tasks"]["post"]
    documented = responses["responses"]
    assert "400" in documented
    schema_ref = documented["400"]["content"]["application/json"]["schema"]["$ref"]
    assert schema_ref.endswith("/ErrorBody")


def test_dependency_400_passes_through(manager: TaskManager) -> None:
    def reject() -> None:
        try:
            int("tenant")
        except ValueError as exc:
            raise HTTPException(status_code=400, detail="Invalid X-Tenant.") from exc

    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager, dependencies=[Depends(reject)]))
    with TestClient(app) as client:
        response = client.get("/tasks")
    assert response.status_code == 400
    assert response.json() == {"detail": "Invalid X-Tenant."}
