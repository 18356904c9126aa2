from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from taskmill import (
    BaseTask,
    Database,
    InvalidParams,
    InvalidTransition,
    NoParams,
    TaskManager,
    TaskStatus,
    TaskTypeAlreadyRegistered,
    UnknownTaskType,
    crud,
)
from taskmill.examples import Countdown
from taskmill.status import ControlRequest
from tests.conftest import eventually
from tests.tasks import AsyncSleepTask, BlockingTask, StepTask, ledger_steps

S = TaskStatus
MakeManager = Callable[..., TaskManager]


def status_of(manager: TaskManager, task_id: str) -> TaskStatus:
    return manager.get(task_id).status


def reasons(manager: TaskManager, task_id: str) -> list[str]:
    return [event.reason for event in manager.events(task_id)]


def transitions(manager: TaskManager, task_id: str) -> list[tuple[Any, Any]]:
    return [(e.from_status, e.to_status) for e in manager.events(task_id)]


def test_task_runs_to_finished(make_manager: MakeManager) -> None:
    manager = make_manager(Countdown)
    created = manager.create("countdown", {"seconds": 0.05, "steps": 5})
    task = manager.wait(created.id)
    assert task.status == S.FINISHED
    assert task.result == {"steps": 5}
    assert task.progress == 100
    assert task.attempts == 1
    assert task.error is None
    assert task.started_at is not None
    assert task.finished_at is not None
    assert task.finished_at >= task.started_at >= task.created_at
    assert transitions(manager, created.id) == [
        (None, S.PENDING),
        (S.PENDING, S.RUNNING),
        (S.RUNNING, S.FINISHED),
    ]


def test_finished_task_leaves_the_registry(make_manager: MakeManager) -> None:
    manager = make_manager(Countdown)
    task = manager.create("countdown", {"seconds": 0, "steps": 1})
    manager.wait(task.id)
    eventually(lambda: not manager.live_task_ids())


def test_create_held_waits_for_start(make_manager: MakeManager) -> None:
    manager = make_manager(Countdown)
    task = manager.create("countdown", {"seconds": 0, "steps": 1}, start=False)
    assert task.status == S.PAUSED
    time.sleep(0.3)
    assert status_of(manager, task.id) == S.PAUSED
    assert manager.start(task.id).status == S.PENDING
    assert manager.wait(task.id).status == S.FINISHED


def test_unknown_task_type_names_known_ones(make_manager: MakeManager) -> None:
    manager = make_manager(Countdown)
    with pytest.raises(UnknownTaskType, match="'countdown'"):
        manager.create("nope")
    assert manager.list() == []


def test_invalid_params_name_the_field(make_manager: MakeManager) -> None:
    manager = make_manager(Countdown)
    with pytest.raises(InvalidParams, match="steps") as caught:
        manager.create("countdown", {"seconds": 1, "steps": 0})
    assert caught.value.errors[0]["loc"] == ("steps",)
    assert manager.list() == []


def test_register_rejects_second_class_with_same_name() -> None:
    manager = TaskManager("sqlite://")
    manager.register(Countdown)
    manager.register(Countdown)

    class Other(Countdown):
        pass

    with pytest.raises(TaskTypeAlreadyRegistered, match="'countdown'"):
        manager.register(Other)


def test_register_requires_a_name() -> None:
    class Nameless(BaseTask[NoParams]):
        def pre(self) -> None: ...
        def run(self) -> None: ...
        def post(self) -> None: ...

    with pytest.raises(TypeError, match="Nameless"):
        TaskManager("sqlite://").register(Nameless)


def test_workers_are_bounded(make_manager: MakeManager) -> None:
    manager = make_manager(BlockingTask, max_workers=2)
    ids = [manager.create("blocking", {"seconds": 0.3}).id for _ in range(5)]
    peak = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # One query, so that the count is a snapshot of the table.
        running = manager.list(statuses=[S.RUNNING])
        peak = max(peak, len(running))
        if len(manager.list(statuses=[S.FINISHED])) == len(ids):
            break
        time.sleep(0.02)
    assert peak == 2
    assert all(status_of(manager, task_id) == S.FINISHED for task_id in ids)


