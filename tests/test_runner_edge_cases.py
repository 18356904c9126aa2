"""Edge cases of several runners on one database.

Each test sets up runners (managers in this process) on its own database and
drives them into a corner: a shutdown that races a claim, PENDING tasks of a
type that a runner does not know, option values that pass validation but
break the runner, a run that comes back to a process whose old run of the
same task is still alive, and a SQLite file created before leases existed.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import make_url

from taskmill import BaseTask, TaskManager
from taskmill.retry import Retry
from taskmill.runners import new_runner_id
from taskmill.status import TaskStatus
from tests.conftest import eventually
from tests.tasks import (
    BlockingParams,
    BlockingTask,
    NoOp,
    StepParams,
    StepTask,
    create_ledger,
)
from tests.test_faults import hold_write_lock

MakeManager = Callable[..., TaskManager]


class FailsOnceTask(StepTask):
    """StepTask whose first run raises ConnectionError, retried after 1.5 s."""

    name = "fails_once"
    retry = Retry(max_attempts=3, retry_on=(ConnectionError,), backoff=1.5, jitter=0.0)

    def run(self) -> dict[str, int]:
        if self.state is None:
            self.checkpoint({"step": 0})
            raise ConnectionError("the first run fails")
        return super().run()


class LoopBlockingTask(BaseTask[BlockingParams]):
    """An async task that blocks the manager's event loop, so no lease is renewed."""

    name = "loop_blocking"
    params_model = BlockingParams

    async def pre(self) -> None:
        pass

    async def run(self) -> str:
        time.sleep(self.params.seconds)  # blocks the loop on purpose
        return "done"

    async def post(self) -> None:
        pass


def test_shutdown_during_claim_requeues_task(
    make_manager: MakeManager, database_url: str
) -> None:
    """A task claimed while the runner drains goes back to PENDING, not FAILED."""
    runner = make_manager(FailsOnceTask, max_workers=1, poll_interval=0.1)
    params = StepParams(n=200, step_s=0.05)
    task = runner.create("fails_once", params)
    info = eventually(
        lambda: (
            (got := runner.get(task.id)).failures == 1
            and got.status == "PENDING"
            and got
        ),
        timeout=10,
    )
    assert info.run_after is not None

    # Hold the write lock across the end of the backoff, so that the claim
    # that follows waits for it, then shut the runner down meanwhile.
    with hold_write_lock(database_url):
        wait = (info.run_after - dt.datetime.now(dt.UTC)).total_seconds()
        time.sleep(max(wait, 0) + 0.4)
        shutdown = threading.Thread(target=runner.shutdown, kwargs={"grace": 1.0})
        shutdown.start()
        time.sleep(0.3)
    shutdown.join(timeout=15)
    assert not shutdown.is_alive()

    after = runner.get(task.id)
    assert after.error is None or after.error.type != "CancelledError", after.error
    assert after.status == "PENDING", [e.reason for e in runner.events(task.id)]
    assert after.lease_expires_at is None


def test_unknown_types_do_not_starve_adoption(make_manager: MakeManager) -> None:
    """PENDING tasks of a type a runner lacks must not hide its own tasks from it."""
    store = make_manager(StepTask, NoOp, max_workers=0)
    make_manager(StepTask, max_workers=1, poll_interval=0.1)
    # max_workers * 64 is how many PENDING tasks one poll reads.
    for _ in range(64):
        store.create("noop")
    task = store.create("step", StepParams(n=1, step_s=0))

    done = store.wait(task.id, timeout=5)

    assert done.status == "FINISHED"


@pytest.mark.parametrize(
    "options",
    [
        {"lease_duration": float("inf")},
        {"lease_duration": 1e12},
        {"poll_interval": float("nan")},
    ],
    ids=["infinite-lease", "lease-past-year-9999", "nan-poll"],
)
def test_manager_rejects_options_that_stall_tasks(
    options: dict[str, Any], database_url: str
) -> None:
    """Options that let no task run are rejected when the manager is built.

    An infinite or huge lease makes every claim raise OverflowError, and a NaN
    poll interval never polls, so the task stays PENDING forever.
    """
    with pytest.raises(ValueError):
        TaskManager(database_url, **options)


