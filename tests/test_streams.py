"""Tests of the server-sent event streams and the change feed behind them.

The app runs in a uvicorn server on a thread of this process, so that tests
read real streams over HTTP and can also look at this process's change feed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel
from sqlalchemy import event

from taskmill import BaseTask, TaskManager, create_router
from taskmill.api import STREAM_CHECK_INTERVAL
from taskmill.api_key import API_KEY_VARIABLE
from taskmill.demo import create_app
from taskmill.examples import Countdown
from taskmill.feed import (
    MAX_PENDING,
    POLL_INTERVAL,
    ChangeFeed,
    close_streams,
    feed_for,
)
from tests.conftest import eventually, free_port

#: Seconds that a stream may stay silent before a read fails the test.
READ_TIMEOUT = 10.0


class ChattyParams(BaseModel):
    seconds: float = 1.5
    #: Seconds between two checkpoints, each a database write.
    checkpoint_every: float = 0.005


class ChattyTask(BaseTask[ChattyParams]):
    """Report progress in a tight loop and checkpoint every few milliseconds."""

    name = "chatty"
    params_model = ChattyParams

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, int]:
        started = time.monotonic()
        reports = checkpoints = 0
        next_checkpoint = started
        while (elapsed := time.monotonic() - started) < self.params.seconds:
            reports += 1
            self.set_progress(elapsed, self.params.seconds, f"report {reports}")
            if time.monotonic() >= next_checkpoint:
                checkpoints += 1
                self.checkpoint({"checkpoints": checkpoints})
                next_checkpoint += self.params.checkpoint_every
        return {"reports": reports, "checkpoints": checkpoints}

    def post(self) -> None:
        pass


class ThreadServer:
    """uvicorn serving ``app`` on a thread of this process."""

    def __init__(self, app: FastAPI) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=int(self.url.rsplit(":", 1)[1]),
            log_level="warning",
            # Open streams would otherwise hold up the shutdown.
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        eventually(lambda: self.server.started, timeout=10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "The server thread did not stop"


@pytest.fixture
def manager(database_url: str) -> TaskManager:
    manager = TaskManager(database_url, progress_interval=0.05, shutdown_grace=1)
    manager.register(Countdown)
    manager.register(ChattyTask)
    return manager


def serve(manager: TaskManager, **router_options: Any) -> ThreadServer:
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager, **router_options))
    return ThreadServer(app)


@pytest.fixture
def server(manager: TaskManager) -> Iterator[ThreadServer]:
    with serve(manager) as running:
        yield running


@pytest.fixture
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=READ_TIMEOUT) as client:
        yield client


Event = tuple[str, Any]


class EventReader:
    """Parses the server-sent events of one streamed response."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()
        #: Every event read so far, as (name, data).
        self.events: list[Event] = []

    def until(self, done: Callable[[list[Event]], bool]) -> list[Event]:
        """Read until ``done(events)`` is true; return every event read so far."""
        name, data = "message", []
        deadline = time.monotonic() + 30
        for line in self.lines:
            assert time.monotonic() < deadline, f"Stream open after 30 s: {self.events}"
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").removeprefix(" "))
            elif line == "" and data:
                self.events.append((name, json.loads("\n".join(data))))
                name, data = "message", []
                if done(self.events):
                    return self.events
        raise AssertionError(f"Stream ended early after {self.events}")


def read_events(
    response: httpx.Response, done: Callable[[list[Event]], bool]
) -> list[Event]:
    """Read a stream's events from its start until ``done(events)`` is true.

    The reader is dropped afterwards, and with it the connection.
    """
    return EventReader(response).until(done)


def last_task_has(status: str) -> Callable[[list[Event]], bool]:
    def done(events: list[Event]) -> bool:
        return (
            bool(events)
            and events[-1][0] == "task"
            and events[-1][1]["status"] == status
        )

    return done


def create(client: httpx.Client, name: str, params: dict[str, Any], **body: Any) -> str:
    response = client.post("/tasks", json={"name": name, "params": params, **body})
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


def feed_is_idle(feed: ChangeFeed) -> bool:
    return feed.subscriber_count == 0 and not feed.is_polling


# -- one task --


