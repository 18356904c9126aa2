from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from taskmill import TaskManager, create_router
from taskmill.examples import Countdown, DirectoryDigest
from tests.conftest import eventually
from tests.tasks import BlockingTask


@pytest.fixture
def manager(database_url: str) -> TaskManager:
    manager = TaskManager(database_url, progress_interval=0.05, shutdown_grace=1)
    for task_class in (Countdown, DirectoryDigest, BlockingTask):
        manager.register(task_class)
    return manager


@pytest.fixture
def client(manager: TaskManager) -> Iterator[TestClient]:
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager), prefix="/api")
    with TestClient(app) as client:
        yield client


def create(
    client: TestClient, name: str = "countdown", **body: object
) -> dict[str, object]:
    body.setdefault("params", {"seconds": 0, "steps": 1})
    response = client.post("/api/tasks", json={"name": name, **body})
    assert response.status_code == 201, response.text
    task: dict[str, object] = response.json()
    return task


def wait_status(
    client: TestClient, task_id: object, *statuses: str
) -> dict[str, object]:
    def reached() -> dict[str, object] | None:
        task: dict[str, object] = client.get(f"/api/tasks/{task_id}").json()
        return task if task["status"] in statuses else None

    result: dict[str, object] = eventually(reached)
    return result


def test_task_types_list_names_and_schemas(client: TestClient) -> None:
    response = client.get("/api/task-types")
    assert response.status_code == 200
    types = {item["name"]: item for item in response.json()}
    assert set(types) == {"blocking", "countdown", "directory_digest"}
    schema = types["countdown"]["params_schema"]
    assert set(schema["properties"]) == {"seconds", "steps"}
    assert types["countdown"]["description"].startswith("Sleep")


def test_create_task_returns_201_and_runs(client: TestClient) -> None:
    task = create(client)
    assert task["status"] in ("PENDING", "RUNNING", "FINISHED")
    assert task["params"] == {"seconds": 0.0, "steps": 1}
    done = wait_status(client, task["id"], "FINISHED")
    assert done["result"] == {"steps": 1}
    assert done["progress"] == 100
    assert done["allowed_actions"] == ["restart"]
    for field in ("created_at", "started_at", "finished_at", "updated_at"):
        assert str(done[field]).endswith(("Z", "+00:00"))


def test_create_held_task(client: TestClient) -> None:
    task = create(client, start=False)
    assert task["status"] == "PAUSED"
    assert task["allowed_actions"] == ["start", "resume", "stop"]


def test_create_unknown_name_is_404(client: TestClient) -> None:
    response = client.post("/api/tasks", json={"name": "nope", "params": {}})
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert "'nope'" in detail
    assert "'countdown'" in detail


def test_create_invalid_params_is_422_naming_field(client: TestClient) -> None:
    response = client.post(
        "/api/tasks",
        json={"name": "countdown", "params": {"seconds": "soon", "steps": 2}},
    )
    assert response.status_code == 422
    body = response.json()
    assert body["detail"][0]["loc"] == ["body", "params", "seconds"]
    assert "seconds" in body["message"]


def test_create_missing_param_is_422(client: TestClient) -> None:
    response = client.post("/api/tasks", json={"name": "countdown", "params": {}})
    assert response.status_code == 422
    locs = [error["loc"] for error in response.json()["detail"]]
    assert ["body", "params", "seconds"] in locs
    assert ["body", "params", "steps"] in locs


@pytest.mark.parametrize(
    "body",
    [{}, {"params": {}}, {"name": ""}, {"name": "countdown", "extra": 1}, {"name": 5}],
)
def test_create_malformed_body_is_422(
    client: TestClient, body: dict[str, object]
) -> None:
    assert client.post("/api/tasks", json=body).status_code == 422


def test_nothing_stored_after_rejected_create(client: TestClient) -> None:
    client.post("/api/tasks", json={"name": "countdown", "params": {"steps": -1}})
    client.post("/api/tasks", json={"name": "nope"})
    assert client.get("/api/tasks").json() == []


def test_list_tasks_newest_first_with_filters(client: TestClient) -> None:
    held_ids = [create(client, start=False)["id"] for _ in range(3)]
    ran = create(client)["id"]
    wait_status(client, ran, "FINISHED")
    listed = client.get("/api/tasks").json()
    assert [task["id"] for task in listed] == [ran, *held_ids[::-1]]
    paused = client.get("/api/tasks", params={"status": "PAUSED"}).json()
    assert [task["id"] for task in paused] == held_ids[::-1]
    both = client.get(
        "/api/tasks", params=[("status", "PAUSED"), ("status", "FINISHED")]
    )
    assert len(both.json()) == 4
    page = client.get("/api/tasks", params={"limit": 2, "offset": 1}).json()
    assert [task["id"] for task in page] == held_ids[::-1][:2]
    assert client.get("/api/tasks", params={"name": "blocking"}).json() == []


@pytest.mark.parametrize(
    "params",
    [
        {"status": "DONE"},
        {"limit": 0},
        {"limit": 10_000},
        {"offset": -1},
        {"limit": "x"},
    ],
)
def test_list_tasks_bad_query_is_422(
    client: TestClient, params: dict[str, object]
) -> None:
    assert client.get("/api/tasks", params=params).status_code == 422