def test_returned_run_stays_tracked_after_stale_run_ends(
    make_manager: MakeManager,
) -> None:
    """A stop reaches a run even after an older, taken-back run of it ended here."""
    first = make_manager(
        BlockingTask,
        LoopBlockingTask,
        max_workers=2,
        lease_duration=0.5,
        poll_interval=0.1,
    )
    task = first.create("blocking", BlockingParams(seconds=5.0))
    eventually(lambda: first.get(task.id).status == "RUNNING", timeout=5)
    first_claimed = time.monotonic()
    first.pause(task.id)  # a blocking call cannot honour it

    # The other runner takes the task back once the first one's loop stops
    # renewing leases; the stored pause makes the task PAUSED.
    other = make_manager(BlockingTask, lease_duration=0.5, poll_interval=0.1)
    first.create("loop_blocking", BlockingParams(seconds=1.5))
    eventually(lambda: first.get(task.id).status == "PAUSED", timeout=5)
    other.shutdown(grace=1.0)
    eventually(
        lambda: first.list(statuses=[TaskStatus.FINISHED], name="loop_blocking"),
        timeout=5,
    )

    # The first runner runs the task again while its old run still blocks.
    first.resume(task.id)
    resumed = eventually(
        lambda: (got := first.get(task.id)).status == "RUNNING" and got, timeout=5
    )
    assert resumed.owner == first.runner_id
    assert resumed.attempts == 2

    # The old run ends about 5 s after it started and finds its task taken.
    time.sleep(max(0.0, first_claimed + 5.5 - time.monotonic()))
    assert first.get(task.id).status == "RUNNING"
    tracked = task.id in first.live_task_ids()

    first.stop(task.id)
    ended = first.wait(task.id, timeout=10)
    assert ended.status == "STOPPED", [e.reason for e in first.events(task.id)]
    assert tracked


OLD_SCHEMA = """
CREATE TABLE tasks (
    id VARCHAR(36) NOT NULL, name VARCHAR(200) NOT NULL, status VARCHAR(16) NOT NULL,
    params JSON NOT NULL, result JSON, error JSON, progress FLOAT NOT NULL,
    message TEXT, checkpoint JSON, attempts INTEGER NOT NULL,
    recoveries INTEGER NOT NULL, control VARCHAR(16), owner VARCHAR(64),
    created_at DATETIME NOT NULL, started_at DATETIME, finished_at DATETIME,
    updated_at DATETIME NOT NULL,
    CONSTRAINT pk_tasks PRIMARY KEY (id)
);
CREATE INDEX ix_tasks_status_created_at ON tasks (status, created_at);
CREATE TABLE task_events (
    id INTEGER NOT NULL, task_id VARCHAR(36) NOT NULL, from_status VARCHAR(16),
    to_status VARCHAR(16) NOT NULL, at DATETIME NOT NULL, reason TEXT NOT NULL,
    CONSTRAINT pk_task_events PRIMARY KEY (id),
    CONSTRAINT fk_task_events_task_id_tasks FOREIGN KEY(task_id)
        REFERENCES tasks (id) ON DELETE CASCADE
);
"""


def _dead_runner_id() -> str:
    """Return a runner id of this host whose process does not exist."""
    host, _, _ = new_runner_id().rsplit(":", 2)
    return f"{host}:4194304:dead00"  # above Linux's largest pid


def test_database_without_lease_columns_upgraded(sqlite_url: str) -> None:
    """A file made before failures, leases and backoff existed keeps its tasks."""
    path = make_url(sqlite_url).database
    assert path is not None
    stored = "2024-01-02 03:04:05.000000"
    rows = [
        ("pending", "PENDING", None, None, 0),
        ("paused", "PAUSED", None, None, 0),
        ("running", "RUNNING", _dead_runner_id(), {"step": 2}, 1),
        ("finished", "FINISHED", None, None, 1),
    ]
    connection = sqlite3.connect(path)
    try:
        connection.executescript(OLD_SCHEMA)
        for task_id, status, owner, checkpoint, attempts in rows:
            connection.execute(
                "INSERT INTO tasks VALUES "
                "(?, 'step', ?, ?, NULL, NULL, 0, NULL, ?, ?, 0, NULL, ?, ?, NULL, NULL, ?)",
                (
                    task_id,
                    status,
                    json.dumps({"n": 4, "step_s": 0}),
                    None if checkpoint is None else json.dumps(checkpoint),
                    attempts,
                    owner,
                    stored,
                    stored,
                ),
            )
            connection.execute(
                "INSERT INTO task_events (task_id, from_status, to_status, at, reason) "
                "VALUES (?, NULL, 'PENDING', ?, 'created')",
                (task_id, stored),
            )
        connection.commit()
    finally:
        connection.close()

    manager = TaskManager(
        sqlite_url, max_workers=2, poll_interval=0.1, progress_interval=0.05
    )
    manager.register(StepTask)
    manager.database.create_schema()
    create_ledger(manager.database)
    manager.startup()
    try:
        columns = {
            row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(tasks)")
        }
        assert {"failures", "lease_expires_at", "heartbeat_at", "run_after"} <= columns
        assert manager.wait("pending", timeout=10).status == "FINISHED"
        recovered = manager.wait("running", timeout=10)
        assert recovered.status == "FINISHED"
        assert recovered.recoveries == 1
        assert manager.get("paused").status == "PAUSED"
        assert manager.get("finished").status == "FINISHED"
    finally:
        manager.shutdown(grace=1.0)
