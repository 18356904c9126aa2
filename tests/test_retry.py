"""Retry policies, run time limits and leases, on managers in this process."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from taskmill import (
    BaseTask,
    NoParams,
    ResultTooLarge,
    Retry,
    TaskManager,
    TaskStatus,
    crud,
)
from taskmill.models import utcnow
from taskmill.runners import new_runner_id
from tests.conftest import eventually
from tests.tasks import (
    BlockingTask,
    FlakyTask,
    QuickFlakyTask,
    StepTask,
    TimedAsyncPostTask,
    TimedAsyncSleepTask,
    TimedBlockingTask,
    TimedStepTask,
    ledger_steps,
)

S = TaskStatus
MakeManager = Callable[..., TaskManager]

#: A runner id of another host, whose runs are judged by their lease alone.
OTHER_HOST_RUNNER = "other-host:4242:abc123"


def claim_times(manager: TaskManager, task_id: str) -> list[dt.datetime]:
    """Return when each run of the task was claimed, oldest first."""
    return [
        event.at for event in manager.events(task_id) if event.to_status == S.RUNNING
    ]


def reasons(manager: TaskManager, task_id: str) -> list[str]:
    return [event.reason for event in manager.events(task_id)]


def seconds_between(earlier: dt.datetime, later: dt.datetime) -> float:
    return (later - earlier).total_seconds()


def claim_as(manager: TaskManager, task_id: str, owner: str, *, lease: float) -> None:
    """Mark the task RUNNING for ``owner``, as that runner's claim would.

    A held task is released and claimed in one transaction, so that the
    manager never finds it PENDING and never claims it itself.
    """
    with manager.database.write() as session:
        if crud.get_task(session, task_id).status == S.PAUSED:
            crud.change_status(session, task_id, S.PENDING, reason="started")
        claimed = crud.claim_task(
            session, task_id, owner, reason=f"claimed by {owner}", lease=lease
        )
    assert claimed is not None


def dead_runner_id() -> str:
    """Return a runner id of this host whose process has exited."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host_key = new_runner_id().rsplit(":", 2)[0]
    return f"{host_key}:{child.stdout.strip()}:dead00"


