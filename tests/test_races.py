"""Pause, stop, restart and resume racing with runs that end on their own.

Whatever the order in which requests and run outcomes land, the history of
each task must be one chain of allowed transitions that ends in the stored
status, and the stored columns must agree with that status.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy.event import listen
from sqlalchemy.orm import Session

from taskmill import BaseTask, InvalidTransition, TaskManager, TaskStatus, crud
from taskmill.status import TERMINAL, is_allowed
from tests.conftest import eventually
from tests.tasks import NoOp

MakeManager = Callable[..., TaskManager]
S = TaskStatus

ACTIONS = ("pause", "stop", "restart", "resume")


class QuickParams(BaseModel):
    n: int = 2
    step_s: float = 0.005


class QuickTask(BaseTask[QuickParams]):
    """A few short checkpointed steps; a restart may run it again from step 1."""

    name = "quick"
    params_model = QuickParams

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, int]:
        done = self.state["step"] if self.state else 0
        for step in range(done + 1, self.params.n + 1):
            self.sleep(self.params.step_s)
            self.set_progress(step, self.params.n)
            self.checkpoint({"step": step})
        return {"sum": self.params.n * (self.params.n + 1) // 2}

    def post(self) -> None:
        pass


def assert_history_consistent(manager: TaskManager, task_id: str) -> None:
    """Check that the history replays, through allowed moves, to the stored status."""
    info = manager.get(task_id)
    events = manager.events(task_id)
    assert events[0].from_status is None
    assert events[0].to_status == S.PENDING
    for previous, event in itertools.pairwise(events):
        assert event.from_status == previous.to_status, events
        assert is_allowed(previous.to_status, event.to_status), event
    assert events[-1].to_status == info.status, (info, events[-1])
    claims = sum(1 for e in events if e.to_status == S.RUNNING)
    assert claims == info.attempts, (info, events)
    if info.status == S.FINISHED:
        assert info.result == {"sum": 3}
        assert info.error is None
        assert info.progress == 100
    if info.status == S.FAILED:
        assert info.error is not None
    assert info.pending_request is None
    assert info.lease_expires_at is None


def settle(manager: TaskManager, task_id: str) -> None:
    """Wait until a task is at rest: ended, or paused, with no request pending."""

    def at_rest() -> bool:
        info = manager.get(task_id)
        resting = info.status in TERMINAL or info.status == S.PAUSED
        return resting and info.pending_request is None

    eventually(at_rest, timeout=20)


def fire_actions(manager: TaskManager, task_id: str, seed: int) -> list[str]:
    """Send a few random actions at random moments; return the accepted ones."""
    chooser = random.Random(seed)
    accepted = []
    for _ in range(4):
        time.sleep(chooser.uniform(0, 0.02))
        action = chooser.choice(ACTIONS)
        try:
            manager.act(task_id, action)
        except InvalidTransition:
            continue
        accepted.append(action)
    return accepted


@pytest.mark.parametrize("sender", ["same process", "other manager"])
def test_requests_racing_run_end(make_manager: MakeManager, sender: str) -> None:
    manager = make_manager(QuickTask, max_workers=4, poll_interval=0.05)
    control = manager
    if sender == "other manager":
        # Stores and controls tasks, runs none: requests reach the runs
        # through the database only.
        control = make_manager(QuickTask, max_workers=0)
    tasks = [control.create("quick").id for _ in range(24)]
    threads = [
        threading.Thread(target=fire_actions, args=(control, task_id, seed))
        for seed, task_id in enumerate(tasks)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    for task_id in tasks:
        settle(manager, task_id)
        assert_history_consistent(manager, task_id)
    # The races reached more than one kind of end.
    ends = {manager.get(task_id).status for task_id in tasks}
    assert len(ends) >= 2, ends


def test_restart_right_after_finish(make_manager: MakeManager) -> None:
    manager = make_manager(QuickTask)
    task = manager.create("quick", {"n": 2, "step_s": 0})
    assert manager.wait(task.id).status == S.FINISHED
    with pytest.raises(InvalidTransition):
        manager.stop(task.id)
    manager.restart(task.id)
    assert manager.wait(task.id).status == S.FINISHED
    settle(manager, task.id)
    assert_history_consistent(manager, task.id)
    assert manager.get(task.id).attempts == 2


@pytest.mark.postgresql
def test_task_queued_during_claim_runs(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task created while a poll's claim runs is dispatched when the claim ends.

    PostgreSQL only: on SQLite the writers of one process take turns on a
    lock, so a create cannot commit while the claim runs.
    """
    manager = TaskManager(
        postgres_url, max_workers=1, poll_interval=0.05, progress_interval=0.05
    )
    manager.register(NoOp)
    real_claim_due = crud.claim_due
    found_none = threading.local()
    claimed_nothing = threading.Event()
    release = threading.Event()

    def claim_due(session: Session, **options: Any) -> list[crud.TaskRow]:
        claimed = real_claim_due(session, **options)
        found_none.value = not claimed
        return claimed

    def hold_at_checkin(dbapi_connection: Any, record: Any) -> None:
        # The poll's claim committed without finding a task. Hold it here,
        # before it frees its worker, until the task below is queued: the
        # order of a create that commits while the claim's statement runs.
        if getattr(found_none, "value", False) and not release.is_set():
            found_none.value = False
            claimed_nothing.set()
            release.wait(timeout=5)

    monkeypatch.setattr(crud, "claim_due", claim_due)
    # The listener stays registered, because it does nothing once released
    # and goes away with the engine.
    listen(manager.database.engine, "checkin", hold_at_checkin)
    manager.startup()
    try:
        try:
            assert claimed_nothing.wait(timeout=5)
            task = manager.create("noop")
            # Time for the manager's loop to try to dispatch the task.
            time.sleep(0.2)
        finally:
            release.set()
        assert manager.wait(task.id, timeout=5).status == S.FINISHED
    finally:
        manager.shutdown(grace=1.0)