def test_pause_pending_keeps_it_from_starting(make_manager: MakeManager) -> None:
    manager = make_manager(BlockingTask, StepTask, max_workers=1)
    blocker = manager.create("blocking", {"seconds": 0.5})
    task = manager.create("step", {"n": 3, "step_s": 0})
    assert manager.pause(task.id).status == S.PAUSED
    manager.wait(blocker.id)
    time.sleep(0.3)
    assert status_of(manager, task.id) == S.PAUSED
    assert manager.get(task.id).attempts == 0
    manager.resume(task.id)
    assert manager.wait(task.id).status == S.FINISHED


def test_pause_running_takes_effect_at_checkpoint(make_manager: MakeManager) -> None:
    manager = make_manager(StepTask)
    task = manager.create("step", {"n": 10, "step_s": 0.05})
    eventually(lambda: manager.get(task.id).progress >= 30)
    requested = manager.pause(task.id)
    assert requested.status in (S.RUNNING, S.PAUSED)
    paused = manager.wait(task.id, [S.PAUSED])
    assert paused.pending_request is None
    done = len(ledger_steps(manager.database, task.id))
    assert paused.progress == done * 10
    with manager.database.read() as session:
        assert crud.get_task(session, task.id).checkpoint == {"step": done}
    time.sleep(0.3)
    assert ledger_steps(manager.database, task.id) == list(range(1, done + 1))


def test_resume_continues_from_checkpoint(make_manager: MakeManager) -> None:
    manager = make_manager(StepTask)
    task = manager.create("step", {"n": 10, "step_s": 0.03})
    eventually(lambda: manager.get(task.id).progress >= 30)
    manager.pause(task.id)
    manager.wait(task.id, [S.PAUSED])
    manager.resume(task.id)
    finished = manager.wait(task.id)
    assert finished.status == S.FINISHED
    assert finished.result == {"sum": 55}
    assert finished.attempts == 2
    # Each step is recorded once: the unique constraint would have failed a redo.
    assert ledger_steps(manager.database, task.id) == list(range(1, 11))
    assert any(reason.startswith("paused ") for reason in reasons(manager, task.id))
    assert "resumed by request" in reasons(manager, task.id)


def test_stop_pending_and_paused(make_manager: MakeManager) -> None:
    manager = make_manager(BlockingTask, StepTask, max_workers=1)
    manager.create("blocking", {"seconds": 0.3})
    pending = manager.create("step", {"n": 2})
    held_task = manager.create("step", {"n": 2}, start=False)
    for task_id in (pending.id, held_task.id):
        stopped = manager.stop(task_id)
        assert stopped.status == S.STOPPED
        assert stopped.finished_at is not None
        assert stopped.error is None
    time.sleep(0.5)
    assert ledger_steps(manager.database, pending.id) == []
    assert status_of(manager, pending.id) == S.STOPPED


def test_stop_running_thread_at_checkpoint(make_manager: MakeManager) -> None:
    manager = make_manager(StepTask)
    task = manager.create("step", {"n": 50, "step_s": 0.05})
    eventually(lambda: manager.get(task.id).progress >= 10)
    requested = manager.stop(task.id)
    assert requested.pending_request in (ControlRequest.STOP, None)
    stopped = manager.wait(task.id, timeout=5)
    assert stopped.status == S.STOPPED
    assert stopped.result is None
    steps = ledger_steps(manager.database, task.id)
    time.sleep(0.3)
    assert ledger_steps(manager.database, task.id) == steps


def test_stop_cancels_async_task_at_once(make_manager: MakeManager) -> None:
    manager = make_manager(AsyncSleepTask)
    task = manager.create("async_sleep", {"seconds": 30})
    eventually(lambda: status_of(manager, task.id) == S.RUNNING)
    manager.stop(task.id)
    stopped = manager.wait(task.id, timeout=2)
    assert stopped.status == S.STOPPED


def test_restart_runs_again_under_same_id(make_manager: MakeManager) -> None:
    manager = make_manager(Countdown)
    task = manager.create("countdown", {"seconds": 0, "steps": 2})
    first = manager.wait(task.id)
    restarted = manager.restart(task.id)
    assert restarted.id == task.id
    assert restarted.status == S.PENDING
    assert restarted.progress == 0
    assert restarted.result is None
    second = manager.wait(task.id)
    assert second.status == S.FINISHED
    assert second.attempts == first.attempts + 1
    finished = [e for e in manager.events(task.id) if e.to_status == S.FINISHED]
    assert len(finished) == 2