# -- the Retry policy --


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"max_attempts": 0}, ValueError, "max_attempts"),
        ({"backoff": -1.0}, ValueError, "backoff"),
        ({"backoff": math.nan}, ValueError, "backoff"),
        ({"max_backoff": math.inf}, ValueError, "max_backoff"),
        ({"factor": 0.5}, ValueError, "factor"),
        ({"jitter": 1.0}, ValueError, "jitter"),
        ({"jitter": -0.1}, ValueError, "jitter"),
        ({"retry_on": (ValueError, "TimeoutError")}, TypeError, "retry_on"),
        ({"retry_on": (int,)}, TypeError, "retry_on"),
    ],
)
def test_retry_rejects_invalid_setting(
    options: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        Retry(**options)


def test_retry_accepts_bare_exception_class() -> None:
    policy = Retry(retry_on=ConnectionError)  # type: ignore[arg-type]
    assert policy.retry_on == (ConnectionError,)
    assert policy.retries(ConnectionRefusedError())
    assert not policy.retries(ValueError())


def test_retry_accepts_list_of_classes() -> None:
    policy = Retry(retry_on=[ConnectionError, TimeoutError])  # type: ignore[arg-type]
    assert policy.retries(ConnectionResetError())
    assert policy.retries(TimeoutError())
    assert not policy.retries(ValueError())


def test_default_retry_retries_no_exception() -> None:
    policy = Retry()
    assert not policy.retries(ConnectionError())
    assert not policy.retries(Exception())


def test_delay_grows_by_factor_until_capped() -> None:
    policy = Retry(backoff=1.0, factor=3.0, max_backoff=20.0, jitter=0.0)
    assert [policy.delay(failures) for failures in range(1, 6)] == [
        1.0,
        3.0,
        9.0,
        20.0,
        20.0,
    ]
    assert policy.delay(10_000) == 20.0


def test_delay_without_growth_stays_at_backoff() -> None:
    policy = Retry(backoff=0.5, factor=1.0, jitter=0.0)
    assert policy.delay(1) == 0.5
    assert policy.delay(50) == 0.5


def test_delay_of_large_factor_is_capped() -> None:
    policy = Retry(max_attempts=100, backoff=1.0, factor=1e5, max_backoff=60.0)
    delay = policy.delay(99)
    assert 60.0 * 0.8 <= delay <= 60.0 * 1.2


def test_delay_of_small_factor_reaches_cap() -> None:
    policy = Retry(
        max_attempts=200, backoff=1.0, factor=1.1, max_backoff=600.0, jitter=0.0
    )
    # 1.1 ** 149 is about 1.5e6, far past the cap.
    assert policy.delay(150) == 600.0


def test_delay_jitter_stays_in_bounds() -> None:
    policy = Retry(backoff=10.0, factor=2.0, jitter=0.2)
    first = [policy.delay(1) for _ in range(2000)]
    third = [policy.delay(3) for _ in range(2000)]
    assert min(first) >= 8.0
    assert max(first) <= 12.0
    assert min(third) >= 32.0
    assert max(third) <= 48.0
    # For uniform draws from [8, 12], each of these fails with odds 0.75 ** 2000.
    assert min(first) < 9.0
    assert max(first) > 11.0


# -- retries of failed runs --


def test_flaky_task_retries_with_growing_backoff(
    make_manager: MakeManager,
) -> None:
    manager = make_manager(FlakyTask)
    task_id = manager.create("flaky", {"failing_runs": 3}).id

    waiting = eventually(lambda: (info := manager.get(task_id)).failures >= 1 and info)
    assert waiting.status == S.PENDING
    assert waiting.failures == 1
    assert waiting.error is not None
    assert waiting.error.type == "ConnectionError"
    assert waiting.owner is None
    assert waiting.run_after is not None
    assert waiting.run_after > waiting.updated_at

    task = manager.wait(task_id, timeout=20)
    assert task.status == S.FINISHED
    assert task.result == {"runs": 4}
    assert task.attempts == 4
    assert task.failures == 3
    assert task.error is None
    assert task.run_after is None
    assert ledger_steps(manager.database, task_id) == [1, 2, 3, 4]

    starts = claim_times(manager, task_id)
    assert len(starts) == 4
    gaps = [seconds_between(a, b) for a, b in itertools.pairwise(starts)]
    # Base 1 s, factor 2, jitter 20 %: each wait is at least 80 % of 1, 2, 4 s.
    assert gaps[0] >= 0.8, gaps
    assert gaps[1] >= 1.6, gaps
    assert gaps[2] >= 3.2, gaps

    retries = [reason for reason in reasons(manager, task_id) if "retry" in reason]
    assert len(retries) == 3, reasons(manager, task_id)
    for number, reason in enumerate(retries, start=1):
        assert reason.startswith("failed in run(): ConnectionError"), reason
        assert f"retry {number} of 4 in " in reason, reason


def test_simultaneous_failures_retry_apart(
    make_manager: MakeManager, tmp_path: Path
) -> None:
    count = 20
    manager = make_manager(FlakyTask, max_workers=count)
    gate = tmp_path / "gate"
    params = {"failing_runs": 1, "gate_file": str(gate)}
    task_ids = [manager.create("flaky", params).id for _ in range(count)]
    eventually(lambda: len(manager.list(statuses=[S.RUNNING])) == count)
    gate.touch()

    for task_id in task_ids:
        assert manager.wait(task_id, timeout=20).status == S.FINISHED

    failed_at = []
    retried_at = []
    for task_id in task_ids:
        events = manager.events(task_id)
        failed_at.append(
            next(
                e.at
                for e in events
                if (e.from_status, e.to_status) == (S.RUNNING, S.PENDING)
            )
        )
        retried_at.append(claim_times(manager, task_id)[1])
    # Claims and outcomes are written one at a time, so start times spread a
    # little even without jitter. The waits from failure to retry do not.
    fail_span = seconds_between(min(failed_at), max(failed_at))
    retry_span = seconds_between(min(retried_at), max(retried_at))
    waits = [seconds_between(f, r) for f, r in zip(failed_at, retried_at, strict=True)]
    assert retry_span > 0.1, (
        f"retries within {retry_span:.3f} s; failures within {fail_span:.3f} s"
    )
    assert max(waits) - min(waits) > 0.1, waits


def test_unretried_exception_fails_at_once(make_manager: MakeManager) -> None:
    manager = make_manager(StepTask)
    task_id = manager.create("step", {"n": 3, "step_s": 0, "fail_step": 2}).id
    task = manager.wait(task_id)
    assert task.status == S.FAILED
    assert task.attempts == 1
    assert task.failures == 1
    assert task.error is not None
    assert task.error.type == "ValueError"
    assert task.run_after is None
    assert reasons(manager, task_id)[-1] == "failed in run(): ValueError"


def test_exhausted_attempts_fail_task(make_manager: MakeManager) -> None:
    manager = make_manager(QuickFlakyTask)
    task_id = manager.create("flaky_quick", {"failing_runs": 10}).id
    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FAILED
    assert task.attempts == 3
    assert task.failures == 3
    assert task.run_after is None
    assert task.error is not None
    assert task.error.type == "ConnectionError"
    assert task.error.message == "connection refused in run 3"
    assert ledger_steps(manager.database, task_id) == [1, 2, 3]
    history = reasons(manager, task_id)
    assert "retry 1 of 2 in " in history[2], history
    assert "retry 2 of 2 in " in history[4], history
    assert history[-1] == (
        "failed in run(): ConnectionError; no attempts left (3 of 3)"
    ), history
    time.sleep(0.5)
    assert manager.get(task_id).attempts == 3


@pytest.mark.parametrize("policy", [3, Retry], ids=["int", "class"])
def test_register_rejects_invalid_retry(make_manager: MakeManager, policy: Any) -> None:
    class BadRetry(StepTask):
        name = "bad_retry"
        retry = policy

    manager = make_manager()
    with pytest.raises(TypeError, match="retry"):
        manager.register(BadRetry)


@pytest.mark.parametrize(
    "limit",
    [dt.timedelta(seconds=30), "30", -1.0, math.nan],
    ids=["timedelta", "str", "negative", "nan"],
)
def test_register_rejects_invalid_timeout(
    make_manager: MakeManager, limit: Any
) -> None:
    class BadTimeout(StepTask):
        name = "bad_timeout"
        timeout = limit

    manager = make_manager()
    with pytest.raises((TypeError, ValueError), match="timeout"):
        manager.register(BadTimeout)


def test_due_task_adopted_past_waiting_retries(make_manager: MakeManager) -> None:
    store = make_manager(StepTask, max_workers=0)
    runner = make_manager(StepTask, max_workers=1, poll_interval=0.1)
    # More tasks in their retry backoff than one poll reads (64 per worker),
    # all older than the task that is due.
    later = utcnow() + dt.timedelta(hours=1)
    with store.database.write() as session:
        for _ in range(64):
            row = crud.create_task(session, name="step", params={"n": 1})
            session.execute(
                sqlalchemy.update(crud.TaskRow)
                .where(crud.TaskRow.id == row.id)
                .values(run_after=later)
            )
    due = store.create("step", {"n": 1, "step_s": 0})
    assert runner.wait(due.id, timeout=5).status == S.FINISHED


# -- requests while a task waits for its retry --


def wait_for_first_failure(manager: TaskManager, task_id: str) -> dt.datetime:
    """Wait until the first run failed; return when the retry is due."""
    task = eventually(lambda: (info := manager.get(task_id)).failures == 1 and info)
    assert task.status == S.PENDING
    assert task.run_after is not None
    return task.run_after


def sleep_past(moment: dt.datetime, margin: float = 0.3) -> None:
    time.sleep(max(0.0, seconds_between(utcnow(), moment)) + margin)


def test_pause_during_backoff_holds_task(make_manager: MakeManager) -> None:
    manager = make_manager(FlakyTask, poll_interval=0.1)
    task_id = manager.create("flaky", {"failing_runs": 1}).id
    due = wait_for_first_failure(manager, task_id)

    assert manager.pause(task_id).status == S.PAUSED
    sleep_past(due)
    assert manager.get(task_id).status == S.PAUSED
    assert ledger_steps(manager.database, task_id) == [1]

    assert manager.resume(task_id).status == S.PENDING
    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FINISHED
    assert task.result == {"runs": 2}
    assert task.attempts == 2
    assert ledger_steps(manager.database, task_id) == [1, 2]


def test_stop_during_backoff_ends_task(make_manager: MakeManager) -> None:
    manager = make_manager(FlakyTask, poll_interval=0.1)
    task_id = manager.create("flaky", {"failing_runs": 1}).id
    due = wait_for_first_failure(manager, task_id)

    stopped = manager.stop(task_id)
    assert stopped.status == S.STOPPED
    assert stopped.finished_at is not None
    sleep_past(due)
    assert manager.get(task_id).status == S.STOPPED
    assert manager.get(task_id).attempts == 1
    assert ledger_steps(manager.database, task_id) == [1]


def test_restart_during_backoff_runs_at_once(make_manager: MakeManager) -> None:
    manager = make_manager(FlakyTask, poll_interval=0.1)
    task_id = manager.create("flaky", {"failing_runs": 1}).id
    due = wait_for_first_failure(manager, task_id)
    manager.stop(task_id)

    restarted = manager.restart(task_id)
    assert restarted.status == S.PENDING
    assert restarted.failures == 0
    assert restarted.run_after is None
    assert restarted.error is None
    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FINISHED
    assert claim_times(manager, task_id)[1] < due


def test_restart_of_failed_task_resets_failures(make_manager: MakeManager) -> None:
    manager = make_manager(QuickFlakyTask)
    task_id = manager.create("flaky_quick", {"failing_runs": 10}).id
    assert manager.wait(task_id, timeout=10).failures == 3

    restarted = manager.restart(task_id)
    assert restarted.status == S.PENDING
    assert restarted.failures == 0
    assert restarted.run_after is None

    # A reset count gives the task its whole retry budget again.
    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FAILED
    assert task.failures == 3
    assert task.attempts == 6
    assert ledger_steps(manager.database, task_id) == [1, 2, 3, 4, 5, 6]


# -- time limits --


def test_timeout_fails_task_at_checkpoint(make_manager: MakeManager) -> None:
    manager = make_manager(TimedStepTask)
    task_id = manager.create("step_timed", {"n": 100, "step_s": 0.05}).id
    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FAILED
    assert task.error is not None
    assert task.error.type == "TimeLimitExceeded"
    assert "time limit of 0.3 s" in task.error.message
    assert task.error.phase == "run"
    assert task.attempts == 1
    assert task.started_at is not None
    assert task.finished_at is not None
    assert seconds_between(task.started_at, task.finished_at) >= 0.3
    assert len(ledger_steps(manager.database, task_id)) < 100


def test_timeout_cancels_async_hook(make_manager: MakeManager) -> None:
    manager = make_manager(TimedAsyncSleepTask)
    task_id = manager.create("async_sleep_timed", {"seconds": 30}).id
    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FAILED
    assert task.error is not None
    assert task.error.type == "TimeLimitExceeded"
    assert "time limit of 0.3 s" in task.error.message
    assert task.error.phase == "run"


def test_timeout_in_async_post_names_time_limit(make_manager: MakeManager) -> None:
    manager = make_manager(TimedAsyncPostTask)
    task_id = manager.create("async_post_timed", {"seconds": 30}).id
    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FAILED
    assert task.error is not None
    assert task.error.type == "TimeLimitExceeded", task.error
    assert task.error.phase == "post"


def test_timeout_waits_for_blocked_hook(make_manager: MakeManager) -> None:
    manager = make_manager(TimedBlockingTask, lease_duration=0.6)
    task_id = manager.create("blocking_timed", {"seconds": 2.0}).id
    claimed = manager.wait(task_id, statuses=[S.RUNNING])
    assert claimed.started_at is not None
    sleep_past(claimed.started_at + dt.timedelta(seconds=0.5), margin=0.2)

    first = manager.get(task_id)
    time.sleep(0.5)
    second = manager.get(task_id)
    assert first.status == S.RUNNING
    assert second.status == S.RUNNING
    assert first.heartbeat_at is not None
    assert second.heartbeat_at == first.heartbeat_at
    assert first.heartbeat_at <= claimed.started_at
    assert first.lease_expires_at is not None
    assert second.lease_expires_at is not None
    assert second.lease_expires_at > first.lease_expires_at

    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FAILED
    assert task.error is not None
    assert task.error.type == "TimeLimitExceeded"
    assert task.error.message.endswith("it ended at a checkpoint")


def test_stop_before_timeout_wins(make_manager: MakeManager) -> None:
    manager = make_manager(TimedBlockingTask)
    task_id = manager.create("blocking_timed", {"seconds": 1.5}).id
    claimed = manager.wait(task_id, statuses=[S.RUNNING])
    # A task is RUNNING from its claim, a moment before its hooks start. A
    # stop requested in that moment ends the run before the hooks, so the
    # time limit never comes into play.
    time.sleep(0.1)
    manager.stop(task_id)
    assert claimed.started_at is not None
    requested = seconds_between(claimed.started_at, utcnow())
    assert requested < 0.5, f"stop requested {requested:.2f} s into the run"

    task = manager.wait(task_id, timeout=10)
    assert task.status == S.STOPPED
    assert task.error is None
    assert reasons(manager, task_id)[-1] == "stopped by request at a checkpoint"


def test_pause_after_timeout_still_fails(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskmill")
    manager = make_manager(TimedBlockingTask)
    task_id = manager.create("blocking_timed", {"seconds": 1.5}).id
    eventually(
        lambda: any(
            getattr(record, "event", None) == "task.timed_out"
            for record in caplog.records
        )
    )
    assert manager.get(task_id).status == S.RUNNING
    manager.pause(task_id)

    ended = [S.PAUSED, S.FAILED, S.STOPPED, S.FINISHED]
    task = manager.wait(task_id, statuses=ended, timeout=10)
    assert task.status == S.FAILED, reasons(manager, task_id)
    assert task.error is not None
    assert task.error.type == "TimeLimitExceeded"


# -- leases --


def test_live_lease_blocks_takeover(make_manager: MakeManager) -> None:
    store = make_manager(StepTask, max_workers=0)
    task_id = store.create("step", {"n": 2, "step_s": 0}).id
    claim_as(store, task_id, OTHER_HOST_RUNNER, lease=60)

    manager = make_manager(StepTask, poll_interval=0.1)
    time.sleep(0.5)
    task = manager.get(task_id)
    assert task.status == S.RUNNING
    assert task.owner == OTHER_HOST_RUNNER
    assert task.attempts == 1
    assert task.recoveries == 0

    with manager.database.write() as session:
        crud.expire_leases(session, OTHER_HOST_RUNNER)
    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FINISHED
    assert task.recoveries == 1
    assert task.failures == 1
    assert task.attempts == 2
    recovery = reasons(manager, task_id)[2]
    assert OTHER_HOST_RUNNER in recovery, recovery
    assert "lease expired" in recovery, recovery


def test_expired_lease_recovered_at_startup(make_manager: MakeManager) -> None:
    store = make_manager(StepTask, max_workers=0)
    task_id = store.create("step", {"n": 2, "step_s": 0}).id
    claim_as(store, task_id, OTHER_HOST_RUNNER, lease=-1)

    manager = make_manager(StepTask, poll_interval=60)
    recovered = manager.get(task_id)
    assert recovered.status == S.PENDING
    assert recovered.owner is None
    assert recovered.recoveries == 1
    assert recovered.run_after is not None
    recovery = reasons(manager, task_id)[2]
    assert OTHER_HOST_RUNNER in recovery, recovery
    assert "lease expired" in recovery, recovery


def test_dead_process_recovered_by_poll(make_manager: MakeManager) -> None:
    manager = make_manager(StepTask, poll_interval=0.1)
    task_id = manager.create("step", {"n": 2, "step_s": 0}, start=False).id
    owner = dead_runner_id()
    claim_as(manager, task_id, owner, lease=60)

    task = manager.wait(task_id, timeout=10)
    assert task.status == S.FINISHED
    assert task.recoveries == 1
    assert task.attempts == 2
    recovery = reasons(manager, task_id)[3]
    assert owner in recovery, recovery
    assert "its process is gone" in recovery, recovery


def test_lease_advances_while_task_runs(make_manager: MakeManager) -> None:
    manager = make_manager(BlockingTask, lease_duration=0.6)
    task_id = manager.create("blocking", {"seconds": 1.5}).id
    first = manager.wait(task_id, statuses=[S.RUNNING])
    time.sleep(0.5)
    second = manager.get(task_id)
    assert first.lease_expires_at is not None
    assert second.lease_expires_at is not None
    assert second.lease_expires_at > first.lease_expires_at
    assert second.lease_expires_at > utcnow()

    task = manager.wait(task_id)
    assert task.status == S.FINISHED
    assert task.lease_expires_at is None


def test_lease_renewed_before_it_expires(make_manager: MakeManager) -> None:
    manager = make_manager(
        BlockingTask, lease_duration=0.6, progress_interval=1.0, poll_interval=1.0
    )
    task_id = manager.create("blocking", {"seconds": 2.0}).id
    manager.wait(task_id, statuses=[S.RUNNING])
    expired = []
    deadline = time.monotonic() + 1.8
    while time.monotonic() < deadline:
        task = manager.get(task_id)
        now = utcnow()
        if task.status == S.RUNNING and task.lease_expires_at is not None:
            if task.lease_expires_at < now:
                expired.append(seconds_between(task.lease_expires_at, now))
        time.sleep(0.05)
    assert not expired, f"the lease had expired for up to {max(expired):.2f} s"
    assert manager.wait(task_id).recoveries == 0


class TimedSilentTask(BaseTask[NoParams]):
    """A run that blocks past its limit and returns without any checkpoint."""

    name = "silent_timed"
    timeout = 0.3

    def pre(self) -> None:
        pass

    def run(self) -> str:
        time.sleep(0.8)
        return "done"

    def post(self) -> None:
        pass


def test_timeout_fails_run_that_returns_late(make_manager: MakeManager) -> None:
    manager = make_manager(TimedSilentTask)
    task_id = manager.create("silent_timed").id

    failed = manager.wait(task_id)

    assert failed.status == S.FAILED
    assert failed.result is None
    assert failed.error is not None
    assert failed.error.type == "TimeLimitExceeded"
    assert "after run() returned" in failed.error.message


def test_payload_over_limit_not_retried() -> None:
    policy = Retry(retry_on=(Exception,))

    assert policy.retries(ConnectionError("down"))
    assert not policy.retries(ResultTooLarge("The result", 2_000_000, 1_000_000))
