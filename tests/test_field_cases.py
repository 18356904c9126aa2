"""Failures that users of other task systems met, replayed against taskmill.

The failures: held tasks forgotten after a restart, runs orphaned by kill -9,
stop requests that a thread ignores, and request-scoped objects in params.
Also exceptions that vanish, runs cancelled with their request, and progress
writes that flood the database. Behaviour that crosses processes runs against
a real server subprocess, and the rest on in-process managers.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from taskmill import (
    BaseTask,
    ControlRequest,
    Database,
    InvalidParams,
    NoParams,
    TaskInfo,
    TaskManager,
    TaskStatus,
)
from tests.conftest import ServerProcess, eventually
from tests.tasks import (
    AsyncSleepTask,
    BlockingTask,
    NoOp,
    StepParams,
    StepTask,
    ledger_steps,
)

S = TaskStatus
MakeManager = Callable[..., TaskManager]
MakeServer = Callable[..., ServerProcess]

#: Seconds to wait for what takes well under a second on an idle machine.
PROMPT_TIMEOUT = 3.0

# -- helpers for the server tests --


def create_over_http(client: httpx.Client, name: str, params: dict[str, Any]) -> str:
    response = client.post("/tasks", json={"name": name, "params": params})
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


def fetch(client: httpx.Client, task_id: str) -> dict[str, Any]:
    response = client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    return info


def act_over_http(client: httpx.Client, task_id: str, action: str) -> dict[str, Any]:
    response = client.post(f"/tasks/{task_id}/{action}")
    assert response.status_code == 202, response.text
    info: dict[str, Any] = response.json()
    return info


def wait_over_http(
    client: httpx.Client,
    task_id: str,
    statuses: set[str],
    timeout: float = 15.0,
) -> dict[str, Any]:
    """Poll ``GET /tasks/{id}`` until the task reaches one of ``statuses``."""

    def reached() -> dict[str, Any] | None:
        info = fetch(client, task_id)
        return info if info["status"] in statuses else None

    info: dict[str, Any] = eventually(reached, timeout=timeout)
    return info


def events_over_http(client: httpx.Client, task_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/tasks/{task_id}/events")
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    return events


# -- held and stopped tasks across a restart --


@pytest.mark.e2e
@pytest.mark.parametrize("crash", ["kill9", "term"])
def test_paused_and_stopped_survive_restart(
    make_server: MakeServer, database: Database, crash: str
) -> None:
    server = make_server(TASKMILL_TEST_WORKERS="1")
    client = server.client

    paused_id = create_over_http(client, "step", {"n": 10, "step_s": 0.2})
    eventually(lambda: fetch(client, paused_id)["progress"] >= 30)
    act_over_http(client, paused_id, "pause")
    paused = wait_over_http(client, paused_id, {"PAUSED"})
    progress_at_pause = paused["progress"]
    steps_at_pause = ledger_steps(database, paused_id)
    assert steps_at_pause == list(range(1, int(progress_at_pause // 10) + 1))
    assert 3 <= len(steps_at_pause) < 10

    # The one worker is busy, so the second step task waits as PENDING.
    blocker_id = create_over_http(client, "blocking", {"seconds": 1.0})
    wait_over_http(client, blocker_id, {"RUNNING"})
    stopped_id = create_over_http(client, "step", {"n": 10, "step_s": 0.05})
    assert fetch(client, stopped_id)["status"] == "PENDING"
    assert act_over_http(client, stopped_id, "stop")["status"] == "STOPPED"

    getattr(server, crash)()
    server.restart()
    time.sleep(1.5)

    paused = fetch(client, paused_id)
    assert paused["status"] == "PAUSED"
    assert paused["progress"] == progress_at_pause
    assert ledger_steps(database, paused_id) == steps_at_pause
    stopped = fetch(client, stopped_id)
    assert stopped["status"] == "STOPPED"
    assert stopped["finished_at"] is not None
    assert ledger_steps(database, stopped_id) == []

    act_over_http(client, paused_id, "resume")
    finished = wait_over_http(client, paused_id, {"FINISHED", "FAILED", "STOPPED"})
    assert finished["status"] == "FINISHED"
    assert finished["result"] == {"sum": 55}
    assert finished["progress"] == 100
    assert ledger_steps(database, paused_id) == list(range(1, 11))
    assert fetch(client, stopped_id)["status"] == "STOPPED"
    assert ledger_steps(database, stopped_id) == []


# -- runs orphaned by kill -9 --


def run_until_gate_then_kill(
    server: ServerProcess, database: Database, name: str, gate: Path
) -> tuple[str, str]:
    """Run a step task up to its gate at step 4, then kill the server.

    Returns the task id and the owner of the killed run. The gate file exists
    when this returns, so a resumed run passes the gate.
    """
    client = server.client
    params = {"n": 10, "step_s": 0.05, "gate_step": 4, "gate_file": str(gate)}
    task_id = create_over_http(client, name, params)

    def at_gate() -> dict[str, Any] | None:
        info = fetch(client, task_id)
        return info if info["progress"] == 30 and info["status"] == "RUNNING" else None

    running = eventually(at_gate)
    assert ledger_steps(database, task_id) == [1, 2, 3]
    old_owner: str = running["owner"]
    assert old_owner

    server.kill9()
    gate.touch()
    server.restart()
    return task_id, old_owner


@pytest.mark.e2e
def test_killed_run_resumes_under_new_owner(
    make_server: MakeServer, database: Database, tmp_path: Path
) -> None:
    server = make_server()
    client = server.client
    task_id, old_owner = run_until_gate_then_kill(
        server, database, "step", tmp_path / "gate"
    )

    recovered = fetch(client, task_id)
    # PENDING while the retry backoff of the crashed run lasts.
    assert recovered["status"] in {"PENDING", "RUNNING", "FINISHED"}
    if recovered["status"] == "RUNNING":
        assert recovered["owner"] is not None
        assert recovered["owner"] != old_owner
    assert recovered["recoveries"] == 1
    assert recovered["failures"] == 1

    requeued = [
        e
        for e in events_over_http(client, task_id)
        if (e["from_status"], e["to_status"]) == ("RUNNING", "PENDING")
    ]
    assert len(requeued) == 1
    assert requeued[0]["reason"].startswith("interrupted")
    assert old_owner in requeued[0]["reason"]

    finished = wait_over_http(client, task_id, {"FINISHED", "FAILED", "STOPPED"})
    assert finished["status"] == "FINISHED"
    assert finished["result"] == {"sum": 55}
    assert finished["recoveries"] == 1
    assert finished["attempts"] == 2
    assert ledger_steps(database, task_id) == list(range(1, 11))


@pytest.mark.e2e
def test_killed_non_resumable_run_fails(
    make_server: MakeServer, database: Database, tmp_path: Path
) -> None:
    server = make_server()
    client = server.client
    task_id, old_owner = run_until_gate_then_kill(
        server, database, "step_not_resumable", tmp_path / "gate"
    )

    failed = fetch(client, task_id)
    assert failed["status"] == "FAILED"
    assert failed["error"]["type"] == "Interrupted"
    assert old_owner in failed["error"]["message"]
    assert failed["finished_at"] is not None
    assert failed["recoveries"] == 1
    assert failed["owner"] is None

    time.sleep(0.5)
    assert fetch(client, task_id)["status"] == "FAILED"
    assert ledger_steps(database, task_id) == [1, 2, 3]


# -- stopping a task whose hook runs on a thread --


def test_stop_ends_run_and_thread(make_manager: MakeManager) -> None:
    manager = make_manager(StepTask)
    threads_before = threading.active_count()
    created = manager.create("step", {"n": 20, "step_s": 0.1})
    eventually(lambda: manager.get(created.id).progress >= 20)

    requested = manager.stop(created.id)
    assert requested.pending_request == ControlRequest.STOP

    stopped = manager.wait(created.id, timeout=PROMPT_TIMEOUT)
    assert stopped.status == S.STOPPED
    assert stopped.finished_at is not None
    assert stopped.result is None
    assert stopped.pending_request is None
    steps_at_stop = ledger_steps(manager.database, created.id)
    assert 2 <= len(steps_at_stop) < 20

    time.sleep(1.0)
    assert ledger_steps(manager.database, created.id) == steps_at_stop
    assert manager.get(created.id).status == S.STOPPED
    eventually(
        lambda: threading.active_count() <= threads_before, timeout=PROMPT_TIMEOUT
    )


def test_stop_waits_for_blocking_call(make_manager: MakeManager) -> None:
    manager = make_manager(BlockingTask)
    created = manager.create("blocking", {"seconds": 2.0})
    manager.wait(created.id, {S.RUNNING})
    # Let run() enter its blocking call on the one thread that runs the hooks.
    time.sleep(0.3)
    hooks = [t for t in threading.enumerate() if t.name == "taskmill-hook"]
    assert len(hooks) == 1
    hook = hooks[0]

    requested = manager.stop(created.id)
    assert requested.status == S.RUNNING
    assert requested.pending_request == ControlRequest.STOP

    deadline = time.monotonic() + 10
    polls = 0
    while hook.is_alive() and time.monotonic() < deadline:
        info = manager.get(created.id)
        # Read the row first: a thread alive after the read was alive during it.
        if hook.is_alive():
            assert info.status == S.RUNNING
            assert info.pending_request == ControlRequest.STOP
            polls += 1
        time.sleep(0.05)
    assert not hook.is_alive()
    assert polls >= 5

    stopped = manager.wait(created.id, timeout=PROMPT_TIMEOUT)
    assert stopped.status == S.STOPPED
    assert stopped.result is None
    assert stopped.finished_at is not None
    reached = [event.to_status for event in manager.events(created.id)]
    assert S.FINISHED not in reached


def test_stop_cancels_async_sleep_promptly(make_manager: MakeManager) -> None:
    manager = make_manager(AsyncSleepTask)
    created = manager.create("async_sleep", {"seconds": 10.0})
    manager.wait(created.id, {S.RUNNING})

    requested_at = time.monotonic()
    manager.stop(created.id)
    stopped = manager.wait(created.id, timeout=PROMPT_TIMEOUT)
    assert stopped.status == S.STOPPED
    assert stopped.result is None
    assert time.monotonic() - requested_at < PROMPT_TIMEOUT


# -- request-scoped objects and sessions --

items_metadata = MetaData()
items = Table(
    "items",
    items_metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
)


class AnyItemParams(BaseModel):
    item: Any = None


class AnyItemTask(BaseTask[AnyItemParams]):
    """Accepts any value as its item, so only the JSON check can reject one."""

    name = "any_item"
    params_model = AnyItemParams

    def pre(self) -> None:
        pass

    def run(self) -> None:
        return None

    def post(self) -> None:
        pass


class ItemParams(BaseModel):
    item_id: int
    delay_s: float = 0.3


class ItemNameTask(BaseTask[ItemParams]):
    """Reads its item by id through a session of its own, after a delay."""

    name = "item_name"
    params_model = ItemParams

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, str]:
        self.sleep(self.params.delay_s)
        with self.database.read() as session:
            name = session.execute(
                select(items.c.name).where(items.c.id == self.params.item_id)
            ).scalar_one()
        return {"name": name}

    def post(self) -> None:
        pass


class LostConnectionTask(BaseTask[NoParams]):
    """Invalidates the connection of its session, then raises its own error."""

    name = "lost_connection"

    def pre(self) -> None:
        pass

    def run(self) -> None:
        with self.database.read() as session:
            session.execute(text("SELECT 1"))
            self.lose(session)
            raise LookupError("item 7 vanished")

    def post(self) -> None:
        pass

    def lose(self, session: Session) -> None:
        session.connection().invalidate()


class ClosedConnectionTask(LostConnectionTask):
    """Closes the DBAPI connection under its session, then raises its own error."""

    name = "closed_connection"

    def lose(self, session: Session) -> None:
        session.connection().connection.dbapi_connection.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["object", "session"])
def test_non_json_params_rejected(make_manager: MakeManager, value: str) -> None:
    manager = make_manager(AnyItemTask)
    with manager.database.read() as session:
        item = object() if value == "object" else session
        with pytest.raises(InvalidParams, match="JSON"):
            manager.create("any_item", {"item": item})
    assert manager.list() == []
    assert manager.live_task_ids() == set()


def test_task_reads_item_after_request_ends(make_manager: MakeManager) -> None:
    manager = make_manager(ItemNameTask)
    # create_all() reads before it writes. In a transaction that began as a
    # read, SQLite fails the write at once if the running manager commits in
    # between, so the table is made in a write transaction.
    with manager.database.write() as session:
        items_metadata.create_all(session.connection())

    def handle_request() -> tuple[str, int]:
        """Store an item and hand its id, not the row, to a task."""
        with manager.database.write() as session:
            item_id = session.execute(
                insert(items).values(name="draft").returning(items.c.id)
            ).scalar_one()
        created = manager.create("item_name", {"item_id": item_id})
        # The request changes the item after queueing the task; the task must
        # read the committed row, not a copy taken when the request began.
        with manager.database.write() as session:
            session.execute(
                update(items).where(items.c.id == item_id).values(name="final")
            )
        return created.id, item_id

    task_id, item_id = handle_request()
    finished = manager.wait(task_id, timeout=10)
    assert finished.status == S.FINISHED
    assert finished.result == {"name": "final"}
    assert finished.params == {"item_id": item_id, "delay_s": 0.3}
    eventually(lambda: manager.database.engine.pool.checkedout() == 0)


@pytest.mark.parametrize("task_name", ["lost_connection", "closed_connection"])
def test_task_error_survives_lost_connection(
    make_manager: MakeManager, task_name: str
) -> None:
    manager = make_manager(LostConnectionTask, ClosedConnectionTask, NoOp)
    created = manager.create(task_name)
    failed = manager.wait(created.id, timeout=PROMPT_TIMEOUT)
    assert failed.status == S.FAILED
    assert failed.error is not None
    assert failed.error.type == "LookupError"
    assert failed.error.message == "item 7 vanished"
    assert failed.error.phase == "run"
    assert failed.finished_at is not None

    # The pool replaced the invalidated connection: later tasks still run.
    after = manager.wait(manager.create("noop").id, timeout=PROMPT_TIMEOUT)
    assert after.status == S.FINISHED
    eventually(lambda: manager.database.engine.pool.checkedout() == 0)


# -- exceptions raised by tasks --


class PreFailsTask(StepTask):
    name = "step_pre_fails"

    def pre(self) -> None:
        raise RuntimeError("pre broke")


class PostFailsTask(StepTask):
    name = "step_post_fails"

    def post(self) -> None:
        raise RuntimeError("post broke")


class TaskAbort(BaseException):
    """A BaseException that is neither an Exception nor a control signal."""


class AbortingTask(BaseTask[NoParams]):
    name = "aborting"
    raised: type[BaseException] = TaskAbort

    def pre(self) -> None:
        pass

    def run(self) -> None:
        raise self.raised("aborted on purpose")

    def post(self) -> None:
        pass


class ExitingTask(AbortingTask):
    name = "exiting"
    raised = SystemExit


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str() of this error fails")


class UnprintableErrorTask(AbortingTask):
    name = "unprintable_error"
    raised = UnprintableError


def test_run_error_recorded_and_logged_once(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    manager = make_manager(StepTask)
    params = StepParams(n=10, step_s=0.01, fail_step=4)
    created = manager.create("step", params)
    failed = manager.wait(created.id, timeout=10)

    assert failed.status == S.FAILED
    assert failed.error is not None
    assert failed.error.type == "ValueError"
    assert failed.error.message == "boom at 4"
    assert failed.error.phase == "run"
    assert failed.error.traceback is not None
    assert "in run" in failed.error.traceback
    assert "ValueError: boom at 4" in failed.error.traceback
    assert failed.progress == 30
    assert failed.finished_at is not None
    assert failed.result is None
    assert ledger_steps(manager.database, created.id) == [1, 2, 3]

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert getattr(errors[0], "task_id", None) == created.id
    assert created.id in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], ValueError)


def test_pre_error_skips_run(make_manager: MakeManager) -> None:
    manager = make_manager(PreFailsTask)
    created = manager.create("step_pre_fails", {"n": 3, "step_s": 0.01})
    failed = manager.wait(created.id, timeout=10)
    assert failed.status == S.FAILED
    assert failed.error is not None
    assert failed.error.type == "RuntimeError"
    assert failed.error.message == "pre broke"
    assert failed.error.phase == "pre"
    assert failed.progress == 0
    assert ledger_steps(manager.database, created.id) == []


def test_post_error_keeps_run_result(make_manager: MakeManager) -> None:
    manager = make_manager(PostFailsTask)
    created = manager.create("step_post_fails", {"n": 3, "step_s": 0.01})
    failed = manager.wait(created.id, timeout=10)
    assert failed.status == S.FAILED
    assert failed.error is not None
    assert failed.error.type == "RuntimeError"
    assert failed.error.message == "post broke"
    assert failed.error.phase == "post"
    assert failed.result == {"sum": 6}
    assert ledger_steps(manager.database, created.id) == [1, 2, 3]


@pytest.mark.parametrize(
    ("task_class", "error_type"),
    [(AbortingTask, "TaskAbort"), (ExitingTask, "SystemExit")],
)
def test_base_exception_fails_task_not_manager(
    make_manager: MakeManager, task_class: type[AbortingTask], error_type: str
) -> None:
    manager = make_manager(task_class, NoOp, max_workers=1)
    aborted = manager.create(task_class.name)
    following = manager.create("noop")

    failed = manager.wait(aborted.id, timeout=10)
    assert failed.status == S.FAILED
    assert failed.error is not None
    assert failed.error.type == error_type
    assert failed.error.message == "aborted on purpose"
    assert failed.finished_at is not None
    assert manager.wait(following.id, timeout=10).status == S.FINISHED
    assert manager.is_running
    # The registry lets go of a run just after its outcome is stored.
    eventually(lambda: manager.live_task_ids() == set())


def test_broken_error_str_still_fails_task(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    manager = make_manager(UnprintableErrorTask, NoOp, max_workers=1)
    created = manager.create("unprintable_error")
    following = manager.create("noop")

    failed = manager.wait(created.id, timeout=PROMPT_TIMEOUT)
    assert failed.status == S.FAILED
    assert failed.error is not None
    assert failed.error.type == "UnprintableError"
    assert "RuntimeError" in failed.error.message
    assert failed.error.phase == "run"
    assert failed.finished_at is not None
    assert manager.wait(following.id, timeout=PROMPT_TIMEOUT).status == S.FINISHED
    # The registry lets a task go just after its outcome commits.
    eventually(lambda: manager.live_task_ids() == set())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [getattr(r, "task_id", None) for r in errors] == [created.id]


def test_failure_spares_concurrent_task(
    make_manager: MakeManager,
) -> None:
    manager = make_manager(StepTask)
    failing = manager.create("step", {"n": 5, "step_s": 0.01, "fail_step": 1})
    healthy = manager.create("step", {"n": 5, "step_s": 0.05})

    assert manager.wait(failing.id, timeout=10).status == S.FAILED
    finished = manager.wait(healthy.id, timeout=10)
    assert finished.status == S.FINISHED
    assert finished.result == {"sum": 15}
    assert ledger_steps(manager.database, healthy.id) == [1, 2, 3, 4, 5]


# -- runs that outlive the request or the references to them --


def send_create_and_hang_up(port: int, body: dict[str, Any], reset: bool) -> bytes:
    """Send ``POST /tasks`` as raw HTTP/1.1, read the status line, and close.

    With ``reset`` the socket closes with an RST instead of a FIN.
    """
    payload = json.dumps(body).encode()
    head = (
        "POST /tasks HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + payload)
        with sock.makefile("rb") as response:
            status_line = response.readline()
        if reset:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    return status_line


@pytest.mark.e2e
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_task_outlives_client_that_hung_up(
    make_server: MakeServer, database: Database, reset: bool
) -> None:
    server = make_server()
    body = {"name": "step", "params": {"n": 10, "step_s": 0.05}}
    status_line = send_create_and_hang_up(server.port, body, reset)
    assert status_line.startswith(b"HTTP/1.1 201"), status_line

    listed = server.client.get("/tasks", params={"name": "step"}).json()
    assert len(listed) == 1
    task_id = listed[0]["id"]
    finished = wait_over_http(server.client, task_id, {"FINISHED", "FAILED", "STOPPED"})
    assert finished["status"] == "FINISHED"
    assert finished["result"] == {"sum": 55}
    assert ledger_steps(database, task_id) == list(range(1, 11))
    assert "CancelledError" not in server.log()


class ShortAsyncParams(BaseModel):
    steps: int = 5
    step_s: float = 0.02


class ShortAsyncTask(BaseTask[ShortAsyncParams]):
    """An async task of a few short awaits, reporting progress after each."""

    name = "short_async"
    params_model = ShortAsyncParams

    async def pre(self) -> None:
        pass

    async def run(self) -> dict[str, int]:
        for step in range(1, self.params.steps + 1):
            await asyncio.sleep(self.params.step_s)
            self.set_progress(step, self.params.steps)
        return {"steps": self.params.steps}

    async def post(self) -> None:
        pass


def test_async_runs_survive_garbage_collection(make_manager: MakeManager) -> None:
    manager = make_manager(ShortAsyncTask, max_workers=50)
    ids = [manager.create("short_async").id for _ in range(50)]

    deadline = time.monotonic() + 40
    while manager.live_task_ids() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)

    statuses = [manager.get(task_id).status for task_id in ids]
    assert statuses == [S.FINISHED] * 50
    assert all(manager.get(task_id).result == {"steps": 5} for task_id in ids)
    assert manager.live_task_ids() == set()


# -- progress writes --


class FloodParams(BaseModel):
    n: int = 100_000
    #: Sleep ``pause_s`` after every ``pause_every`` items (0: never).
    pause_every: int = 0
    pause_s: float = 0.0


class ProgressFloodTask(BaseTask[FloodParams]):
    """Reports progress on every one of n items."""

    name = "progress_flood"
    params_model = FloodParams

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, int]:
        n = self.params.n
        for i in range(1, n + 1):
            self.set_progress(i, n)
            if self.params.pause_every and i % self.params.pause_every == 0:
                time.sleep(self.params.pause_s)
        return {"n": n}

    def post(self) -> None:
        pass


class TaskUpdates:
    """Records the UPDATE statements that an engine sends for the tasks table."""

    def __init__(self, database: Database) -> None:
        self.statements: list[str] = []
        self.engine = database.engine
        event.listen(self.engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        normalized = " ".join(statement.split()).upper()
        if normalized.startswith("UPDATE TASKS "):
            self.statements.append(normalized)

    def progress_only(self) -> list[str]:
        """The periodic progress writes: UPDATEs that set no status or checkpoint."""
        return [
            s
            for s in self.statements
            if "PROGRESS=" in s and "STATUS=" not in s and "CHECKPOINT=" not in s
        ]

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)


def run_counting_updates(
    manager: TaskManager, params: dict[str, Any]
) -> tuple[TaskInfo, TaskUpdates, float]:
    """Run a progress_flood task; return its end state, its UPDATEs and the seconds."""
    updates = TaskUpdates(manager.database)
    try:
        started = time.monotonic()
        created = manager.create("progress_flood", params)
        finished = manager.wait(created.id, timeout=30, poll=0.05)
        duration = time.monotonic() - started
    finally:
        updates.close()
    return finished, updates, duration


def test_progress_flood_writes_few_updates(make_manager: MakeManager) -> None:
    manager = make_manager(ProgressFloodTask, progress_interval=0.5)
    finished, updates, duration = run_counting_updates(manager, {"n": 100_000})

    assert finished.status == S.FINISHED
    assert finished.result == {"n": 100_000}
    assert finished.progress == 100
    # The claim and the end, plus at most one progress write per interval.
    limit = 2 + duration / 0.5 + 2
    assert len(updates.statements) <= min(101, limit)
    for _ in range(5):
        assert manager.get(finished.id).progress == 100
        time.sleep(0.1)


def test_progress_writes_follow_interval(make_manager: MakeManager) -> None:
    manager = make_manager(ProgressFloodTask, progress_interval=0.5)
    # About 2 s: a 20 ms sleep after every 1,000 of the 100,000 reports.
    params = {"n": 100_000, "pause_every": 1_000, "pause_s": 0.02}
    finished, updates, duration = run_counting_updates(manager, params)

    assert finished.status == S.FINISHED
    assert finished.progress == 100
    progress_writes = updates.progress_only()
    assert 2 <= len(progress_writes) <= duration / 0.5 + 2
    assert len(updates.statements) <= 101


def test_progress_never_decreases_while_running(
    make_manager: MakeManager,
) -> None:
    manager = make_manager(ProgressFloodTask, progress_interval=0.05)
    params = {"n": 100_000, "pause_every": 1_000, "pause_s": 0.02}
    created = manager.create("progress_flood", params)

    seen: list[float] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = manager.get(created.id)
        seen.append(info.progress)
        if info.status.is_terminal:
            break
        time.sleep(0.01)

    assert info.status == S.FINISHED
    assert seen == sorted(seen)
    assert len(set(seen)) >= 10
    assert seen[-1] == 100
    assert manager.get(created.id).progress == 100