def test_read_unknown_task_is_404(client: TestClient) -> None:
    response = client.get("/api/tasks/no-such-id")
    assert response.status_code == 404
    assert "'no-such-id'" in response.json()["detail"]


def test_events_oldest_first(client: TestClient) -> None:
    task = create(client)
    wait_status(client, task["id"], "FINISHED")
    events = client.get(f"/api/tasks/{task['id']}/events").json()
    assert [(e["from_status"], e["to_status"]) for e in events] == [
        (None, "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "FINISHED"),
    ]
    assert all(e["task_id"] == task["id"] for e in events)


def test_events_of_unknown_task_is_404(client: TestClient) -> None:
    assert client.get("/api/tasks/nope/events").status_code == 404


@pytest.mark.parametrize("action", ["start", "resume"])
def test_start_or_resume_held_task(client: TestClient, action: str) -> None:
    task = create(client, start=False)
    response = client.post(f"/api/tasks/{task['id']}/{action}")
    assert response.status_code == 202
    assert response.json()["status"] == "PENDING"
    wait_status(client, task["id"], "FINISHED")


def test_pause_and_resume_running_task(client: TestClient) -> None:
    task = create(client, params={"seconds": 2, "steps": 20})
    wait_status(client, task["id"], "RUNNING")
    response = client.post(f"/api/tasks/{task['id']}/pause")
    assert response.status_code == 202
    assert response.json()["pending_request"] in ("PAUSE", None)
    paused = wait_status(client, task["id"], "PAUSED")
    assert paused["pending_request"] is None
    assert client.post(f"/api/tasks/{task['id']}/resume").status_code == 202
    done = wait_status(client, task["id"], "FINISHED")
    assert done["attempts"] == 2


def test_stop_running_task(client: TestClient) -> None:
    task = create(client, params={"seconds": 5, "steps": 50})
    wait_status(client, task["id"], "RUNNING")
    assert client.post(f"/api/tasks/{task['id']}/stop").status_code == 202
    stopped = wait_status(client, task["id"], "STOPPED")
    assert stopped["result"] is None
    assert stopped["error"] is None


def test_restart_finished_task(client: TestClient) -> None:
    task = create(client)
    wait_status(client, task["id"], "FINISHED")
    response = client.post(f"/api/tasks/{task['id']}/restart")
    assert response.status_code == 202
    assert response.json()["status"] == "PENDING"
    assert wait_status(client, task["id"], "FINISHED")["attempts"] == 2


@pytest.mark.parametrize("action", ["pause", "stop", "start", "resume"])
def test_action_on_finished_task_is_409(client: TestClient, action: str) -> None:
    task = create(client)
    wait_status(client, task["id"], "FINISHED")
    response = client.post(f"/api/tasks/{task['id']}/{action}")
    assert response.status_code == 409
    body = response.json()
    assert body["status"] == "FINISHED"
    assert body["allowed_actions"] == ["restart"]
    assert "FINISHED" in body["detail"]
    assert "restart" in body["detail"]


def test_restart_running_task_is_409(client: TestClient) -> None:
    task = create(client, "blocking", params={"seconds": 0.5})
    wait_status(client, task["id"], "RUNNING")
    response = client.post(f"/api/tasks/{task['id']}/restart")
    assert response.status_code == 409
    assert response.json()["allowed_actions"] == ["pause", "stop"]


@pytest.mark.parametrize("action", ["start", "resume", "pause", "stop", "restart"])
def test_action_on_unknown_task_is_404(client: TestClient, action: str) -> None:
    assert client.post(f"/api/tasks/nope/{action}").status_code == 404


def test_unknown_action_is_404(client: TestClient) -> None:
    task = create(client, start=False)
    assert client.post(f"/api/tasks/{task['id']}/explode").status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/tasks"),
        ("GET", "/tasks"),
        ("GET", "/tasks/x"),
        ("POST", "/tasks/x/pause"),
    ],
)
def test_without_running_manager_is_503(
    manager: TaskManager, method: str, path: str
) -> None:
    app = FastAPI()
    app.include_router(create_router(manager))
    with TestClient(app) as client:
        response = client.request(method, path, json={"name": "countdown"})
    assert response.status_code == 503
    assert "lifespan" in response.json()["detail"]


def test_dependencies_guard_every_endpoint(manager: TaskManager) -> None:
    from fastapi import Depends, Header, HTTPException

    def require_key(x_api_key: str | None = Header(default=None)) -> None:
        if x_api_key != "secret":
            raise HTTPException(status_code=401, detail="Missing or invalid X-API-Key.")

    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager, dependencies=[Depends(require_key)]))
    with TestClient(app) as client:
        assert client.get("/tasks").status_code == 401
        assert client.get("/task-types").status_code == 401
        assert client.get("/tasks", headers={"X-API-Key": "secret"}).status_code == 200


def test_openapi_documents_error_responses(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "404" in paths["/api/tasks/{task_id}"]["get"]["responses"]
    assert "409" in paths["/api/tasks/{task_id}/pause"]["post"]["responses"]
    assert "503" in paths["/api/tasks"]["get"]["responses"]
