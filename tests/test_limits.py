"""Size limits on params, results and checkpoints, and on the page size of GET /tasks.

Sizes are those of the compact JSON in UTF-8, which ``compact_size()`` computes
here independently of taskmill.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy import select

from taskmill import (
    BaseTask,
    CheckpointTooLarge,
    Database,
    InvalidParams,
    TaskManager,
    TaskStatus,
    create_router,
    crud,
)

S = TaskStatus
MakeManager = Callable[..., TaskManager]

BIG_COUNT = 2_000_000


def compact_size(value: Any) -> int:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return len(text.encode("utf-8"))


class TextParams(BaseModel):
    text: str = ""


class EchoTask(BaseTask[TextParams]):
    """Return the text param: a JSON string two bytes longer than the text."""

    name = "echo"
    params_model = TextParams

    def pre(self) -> None:
        pass

    def run(self) -> str:
        return self.params.text

    def post(self) -> None:
        pass


class CountParams(BaseModel):
    count: int = BIG_COUNT


class BigResultTask(BaseTask[CountParams]):
    """Return the list of ints from 0 to count - 1: about 15 MB of JSON by default."""

    name = "big_result"
    params_model = CountParams

    def pre(self) -> None:
        pass

    def run(self) -> list[int]:
        return list(range(self.params.count))

    def post(self) -> None:
        pass


class BlobParams(BaseModel):
    size: int
    #: Catch CheckpointTooLarge and return its message as the result.
    catch: bool = False


class BlobCheckpointTask(BaseTask[BlobParams]):
    """Checkpoint a small state, then one whose blob has ``size`` characters."""

    name = "blob_checkpoint"
    params_model = BlobParams

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, str]:
        self.checkpoint({"blob": ""})
        try:
            self.checkpoint({"blob": "x" * self.params.size})
        except CheckpointTooLarge as exc:
            if not self.params.catch:
                raise
            return {"caught": str(exc)}
        return {"saved": "yes"}

    def post(self) -> None:
        pass


class AsyncBlobCheckpointTask(BaseTask[BlobParams]):
    """BlobCheckpointTask with async hooks and ``checkpoint_async()``."""

    name = "async_blob_checkpoint"
    params_model = BlobParams

    async def pre(self) -> None:
        pass

    async def run(self) -> dict[str, str]:
        await self.checkpoint_async({"blob": "x" * self.params.size})
        return {"saved": "yes"}

    async def post(self) -> None:
        pass


def stored_checkpoint(database: Database, task_id: str) -> Any:
    with database.read() as session:
        return session.scalars(
            select(crud.TaskRow.checkpoint).where(crud.TaskRow.id == task_id)
        ).one()


def transitions(manager: TaskManager, task_id: str) -> list[tuple[Any, Any]]:
    return [(e.from_status, e.to_status) for e in manager.events(task_id)]


class StatusWatcher:
    """Poll a task's status on a thread and keep every distinct reading in order."""

    def __init__(self, manager: TaskManager, task_id: str) -> None:
        self.manager = manager
        self.task_id = task_id
        self.seen: list[TaskStatus] = []
        self.ended_at: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> StatusWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        # Bounded: it ends when __exit__ sets the event, or after 60 s.
        deadline = time.monotonic() + 60
        while not self._done.is_set() and time.monotonic() < deadline:
            status = self.manager.get(self.task_id).status
            if not self.seen or self.seen[-1] != status:
                self.seen.append(status)
            if status.is_terminal and self.ended_at is None:
                self.ended_at = time.monotonic()
            time.sleep(0.005)

    def watch_after_end(self, seconds: float) -> None:
        """Keep watching until ``seconds`` after the first terminal status."""
        deadline = time.monotonic() + 60
        while self.ended_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.ended_at is not None, self.seen
        time.sleep(max(0.0, self.ended_at + seconds - time.monotonic()))


# -- settings --


def test_limit_defaults(database_url: str) -> None:
    manager = TaskManager(database_url)
    assert manager.max_params_bytes == 64 * 1024
    assert manager.max_result_bytes == 1024 * 1024
    assert manager.max_checkpoint_bytes == 16 * 1024 * 1024