def test_restart_failed_and_stopped(make_manager: MakeManager) -> None:
    manager = make_manager(StepTask)
    failed = manager.create("step", {"n": 2, "step_s": 0, "fail_step": 1})
    assert manager.wait(failed.id).status == S.FAILED
    restarted = manager.restart(failed.id)
    assert restarted.error is None
    stopped = manager.create("step", {"n": 2}, start=False)
    manager.stop(stopped.id)
    manager.restart(stopped.id)
    assert manager.wait(stopped.id).status == S.FINISHED


@pytest.mark.parametrize(
    ("action", "status_needed"),
    [("restart", "FINISHED"), ("resume", "PAUSED"), ("start", "PAUSED")],
)
def test_action_rejected_while_running(
    make_manager: MakeManager, action: str, status_needed: str
) -> None:
    manager = make_manager(BlockingTask)
    task = manager.create("blocking", {"seconds": 0.5})
    eventually(lambda: status_of(manager, task.id) == S.RUNNING)
    with pytest.raises(InvalidTransition, match="RUNNING") as caught:
        manager.act(task.id, action)
    assert caught.value.current == S.RUNNING
    assert [a.value for a in caught.value.allowed] == ["pause", "stop"]


def test_pause_rejected_when_finished(make_manager: MakeManager) -> None:
    manager = make_manager(Countdown)
    task = manager.create("countdown", {"seconds": 0, "steps": 1})
    manager.wait(task.id)
    with pytest.raises(InvalidTransition, match="restart"):
        manager.pause(task.id)
    with pytest.raises(InvalidTransition):
        manager.stop(task.id)


def test_pause_rejected_while_stop_pending(make_manager: MakeManager) -> None:
    manager = make_manager(BlockingTask)
    task = manager.create("blocking", {"seconds": 0.5})
    eventually(lambda: status_of(manager, task.id) == S.RUNNING)
    manager.stop(task.id)
    with pytest.raises(InvalidTransition, match="stop request pending"):
        manager.pause(task.id)
    assert manager.wait(task.id).status == S.STOPPED


def test_result_that_is_not_json_fails(make_manager: MakeManager) -> None:
    class Unserialisable(BaseTask[NoParams]):
        name = "unserialisable"

        def pre(self) -> None: ...
        def run(self) -> object:
            return object()

        def post(self) -> None: ...

    manager = make_manager(Unserialisable)
    task = manager.wait(manager.create("unserialisable").id)
    assert task.status == S.FAILED
    assert task.error is not None
    assert "JSON-serializable" in task.error.message
    assert task.result is None


def test_async_hooks_run_on_manager_loop(make_manager: MakeManager) -> None:
    seen: dict[str, Any] = {}

    class WhereAmI(BaseTask[NoParams]):
        name = "where"

        async def pre(self) -> None: ...
        async def run(self) -> str:
            seen["thread"] = threading.current_thread().name
            return "ok"

        async def post(self) -> None: ...

    manager = make_manager(WhereAmI)
    assert manager.wait(manager.create("where").id).result == "ok"
    assert seen["thread"] == "taskmill-manager"


def start_again(database_url: str, *task_classes: type[BaseTask[Any]]) -> TaskManager:
    manager = TaskManager(database_url, progress_interval=0.05)
    for task_class in task_classes:
        manager.register(task_class)
    manager.startup()
    return manager


def test_startup_keeps_paused_and_runs_pending(database_url: str) -> None:
    first = TaskManager(database_url)
    first.register(Countdown)
    first.database.create_schema()
    paused = first.create("countdown", {"seconds": 0, "steps": 1}, start=False)
    pending = first.create("countdown", {"seconds": 0, "steps": 1})
    second = start_again(database_url, Countdown)
    try:
        assert second.wait(pending.id).status == S.FINISHED
        time.sleep(0.2)
        assert status_of(second, paused.id) == S.PAUSED
        assert paused.id in second.live_task_ids()
    finally:
        second.shutdown()


