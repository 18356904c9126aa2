"""Tests of the routes that serve the dashboard page and its assets."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient

from taskmill import TaskManager, create_router
from taskmill.dashboard import ASSETS
from taskmill.demo import create_app
from taskmill.examples import Countdown


@pytest.fixture
def manager(database_url: str) -> TaskManager:
    manager = TaskManager(database_url, shutdown_grace=1)
    manager.register(Countdown)
    return manager


def client_for(manager: TaskManager, prefix: str = "", **options: Any) -> TestClient:
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager, **options), prefix=prefix)
    return TestClient(app)


@pytest.fixture
def client(manager: TaskManager) -> Iterator[TestClient]:
    with client_for(manager, prefix="/api") as client:
        yield client


def test_dashboard_page_is_served_under_prefix(client: TestClient) -> None:
    response = client.get("/api/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>taskmill</title>" in response.text
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp


def test_dashboard_page_loads_only_relative_urls(client: TestClient) -> None:
    page = client.get("/api/dashboard").text
    urls = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert "dashboard/static/dashboard.js" in urls
    assert "dashboard/static/dashboard.css" in urls
    for url in urls:
        assert not url.startswith(("/", "http:", "https:")), url


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_dashboard_assets_are_served(client: TestClient, name: str) -> None:
    response = client.get(f"/api/dashboard/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSETS[name]
    assert len(response.content) > 1000


def test_dashboard_script_uses_relative_api_urls(client: TestClient) -> None:
    script = client.get("/api/dashboard/static/dashboard.js").text
    assert '"tasks/stream"' in script
    assert "http://" not in script
    assert "https://" not in script


@pytest.mark.parametrize("name", ["index.html", "../__init__.py", "missing.js"])
def test_unknown_dashboard_asset_is_404(client: TestClient, name: str) -> None:
    assert client.get(f"/api/dashboard/static/{name}").status_code == 404


def test_dashboard_routes_stay_out_of_openapi(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if "dashboard" in path]
    stream = paths["/api/tasks/{task_id}/stream"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert "/api/tasks/stream" in paths


def test_dashboard_false_removes_page_and_assets(manager: TaskManager) -> None:
    with client_for(manager, dashboard=False) as client:
        assert client.get("/dashboard").status_code == 404
        assert client.get("/dashboard/static/dashboard.js").status_code == 404
        assert client.get("/tasks").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
    # The streams are part of the API, which stays.
    assert "/tasks/stream" in paths


def require_key(x_api_key: str | None = Header(default=None)) -> None:
    if x_api_key != "secret":
        raise HTTPException(status_code=401, detail="Missing or invalid X-API-Key.")


@pytest.mark.parametrize(
    "path", ["/dashboard", "/dashboard/static/dashboard.js", "/tasks/stream"]
)
def test_dependencies_guard_the_dashboard(manager: TaskManager, path: str) -> None:
    with client_for(manager, dependencies=[Depends(require_key)]) as client:
        response = client.get(path)
        assert response.status_code == 401
        assert response.json()["detail"] == "Missing or invalid X-API-Key."
        if path.startswith("/dashboard"):
            headers = {"X-API-Key": "secret"}
            assert client.get(path, headers=headers).status_code == 200


def test_dashboard_without_running_manager_is_503(manager: TaskManager) -> None:
    app = FastAPI()
    app.include_router(create_router(manager))
    with TestClient(app) as client:
        assert client.get("/dashboard").status_code == 503


def test_demo_redirects_home_to_dashboard(database_url: str) -> None:
    with TestClient(create_app(database_url)) as client:
        response = client.get("/", follow_redirects=False)
        assert response.status_code == 307
        assert response.headers["location"] == "/dashboard"
        assert client.get("/dashboard").status_code == 200