@pytest.mark.parametrize(
    "setting", ["max_params_bytes", "max_result_bytes", "max_checkpoint_bytes"]
)
@pytest.mark.parametrize("value", [0, -1, True, 1.5, None])
def test_invalid_limit_rejected(database_url: str, setting: str, value: Any) -> None:
    with pytest.raises(ValueError, match=setting):
        TaskManager(database_url, **{setting: value})


# -- params --


def test_params_at_limit_accepted(make_manager: MakeManager) -> None:
    manager = make_manager(EchoTask, max_params_bytes=1024)
    text = "x" * (1024 - compact_size({"text": ""}))
    assert compact_size({"text": text}) == 1024
    task = manager.create("echo", {"text": text})
    assert task.params == {"text": text}
    assert manager.wait(task.id).status == S.FINISHED


def test_params_over_limit_rejected(make_manager: MakeManager) -> None:
    manager = make_manager(EchoTask, max_params_bytes=1024)
    text = "x" * (1025 - compact_size({"text": ""}))
    with pytest.raises(InvalidParams) as caught:
        manager.create("echo", {"text": text})
    message = str(caught.value)
    assert "1025 bytes" in message
    assert "1024 bytes" in message
    assert "max_params_bytes" in message
    assert manager.list() == []


def test_params_size_counts_utf8_bytes(make_manager: MakeManager) -> None:
    manager = make_manager(EchoTask, max_params_bytes=1024)
    # 507 characters, but 1014 bytes in UTF-8: the params take 1025.
    text = "é" * 507
    assert compact_size({"text": text}) == 1025
    with pytest.raises(InvalidParams, match="1025 bytes"):
        manager.create("echo", {"text": text})


def test_params_size_includes_defaults(make_manager: MakeManager) -> None:
    manager = make_manager(BlobCheckpointTask, max_params_bytes=20)
    assert compact_size({"size": 1}) == 10
    # Stored with the default of catch filled in, the params take 24 bytes.
    assert compact_size({"size": 1, "catch": False}) == 24
    with pytest.raises(InvalidParams, match="24 bytes"):
        manager.create("blob_checkpoint", {"size": 1})


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    manager = TaskManager(
        database_url, max_params_bytes=1024, progress_interval=0.05, shutdown_grace=1
    )
    manager.register(EchoTask)
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager))
    with TestClient(app) as client:
        yield client


def test_api_params_over_limit_is_422(client: TestClient) -> None:
    text = "x" * (2000 - compact_size({"text": ""}))
    response = client.post("/tasks", json={"name": "echo", "params": {"text": text}})
    assert response.status_code == 422, response.text
    body = response.json()
    assert "2000 bytes" in body["message"]
    assert "1024 bytes" in body["message"]
    assert "max_params_bytes" in body["message"]
    assert body["detail"][0]["type"] == "too_large"
    assert body["detail"][0]["loc"] == ["body", "params"]
    assert client.get("/tasks").json() == []


def test_api_page_size_capped(client: TestClient) -> None:
    assert client.get("/tasks", params={"limit": 500}).status_code == 200
    assert client.get("/tasks", params={"limit": 501}).status_code == 422
    assert client.get("/tasks", params={"limit": 0}).status_code == 422


# -- results --


def test_result_at_limit_finishes(make_manager: MakeManager) -> None:
    manager = make_manager(EchoTask, max_result_bytes=1024)
    text = "y" * 1022
    assert compact_size(text) == 1024
    task = manager.wait(manager.create("echo", {"text": text}).id)
    assert task.status == S.FINISHED
    assert task.result == text
    assert task.error is None


def test_result_over_limit_fails(make_manager: MakeManager) -> None:
    manager = make_manager(EchoTask, max_result_bytes=1024)
    task = manager.wait(manager.create("echo", {"text": "y" * 1023}).id)
    assert task.status == S.FAILED
    assert task.result is None
    assert task.error is not None
    assert task.error.type == "ResultTooLarge"
    assert task.error.phase == "run"
    assert "1025 bytes" in task.error.message
    assert "1024 bytes" in task.error.message
    assert "max_result_bytes" in task.error.message