def test_startup_recovers_task_of_dead_process(database_url: str) -> None:
    database = Database(database_url)
    database.create_schema()
    from tests.tasks import create_ledger

    create_ledger(database)
    with database.write() as session:
        task = crud.create_task(session, name="step", params={"n": 5, "step_s": 0})
        claimed = crud.claim_task(
            session, task.id, "dead-runner", reason="claimed", lease=0
        )
        assert claimed is not None
        token = crud.RunToken("dead-runner", claimed.attempts)
        crud.save_checkpoint(
            session, task.id, token, checkpoint={"step": 3}, progress=60, message=None
        )
    manager = start_again(database_url, StepTask)
    try:
        finished = manager.wait(task.id)
    finally:
        manager.shutdown()
    assert finished.status == S.FINISHED
    assert finished.recoveries == 1
    assert finished.attempts == 2
    assert ledger_steps(manager.database, task.id) == [4, 5]
    recovery = [r for r in reasons(manager, task.id) if r.startswith("interrupted")]
    assert len(recovery) == 1
    assert "dead-runner" in recovery[0]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [(ControlRequest.PAUSE, S.PAUSED), (ControlRequest.STOP, S.STOPPED)],
)
def test_pending_request_survives_crash(
    database_url: str, request_: ControlRequest, expected: TaskStatus
) -> None:
    database = Database(database_url)
    database.create_schema()
    with database.write() as session:
        task = crud.create_task(
            session, name="countdown", params={"seconds": 0, "steps": 1}
        )
        crud.claim_task(session, task.id, "dead-runner", reason="claimed", lease=0)
        crud.set_control(session, task.id, request_)
    manager = start_again(database_url, Countdown)
    try:
        time.sleep(0.2)
        info = manager.get(task.id)
    finally:
        manager.shutdown()
    assert info.status == expected
    assert info.pending_request is None


def test_shutdown_suspends_running_task(database_url: str) -> None:
    first = start_again(database_url, StepTask)
    from tests.tasks import create_ledger

    create_ledger(first.database)
    task = first.create("step", {"n": 20, "step_s": 0.05})
    eventually(lambda: first.get(task.id).progress >= 20)
    first.shutdown(grace=2)
    database = Database(database_url)
    with database.read() as session:
        row = crud.get_task(session, task.id)
    assert row.status == S.PENDING
    assert row.owner is None
    assert row.checkpoint is not None
    second = start_again(database_url, StepTask)
    try:
        assert second.wait(task.id).result == {"sum": 210}
    finally:
        second.shutdown()
    assert ledger_steps(database, task.id) == list(range(1, 21))
    assert any(r.startswith("suspended") for r in reasons(second, task.id))


def test_shutdown_grace_bounds_blocked_task(database_url: str) -> None:
    manager = start_again(database_url, BlockingTask)
    task = manager.create("blocking", {"seconds": 5})
    eventually(lambda: status_of(manager, task.id) == S.RUNNING)
    started = time.monotonic()
    manager.shutdown(grace=0.3)
    assert time.monotonic() - started < 3
    with Database(database_url).read() as session:
        row = crud.get_task(session, task.id)
    assert row.status == S.PENDING
    assert row.owner is None


@pytest.mark.parametrize(
    ("action", "expected"), [("pause", S.PAUSED), ("stop", S.STOPPED)]
)
def test_shutdown_keeps_pending_request(
    database_url: str, action: str, expected: TaskStatus
) -> None:
    manager = start_again(database_url, BlockingTask)
    task = manager.create("blocking", {"seconds": 2})
    eventually(lambda: status_of(manager, task.id) == S.RUNNING)
    manager.act(task.id, action)
    manager.shutdown(grace=0.2)
    with Database(database_url).read() as session:
        row = crud.get_task(session, task.id)
    assert row.status == expected
    assert row.control is None


def test_register_rejects_class_without_hooks() -> None:
    class OnlyRun(BaseTask[NoParams]):
        name = "only_run"

        def run(self) -> None: ...

    with pytest.raises(TypeError, match=r"post\(\), pre\(\)"):
        TaskManager("sqlite://").register(OnlyRun)  # type: ignore[type-abstract]


def test_register_rejects_non_task() -> None:
    with pytest.raises(TypeError, match="subclass BaseTask"):
        TaskManager("sqlite://").register(int)  # type: ignore[type-var]


def test_pending_task_stored_elsewhere_runs(make_manager: MakeManager) -> None:
    manager = make_manager(Countdown, poll_interval=0.1)
    other = Database(manager.database.url)
    with other.write() as session:
        task = crud.create_task(
            session, name="countdown", params={"seconds": 0, "steps": 1}
        )
    assert manager.wait(task.id, timeout=5).status == S.FINISHED


