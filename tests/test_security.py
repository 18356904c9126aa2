"""Tests of access control: the demo's API key and ``control_dependencies``."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.testclient import TestClient

from taskmill import TaskManager, create_router
from taskmill import api_key as api_key_module
from taskmill.api_key import (
    API_KEY_VARIABLE,
    StreamKeyMiddleware,
    api_key_from_environment,
)
from taskmill.cli import _serve_banner
from taskmill.demo import create_app
from taskmill.examples import Countdown
from tests.conftest import eventually

KEY = "test-key-0123456789"
LONG_TASK = {"name": "countdown", "params": {"seconds": 60, "steps": 60}}


@pytest.fixture
def demo(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv(API_KEY_VARIABLE, KEY)
    with TestClient(create_app(database_url)) as client:
        yield client


def with_key(key: str = KEY) -> dict[str, str]:
    return {"X-API-Key": key}


def wait_status(client: TestClient, task_id: str, status: str) -> None:
    def reached() -> bool:
        response = client.get(f"/tasks/{task_id}", headers=with_key())
        return bool(response.json()["status"] == status)

    eventually(reached)


# -- the demo's API key --

#: Every endpoint of the task API, with a task id filled in later.
ENDPOINTS = [
    ("GET", "/task-types"),
    ("GET", "/tasks"),
    ("POST", "/tasks"),
    ("GET", "/tasks/{id}"),
    ("GET", "/tasks/{id}/events"),
    ("GET", "/tasks/stream"),
    ("GET", "/tasks/{id}/stream"),
    ("POST", "/tasks/{id}/start"),
    ("POST", "/tasks/{id}/resume"),
    ("POST", "/tasks/{id}/pause"),
    ("POST", "/tasks/{id}/stop"),
    ("POST", "/tasks/{id}/restart"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Missing API key: send it in the X-API-Key header."),
        (with_key("wrong"), "Invalid API key in the X-API-Key header."),
        (with_key(""), "Missing API key: send it in the X-API-Key header."),
        (with_key(KEY + "x"), "Invalid API key in the X-API-Key header."),
    ],
)
def test_api_key_required_on_every_endpoint(
    demo: TestClient,
    method: str,
    path: str,
    headers: dict[str, str],
    message: str,
) -> None:
    created = demo.post(
        "/tasks", json={**LONG_TASK, "start": False}, headers=with_key()
    )
    url = path.format(id=created.json()["id"])
    response = demo.request(method, url, json=LONG_TASK, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "APIKey"
    assert response.json() == {"detail": message}


def test_api_key_non_ascii_header_is_401(demo: TestClient) -> None:
    response = demo.get("/tasks", headers={"X-API-Key": "k\xe9y".encode("latin-1")})
    assert response.status_code == 401
    assert response.json()["detail"] == "Invalid API key in the X-API-Key header."


def test_api_key_admits_every_endpoint(demo: TestClient) -> None:
    key = with_key()
    assert demo.get("/task-types", headers=key).status_code == 200
    created = demo.post("/tasks", json={**LONG_TASK, "start": False}, headers=key)
    assert created.status_code == 201
    task_id = created.json()["id"]
    assert demo.get("/tasks", headers=key).json()[0]["id"] == task_id
    assert demo.get(f"/tasks/{task_id}", headers=key).status_code == 200
    assert demo.get(f"/tasks/{task_id}/events", headers=key).status_code == 200
    for action in ("start", "pause"):
        response = demo.post(f"/tasks/{task_id}/{action}", headers=key)
        assert response.status_code == 202, f"{action}: {response.text}"
    wait_status(demo, task_id, "PAUSED")
    for action in ("resume", "stop"):
        response = demo.post(f"/tasks/{task_id}/{action}", headers=key)
        assert response.status_code == 202, f"{action}: {response.text}"
    wait_status(demo, task_id, "STOPPED")
    restarted = demo.post(f"/tasks/{task_id}/restart", headers=key)
    assert restarted.status_code == 202
    assert demo.post(f"/tasks/{task_id}/stop", headers=key).status_code == 202


def test_api_key_compared_in_constant_time(
    demo: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real_compare = secrets.compare_digest

    def recording_compare(given: bytes, expected: bytes) -> bool:
        calls.append((given, expected))
        return real_compare(given, expected)

    monkeypatch.setattr(api_key_module.secrets, "compare_digest", recording_compare)
    assert demo.get("/tasks", headers=with_key("wrong")).status_code == 401
    assert demo.get("/tasks", headers=with_key()).status_code == 200
    assert calls == [(b"wrong", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_api_key_query_parameter_rejected_off_streams(demo: TestClient) -> None:
    response = demo.get("/tasks", params={"api_key": KEY})
    assert response.status_code == 401
    detail = response.json()["detail"]
    assert detail.startswith("Missing API key: send it in the X-API-Key header.")
    assert "accepted only by the event streams" in detail


def test_api_key_query_parameter_checked_on_streams(demo: TestClient) -> None:
    response = demo.get("/tasks/stream", params={"api_key": "wrong"})
    assert response.status_code == 401
    detail = response.json()["detail"]
    assert detail == "Invalid API key in the api_key query parameter."
    empty = demo.get("/tasks/stream", params={"api_key": ""})
    assert empty.status_code == 401
    assert empty.json()["detail"].startswith("Missing API key")


@pytest.mark.parametrize(
    "path",
    [
        "/health",
        "/dashboard",
        "/dashboard/static/dashboard.js",
        "/dashboard/static/dashboard.css",
        "/openapi.json",
    ],
)
def test_api_key_leaves_public_paths_open(demo: TestClient, path: str) -> None:
    assert demo.get(path).status_code == 200


def test_api_key_documented_in_openapi(demo: TestClient) -> None:
    document = demo.get("/openapi.json").json()
    scheme = document["components"]["securitySchemes"]["APIKeyHeader"]
    assert scheme["in"] == "header"
    assert scheme["name"] == "X-API-Key"
    assert document["paths"]["/tasks"]["get"]["security"] == [{"APIKeyHeader": []}]


def test_api_key_unset_leaves_api_open(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(API_KEY_VARIABLE, raising=False)
    with TestClient(create_app(database_url)) as client:
        assert client.get("/tasks").status_code == 200
        assert client.get("/dashboard").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert "security" not in paths["/tasks"]["get"]


@pytest.mark.parametrize("value", ["", " ", "key with spaces", "k\xe9y", "tab\tkey"])
def test_api_key_invalid_value_rejected(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_VARIABLE, value)
    with pytest.raises(ValueError, match=API_KEY_VARIABLE) as raised:
        api_key_from_environment()
    if value.strip():
        assert value not in str(raised.value)


def test_api_key_unset_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_VARIABLE, raising=False)
    assert api_key_from_environment() is None


# -- the query parameter leaves the URL --


def echo_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(StreamKeyMiddleware)

    @app.get("/echo")
    def echo(request: Request) -> dict[str, Any]:
        return {
            "query": request.scope["query_string"].decode(),
            "key": request.scope.get("taskmill.query_api_key", b"").decode(),
        }

    return app


@pytest.mark.parametrize(
    ("query", "kept", "key"),
    [
        ("api_key=abc", "", "abc"),
        ("a=1&api_key=abc&b=%20x", "a=1&b=%20x", "abc"),
        ("api%5Fkey=a%2Bb+c", "", "a+b c"),
        ("api_key=first&api_key=last", "", "last"),
        ("api_key", "", ""),
        ("a=1&b=2", "a=1&b=2", ""),
        ("apikey=1", "apikey=1", ""),
    ],
)
def test_stream_key_removed_from_query(query: str, kept: str, key: str) -> None:
    with TestClient(echo_app()) as client:
        body = client.get(f"/echo?{query}").json()
    assert body["query"] == kept
    assert body["key"] == key


# -- control_dependencies --


def require_role(role: str) -> Callable[..., None]:
    def check(x_role: str | None = Header(default=None)) -> None:
        if x_role != role:
            raise HTTPException(status_code=403, detail=f"Requires role {role!r}.")

    return check


@pytest.fixture
def guarded(database_url: str) -> Iterator[TestClient]:
    """An app where anyone may read, and only the "admin" role may control."""
    manager = TaskManager(database_url, progress_interval=0.05, shutdown_grace=1)
    manager.register(Countdown)
    app = FastAPI(lifespan=manager.lifespan)
    router = create_router(
        manager, control_dependencies=[Depends(require_role("admin"))]
    )
    app.include_router(router)
    with TestClient(app) as client:
        yield client


ADMIN = {"X-Role": "admin"}


def test_control_dependencies_guard_create(guarded: TestClient) -> None:
    response = guarded.post("/tasks", json={**LONG_TASK, "start": False})
    assert response.status_code == 403
    assert response.json()["detail"] == "Requires role 'admin'."
    assert guarded.get("/tasks").json() == []
    created = guarded.post("/tasks", json={**LONG_TASK, "start": False}, headers=ADMIN)
    assert created.status_code == 201


@pytest.mark.parametrize(
    ("action", "admitted_status"),
    [("start", 202), ("resume", 202), ("pause", 409), ("stop", 202), ("restart", 409)],
)
def test_control_dependencies_guard_actions(
    guarded: TestClient, action: str, admitted_status: int
) -> None:
    created = guarded.post("/tasks", json={**LONG_TASK, "start": False}, headers=ADMIN)
    task_id = created.json()["id"]
    response = guarded.post(f"/tasks/{task_id}/{action}")
    assert response.status_code == 403
    assert guarded.get(f"/tasks/{task_id}").json()["status"] == "PAUSED"
    # Past the guard, the held task's status decides: 409 where it forbids the action.
    admitted = guarded.post(f"/tasks/{task_id}/{action}", headers=ADMIN)
    assert admitted.status_code == admitted_status, admitted.text


def test_control_dependencies_leave_reads_open(guarded: TestClient) -> None:
    created = guarded.post("/tasks", json={**LONG_TASK, "start": False}, headers=ADMIN)
    task_id = created.json()["id"]
    assert guarded.get("/task-types").status_code == 200
    assert guarded.get("/tasks").status_code == 200
    assert guarded.get(f"/tasks/{task_id}").status_code == 200
    assert guarded.get(f"/tasks/{task_id}/events").status_code == 200
    assert guarded.get("/dashboard").status_code == 200
    assert guarded.get("/dashboard/static/dashboard.js").status_code == 200


def test_control_dependencies_run_after_dependencies(database_url: str) -> None:
    order: list[str] = []
    manager = TaskManager(database_url, shutdown_grace=1)
    manager.register(Countdown)
    app = FastAPI(lifespan=manager.lifespan)
    router = create_router(
        manager,
        dependencies=[Depends(lambda: order.append("every endpoint"))],
        control_dependencies=[Depends(lambda: order.append("control"))],
    )
    app.include_router(router)
    with TestClient(app) as client:
        client.get("/tasks")
        assert order == ["every endpoint"]
        order.clear()
        client.post("/tasks", json={**LONG_TASK, "start": False})
        assert order == ["every endpoint", "control"]


# -- the serve banner --


def test_banner_names_key_variable_when_set() -> None:
    banner = _serve_banner("sqlite:///x.db", "127.0.0.1", 8000, 1, 4, True)
    assert banner.endswith(
        "; the API requires the key from TASKMILL_API_KEY in the X-API-Key header"
    )


def test_banner_silent_about_key_when_unset() -> None:
    banner = _serve_banner("sqlite:///x.db", "127.0.0.1", 8000, 1, 4)
    assert "key" not in banner.lower()