def test_huge_result_fails_and_restarts(
    make_manager: MakeManager, database_url: str
) -> None:
    manager = make_manager(BigResultTask)
    expected_size = compact_size(list(range(BIG_COUNT)))
    assert expected_size > 14_000_000
    task_id = manager.create("big_result").id
    with StatusWatcher(manager, task_id) as watcher:
        watcher.watch_after_end(0.5)
    # Once it ended, the task never showed RUNNING again.
    first_end = next(i for i, s in enumerate(watcher.seen) if s.is_terminal)
    assert watcher.seen[first_end:] == [S.FAILED], watcher.seen

    task = manager.get(task_id)
    assert task.status == S.FAILED
    assert task.result is None
    assert task.error is not None
    assert task.error.type == "ResultTooLarge"
    assert f"{expected_size} bytes" in task.error.message
    assert f"{1024 * 1024} bytes" in task.error.message
    assert task.pending_request is None
    assert task.lease_expires_at is None
    assert transitions(manager, task_id) == [
        (None, S.PENDING),
        (S.PENDING, S.RUNNING),
        (S.RUNNING, S.FAILED),
    ]

    # The same run fails the same way again.
    manager.restart(task_id)
    again = manager.wait(task_id)
    assert again.status == S.FAILED
    assert again.error is not None
    assert again.error.type == "ResultTooLarge"
    assert again.attempts == 2

    # A process with a larger limit stores the same result.
    manager.shutdown()
    larger = make_manager(BigResultTask, max_result_bytes=32 * 1024 * 1024)
    larger.restart(task_id)
    finished = larger.wait(task_id)
    assert finished.status == S.FINISHED
    assert finished.error is None
    assert finished.attempts == 3
    assert isinstance(finished.result, list)
    assert len(finished.result) == BIG_COUNT
    assert finished.result == list(range(BIG_COUNT))


# -- checkpoints --


def test_checkpoint_at_limit_saved(make_manager: MakeManager) -> None:
    manager = make_manager(BlobCheckpointTask, max_checkpoint_bytes=1024)
    size = 1024 - compact_size({"blob": ""})
    task = manager.wait(manager.create("blob_checkpoint", {"size": size}).id)
    assert task.status == S.FINISHED
    assert task.result == {"saved": "yes"}


def test_checkpoint_over_limit_fails_run(
    make_manager: MakeManager, database: Database
) -> None:
    manager = make_manager(BlobCheckpointTask, max_checkpoint_bytes=1024)
    size = 1025 - compact_size({"blob": ""})
    task = manager.wait(manager.create("blob_checkpoint", {"size": size}).id)
    assert task.status == S.FAILED
    assert task.error is not None
    assert task.error.type == "CheckpointTooLarge"
    assert task.error.phase == "run"
    assert "1025 bytes" in task.error.message
    assert "1024 bytes" in task.error.message
    assert "max_checkpoint_bytes" in task.error.message
    # The checkpoint before it is kept.
    assert stored_checkpoint(database, task.id) == {"blob": ""}


def test_checkpoint_over_limit_raises_at_call(make_manager: MakeManager) -> None:
    manager = make_manager(BlobCheckpointTask, max_checkpoint_bytes=1024)
    params = {"size": 2000, "catch": True}
    task = manager.wait(manager.create("blob_checkpoint", params).id)
    assert task.status == S.FINISHED
    assert isinstance(task.result, dict)
    assert "max_checkpoint_bytes" in task.result["caught"]


def test_async_checkpoint_over_limit_fails(make_manager: MakeManager) -> None:
    manager = make_manager(AsyncBlobCheckpointTask, max_checkpoint_bytes=1024)
    task = manager.create("async_blob_checkpoint", {"size": 2000})
    ended = manager.wait(task.id)
    assert ended.status == S.FAILED
    assert ended.error is not None
    assert ended.error.type == "CheckpointTooLarge"