def test_task_stream_starts_with_task_and_history(client: httpx.Client) -> None:
    task_id = create(client, "countdown", {"seconds": 0, "steps": 1}, start=False)
    with client.stream("GET", f"/tasks/{task_id}/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response, lambda events: len(events) == 2)
    (first, task), (second, history) = events
    assert first == "task"
    assert task["id"] == task_id
    assert task["status"] == "PAUSED"
    assert task["allowed_actions"] == ["start", "resume", "stop"]
    assert second == "history"
    assert [event["to_status"] for event in history] == ["PAUSED"]


def test_task_stream_events_arrive_in_order(client: httpx.Client) -> None:
    task_id = create(client, "countdown", {"seconds": 1, "steps": 10}, start=False)
    with client.stream("GET", f"/tasks/{task_id}/stream") as response:
        reader = EventReader(response)
        reader.until(lambda events: len(events) == 2)
        assert client.post(f"/tasks/{task_id}/start").status_code == 202
        events = reader.until(last_task_has("FINISHED"))

    tasks = [data for name, data in events if name == "task"]
    progress = [task["progress"] for task in tasks]
    assert progress == sorted(progress)
    assert progress[-1] == 100
    assert len(set(progress)) >= 3, progress  # It moved while it ran.
    updated = [task["updated_at"] for task in tasks]
    assert len(set(updated)) == len(updated)  # No task event repeats.
    history = [item for name, data in events if name == "history" for item in data]
    assert [item["id"] for item in history] == sorted({item["id"] for item in history})
    transitions = ["PAUSED", "PENDING", "RUNNING", "FINISHED"]
    assert [item["to_status"] for item in history] == transitions
    statuses = [task["status"] for task in tasks]
    assert statuses == sorted(statuses, key=transitions.index)


def test_task_stream_coalesces_progress_reports(client: httpx.Client) -> None:
    started = time.monotonic()
    task_id = create(client, "chatty", {"seconds": 1.5})
    with client.stream("GET", f"/tasks/{task_id}/stream") as response:
        events = read_events(response, last_task_has("FINISHED"))
    seconds = time.monotonic() - started

    result = events[-1][1]["result"]
    assert result["reports"] > 10_000
    assert result["checkpoints"] > 50
    task_events = [data for name, data in events if name == "task"]
    # At most one per poll, plus the first snapshot and the last change.
    assert len(task_events) <= seconds / POLL_INTERVAL + 3, len(task_events)


def test_task_stream_of_unknown_task_is_404(client: httpx.Client) -> None:
    response = client.get("/tasks/no-such-id/stream")
    assert response.status_code == 404
    assert "'no-such-id'" in response.json()["detail"]


# -- all tasks --


def test_tasks_stream_sends_counts_then_changes(client: httpx.Client) -> None:
    create(client, "countdown", {"seconds": 0, "steps": 1}, start=False)
    with client.stream("GET", "/tasks/stream") as response:
        assert response.status_code == 200
        reader = EventReader(response)
        name, counts = reader.until(lambda events: len(events) == 1)[0]
        assert name == "counts"
        assert counts == {
            "PENDING": 0,
            "RUNNING": 0,
            "PAUSED": 1,
            "FINISHED": 0,
            "FAILED": 0,
            "STOPPED": 0,
        }
        task_id = create(client, "countdown", {"seconds": 0, "steps": 1})
        reader.until(last_task_has("FINISHED"))
        # Counts follow within COUNTS_INTERVAL of the change.
        events = reader.until(
            lambda events: events[-1][0] == "counts" and events[-1][1]["FINISHED"] == 1
        )

    assert task_id in {data["id"] for name, data in events if name == "task"}
    assert events[-1][1]["PAUSED"] == 1
    assert events[-1][1]["PENDING"] == 0


def test_tasks_stream_without_running_manager_is_503(manager: TaskManager) -> None:
    app = FastAPI()  # No lifespan: the manager never starts.
    app.include_router(create_router(manager))
    with ThreadServer(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/tasks/stream").status_code == 503


# -- the feed --


def test_disconnected_clients_free_their_subscriptions(
    client: httpx.Client, manager: TaskManager
) -> None:
    task_id = create(client, "countdown", {"seconds": 0, "steps": 1}, start=False)
    feed = feed_for(manager.database)
    with (
        client.stream("GET", "/tasks/stream") as all_tasks,
        client.stream("GET", f"/tasks/{task_id}/stream") as one_task,
    ):
        readers = [EventReader(all_tasks), EventReader(one_task)]
        readers[0].until(lambda events: len(events) == 1)
        readers[1].until(lambda events: len(events) == 2)
        time.sleep(3 * POLL_INTERVAL)
        assert feed.subscriber_count == 2
        assert feed.is_polling
    # Leaving the blocks closed both connections.
    eventually(lambda: feed_is_idle(feed), timeout=5)
    assert not [t for t in threading.enumerate() if t.name == "taskmill-feed"]


def test_clients_share_one_poll_per_interval(
    server: ThreadServer, manager: TaskManager
) -> None:
    polls = []

    def count_polls(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "tasks.updated_at >=" in statement:
            polls.append(time.monotonic())

    event.listen(manager.database.engine, "before_cursor_execute", count_polls)
    clients = [
        httpx.Client(base_url=server.url, timeout=READ_TIMEOUT) for _ in range(4)
    ]
    try:
        streams = [c.stream("GET", "/tasks/stream") for c in clients]
        readers = [EventReader(stream.__enter__()) for stream in streams]
        for reader in readers:
            reader.until(lambda events: len(events) == 1)
        feed = feed_for(manager.database)
        assert feed.subscriber_count == 4
        polls.clear()
        time.sleep(1.0)
        assert len(polls) <= 1.0 / POLL_INTERVAL + 1, polls
        threads = [t for t in threading.enumerate() if t.name == "taskmill-feed"]
        assert len(threads) == 1
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
        for http_client in clients:
            http_client.close()
        event.remove(manager.database.engine, "before_cursor_execute", count_polls)
    eventually(lambda: feed_is_idle(feed), timeout=5)


def test_flood_of_changes_sends_reload(
    client: httpx.Client, manager: TaskManager
) -> None:
    with client.stream("GET", "/tasks/stream") as response:
        reader = EventReader(response)
        reader.until(lambda events: len(events) == 1)
        with manager.database.write() as session:
            from taskmill import crud

            for _ in range(MAX_PENDING + 1):
                crud.create_task(session, name="countdown", params={}, status="PAUSED")
        events = reader.until(lambda events: events[-1][0] == "reload")
    assert not [data for name, data in events if name == "task"]


def test_close_streams_ends_open_streams(
    client: httpx.Client, manager: TaskManager
) -> None:
    task_id = create(client, "countdown", {"seconds": 0, "steps": 1}, start=False)
    with (
        client.stream("GET", "/tasks/stream") as all_tasks,
        client.stream("GET", f"/tasks/{task_id}/stream") as one_task,
    ):
        readers = [EventReader(all_tasks), EventReader(one_task)]
        readers[0].until(lambda events: len(events) == 1)
        readers[1].until(lambda events: len(events) == 2)
        started = time.monotonic()
        close_streams()
        for reader in readers:
            # The server ends the response: reading runs to its end, rather
            # than failing after READ_TIMEOUT.
            list(reader.lines)
        assert time.monotonic() - started < 2 * STREAM_CHECK_INTERVAL
    eventually(lambda: feed_is_idle(feed_for(manager.database)), timeout=5)


# -- dependencies --


def require_key(x_api_key: str | None = Header(default=None)) -> None:
    if x_api_key != "secret":
        raise HTTPException(status_code=401, detail="Missing or invalid X-API-Key.")


def test_dependencies_guard_the_streams(manager: TaskManager) -> None:
    with (
        serve(manager, dependencies=[Depends(require_key)]) as server,
        httpx.Client(base_url=server.url, timeout=READ_TIMEOUT) as client,
    ):
        task_id = create_with_key(client)
        assert client.get("/tasks/stream").status_code == 401
        assert client.get(f"/tasks/{task_id}/stream").status_code == 401
        headers = {"X-API-Key": "secret"}
        with client.stream("GET", "/tasks/stream", headers=headers) as response:
            assert response.status_code == 200
            assert read_events(response, lambda events: True)[0][0] == "counts"
        path = f"/tasks/{task_id}/stream"
        with client.stream("GET", path, headers=headers) as response:
            assert response.status_code == 200
            assert read_events(response, lambda events: True)[0][0] == "task"


def create_with_key(client: httpx.Client) -> str:
    response = client.post(
        "/tasks",
        json={"name": "countdown", "params": {"seconds": 0, "steps": 1}},
        headers={"X-API-Key": "secret"},
    )
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


DEMO_KEY = "stream-test-key"


@pytest.mark.parametrize("how", ["header", "query"])
def test_demo_streams_accept_api_key(
    database_url: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setenv(API_KEY_VARIABLE, DEMO_KEY)
    with (
        ThreadServer(create_app(database_url)) as server,
        httpx.Client(base_url=server.url, timeout=READ_TIMEOUT) as client,
    ):
        response = client.post(
            "/tasks",
            json={"name": "countdown", "params": {"seconds": 0, "steps": 1}},
            headers={"X-API-Key": DEMO_KEY},
        )
        assert response.status_code == 201, response.text
        task_id = response.json()["id"]
        for path in ("/tasks/stream", f"/tasks/{task_id}/stream"):
            assert client.get(path).status_code == 401
            wrong = client.get(path, params={"api_key": "wrong"})
            assert wrong.status_code == 401
            if how == "header":
                options: dict[str, Any] = {"headers": {"X-API-Key": DEMO_KEY}}
            else:
                options = {"params": {"api_key": DEMO_KEY}}
            with client.stream("GET", path, **options) as response:
                assert response.status_code == 200
                first = read_events(response, lambda events: True)[0][0]
                assert first in ("counts", "task")