def test_run_taken_back_ends_quietly(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    manager = make_manager(StepTask)
    task = manager.create("step", {"n": 20, "step_s": 0.05})
    eventually(lambda: manager.get(task.id).progress >= 10)
    with manager.database.write() as session:
        # What a second runner does when it recovers the task.
        crud.change_status(session, task.id, S.PENDING, reason="taken by another")
        crud.claim_task(session, task.id, "other-runner", reason="claimed", lease=60)
    eventually(lambda: task.id not in manager.live_task_ids())
    info = manager.get(task.id)
    assert info.status == S.RUNNING
    assert info.owner == "other-runner"
    assert info.error is None
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("taken back" in r.getMessage() for r in caplog.records)


def test_stopped_while_queued_leaves_registry(make_manager: MakeManager) -> None:
    manager = make_manager(BlockingTask, Countdown, max_workers=1)
    blocker = manager.create("blocking", {"seconds": 0.3})
    queued = manager.create("countdown", {"seconds": 0, "steps": 1})
    manager.stop(queued.id)
    manager.wait(blocker.id)
    eventually(lambda: not manager.live_task_ids())
    assert status_of(manager, queued.id) == S.STOPPED


def test_stopped_while_pause_settles_leaves_registry(
    make_manager: MakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = make_manager(StepTask)
    after_run = manager._after_run

    def slow_after_run(run: Any, status: Any) -> None:
        # Widens the moment between a run's stored outcome and the loop's
        # handling of its end, in which a stop can land.
        time.sleep(0.5)
        after_run(run, status)

    monkeypatch.setattr(manager, "_after_run", slow_after_run)
    task = manager.create("step", {"n": 50, "step_s": 0.02})
    manager.wait(task.id, {S.RUNNING})
    manager.pause(task.id)
    manager.wait(task.id, {S.PAUSED})
    manager.stop(task.id)
    assert status_of(manager, task.id) == S.STOPPED
    eventually(lambda: task.id not in manager.live_task_ids(), timeout=5)


def test_strict_params_round_trip(make_manager: MakeManager) -> None:
    import uuid

    from pydantic import BaseModel, ConfigDict

    class StrictParams(BaseModel):
        model_config = ConfigDict(strict=True)
        ref: uuid.UUID

    class Strict(BaseTask[StrictParams]):
        name = "strict"
        params_model = StrictParams

        def pre(self) -> None: ...
        def run(self) -> str:
            return str(self.params.ref)

        def post(self) -> None: ...

    manager = make_manager(Strict)
    ref = uuid.uuid4()
    task = manager.create("strict", StrictParams(ref=ref))
    assert manager.wait(task.id).result == str(ref)


def test_memory_database_rejected_at_startup() -> None:
    manager = TaskManager("sqlite://")
    with pytest.raises(ValueError, match="in-memory"):
        manager.startup()


def test_shutdown_keeps_callers_database(database_url: str) -> None:
    database = Database(database_url)
    manager = TaskManager(database)
    manager.register(Countdown)
    manager.startup()
    manager.shutdown()
    with database.read() as session:
        assert crud.list_tasks(session) == []


class AsyncSteps(BaseTask[NoParams]):
    name = "async_steps"

    async def pre(self) -> None: ...
    async def run(self) -> dict[str, int]:
        import asyncio

        start = self.state["step"] if self.state else 0
        for step in range(start + 1, 11):
            await asyncio.sleep(0.03)
            self.set_progress(step, 10)
            await self.checkpoint_async({"step": step})
        return {"resumed_after": start}

    async def post(self) -> None: ...


def test_async_checkpoint_pauses_and_resumes(make_manager: MakeManager) -> None:
    manager = make_manager(AsyncSteps)
    task = manager.create("async_steps")
    eventually(lambda: manager.get(task.id).progress >= 30)
    manager.pause(task.id)
    paused = manager.wait(task.id, [S.PAUSED])
    assert "paused at a " in reasons(manager, task.id)[-1]
    with manager.database.read() as session:
        saved = crud.get_task(session, task.id).checkpoint
    assert saved is not None
    manager.resume(task.id)
    finished = manager.wait(task.id)
    assert finished.result == {"resumed_after": saved["step"]}
    assert paused.progress >= saved["step"] * 10
