"""Runner processes killed at random while they share one database.

On SQLite, three ``tests.runner_process`` runners work through a few hundred
``step_retried`` tasks while the test SIGKILLs one of them every 0.5 to 1.5 s
and starts it again. Each step writes its ledger row in its checkpoint's
transaction, and the ledger's unique constraint fails a task whose step runs
twice, so every task must end FINISHED with one ledger row per step.

The multi-node variant runs on PostgreSQL with each runner acting as a
machine of its own. Its runner id names another host, so its tasks come back
only when its leases expire. Its clock is off by up to a minute, which
leases measured by the database's clock must not notice.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from taskmill import Database, TaskManager, TaskStatus
from taskmill.models import BackgroundTaskModel as Task
from taskmill.models import TaskEventModel as Event
from taskmill.models import database_now
from tests.runner_process import RetriedStepTask, RunnerProcess
from tests.tasks import create_ledger, ledger

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.timeout(150)]

#: The seed of the kill schedule; TASKMILL_CHAOS_SEED overrides it to explore others.
SEED = int(os.environ.get("TASKMILL_CHAOS_SEED", "20240607"))
RUNNERS = 3
TASKS = 300
STEPS = 5
STEP_S = 0.15
#: Seconds during which runners are killed.
CHAOS_S = 20.0
#: Seconds that the runners get to finish the tasks once the kills end.
DRAIN_S = 60.0
#: A RUNNING task whose lease expired this long ago was left behind.
STALE_LEASE_S = 2.0
RUNNER_ENV = {
    "TASKMILL_TEST_WORKERS": "4",
    "TASKMILL_TEST_LEASE": "5",
    "TASKMILL_TEST_POLL": "0.2",
}
#: Clock errors of the simulated machines, in seconds: one ahead by more
#: than a lease, one behind, one right.
CLOCK_SKEWS = (40.0, -55.0, 0.0)
UNFINISHED = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.PAUSED)


def count_stale_leases(database: Database) -> int:
    """Count RUNNING tasks whose lease expired more than STALE_LEASE_S ago."""
    with database.read() as session:
        return session.execute(
            select(func.count()).where(
                Task.status == TaskStatus.RUNNING,
                Task.lease_expires_at < database_now(-STALE_LEASE_S),
            )
        ).scalar_one()


def count_unfinished(database: Database) -> int:
    with database.read() as session:
        return session.execute(
            select(func.count()).where(Task.status.in_(UNFINISHED))
        ).scalar_one()


def test_runners_killed_at_random_lose_no_step(sqlite_url: str, tmp_path: Path) -> None:
    # On PostgreSQL, the test below does the same with machines of their own.
    run_chaos(sqlite_url, tmp_path, [RUNNER_ENV] * RUNNERS)


@pytest.mark.postgresql
def test_nodes_with_skewed_clocks_lose_no_step(
    postgres_url: str, tmp_path: Path
) -> None:
    envs = [
        {
            **RUNNER_ENV,
            "TASKMILL_TEST_HOST": f"node-{index}",
            "TASKMILL_TEST_CLOCK_SKEW": str(skew),
        }
        for index, skew in enumerate(CLOCK_SKEWS)
    ]
    run_chaos(postgres_url, tmp_path, envs)


def run_chaos(url: str, tmp_path: Path, envs: list[dict[str, str]]) -> None:
    rng = random.Random(SEED)
    store = TaskManager(url, max_workers=0)
    store.register(RetriedStepTask)
    store.startup()
    database = store.database
    create_ledger(database)
    runners = [
        RunnerProcess(url, tmp_path / f"runner-{index}.log", env)
        for index, env in enumerate(envs)
    ]
    try:
        for runner in runners:
            runner.start()
        started = time.monotonic()
        params = {"n": STEPS, "step_s": STEP_S}
        task_ids = [store.create("step_retried", params).id for _ in range(TASKS)]

        kills = 0
        max_stale = 0
        chaos_end = time.monotonic() + CHAOS_S
        while time.monotonic() < chaos_end and count_unfinished(database):
            time.sleep(rng.uniform(0.5, 1.5))
            victim = rng.choice(runners)
            victim.kill9()
            kills += 1
            # Not waited for: the next kill may come while it starts up.
            victim.start(wait=False)
            max_stale = max(max_stale, count_stale_leases(database))
        chaos_s = time.monotonic() - started

        drain_end = time.monotonic() + DRAIN_S
        while count_unfinished(database) and time.monotonic() < drain_end:
            max_stale = max(max_stale, count_stale_leases(database))
            time.sleep(0.2)
        duration = time.monotonic() - started

        with database.read() as session:
            rows = session.execute(
                select(
                    Task.id,
                    Task.status,
                    Task.result,
                    Task.progress,
                    Task.recoveries,
                    Task.attempts,
                )
            ).all()
        statuses: dict[str, int] = {}
        for row in rows:
            statuses[row.status.value] = statuses.get(row.status.value, 0) + 1
        recoveries = sum(row.recoveries for row in rows)
        recovered_tasks = sum(1 for row in rows if row.recoveries > 0)
        print(
            f"\nseed {SEED}: {kills} kills in {chaos_s:.1f} s; {recoveries} recoveries over "
            f"{recovered_tasks} tasks; at most {max(row.attempts for row in rows)} "
            f"attempts of one task; statuses {statuses}; {duration:.1f} s in all"
        )

        assert statuses == {"FINISHED": TASKS}, failures_of(database)
        expected_sum = STEPS * (STEPS + 1) // 2
        wrong_results = [
            row.id
            for row in rows
            if row.result != {"sum": expected_sum} or row.progress != 100
        ]
        assert wrong_results == []

        with database.read() as session:
            steps = session.execute(
                select(
                    ledger.c.task_id,
                    func.count(),
                    func.min(ledger.c.step),
                    func.max(ledger.c.step),
                ).group_by(ledger.c.task_id)
            ).all()
        by_task = {
            task_id: (count, first, last) for task_id, count, first, last in steps
        }
        assert set(by_task) == set(task_ids)
        wrong_ledger = {
            task_id: steps
            for task_id, steps in by_task.items()
            if steps != (STEPS, 1, STEPS)
        }
        assert wrong_ledger == {}

        assert count_unfinished(database) == 0
        assert count_stale_leases(database) == 0
        assert max_stale == 0
        assert kills >= 10
        assert recovered_tasks > 0
    finally:
        for runner in runners:
            runner.stop()
        store.shutdown()


def failures_of(database: Database) -> list[tuple[Any, ...]]:
    """Return the status, error and history of up to five tasks that did not finish."""
    with database.read() as session:
        rows = session.execute(
            select(Task.id, Task.status, Task.error)
            .where(Task.status != TaskStatus.FINISHED)
            .limit(5)
        ).all()
        return [
            (
                *row,
                session.execute(
                    select(Event.to_status, Event.reason)
                    .where(Event.task_id == row.id)
                    .order_by(Event.id)
                ).all(),
            )
            for row in rows
        ]
