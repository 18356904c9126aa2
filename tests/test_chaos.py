"""Runner processes killed at random while they share one SQLite file.

Three ``tests.runner_process`` runners work through a few hundred
``step_retried`` tasks while the test SIGKILLs one of them every 0.5 to 1.5 s
and starts it again. Each step writes its ledger row in its checkpoint's
transaction, and the ledger's unique constraint fails a task whose step runs
twice, so every task must end FINISHED with one ledger row per step.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from taskmill import TaskManager
from tests.runner_process import RetriedStepTask, RunnerProcess
from tests.tasks import create_ledger

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
DRAIN_S = 45.0
#: A RUNNING task whose lease expired this long ago was left behind.
STALE_LEASE_S = 2.0
RUNNER_ENV = {
    "TASKMILL_TEST_WORKERS": "4",
    "TASKMILL_TEST_LEASE": "5",
    "TASKMILL_TEST_POLL": "0.2",
}


def query(database_path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(database_path, timeout=30)
    try:
        return list(connection.execute(sql, args))
    finally:
        connection.close()


def stored_time(moment: dt.datetime) -> str:
    """Format a UTC time as taskmill stores it in SQLite, to compare in SQL."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def count_stale_leases(database_path: Path) -> int:
    """Count RUNNING tasks whose lease expired more than STALE_LEASE_S ago."""
    stale = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=STALE_LEASE_S)
    rows = query(
        database_path,
        "SELECT count(*) FROM tasks WHERE status = 'RUNNING' AND lease_expires_at < ?",
        stored_time(stale),
    )
    count: int = rows[0][0]
    return count


def count_unfinished(database_path: Path) -> int:
    rows = query(
        database_path,
        "SELECT count(*) FROM tasks WHERE status IN ('PENDING', 'RUNNING', 'PAUSED')",
    )
    count: int = rows[0][0]
    return count


def test_runners_killed_at_random_lose_no_step(tmp_path: Path) -> None:
    database_path = tmp_path / "tasks.db"
    url = f"sqlite:///{database_path}"
    rng = random.Random(SEED)
    store = TaskManager(url, max_workers=0)
    store.register(RetriedStepTask)
    store.startup()
    create_ledger(store.database)
    runners = [
        RunnerProcess(url, tmp_path / f"runner-{index}.log", RUNNER_ENV)
        for index in range(RUNNERS)
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
        while time.monotonic() < chaos_end and count_unfinished(database_path):
            time.sleep(rng.uniform(0.5, 1.5))
            victim = rng.choice(runners)
            victim.kill9()
            kills += 1
            # Not waited for: the next kill may come while it starts up.
            victim.start(wait=False)
            max_stale = max(max_stale, count_stale_leases(database_path))
        chaos_s = time.monotonic() - started

        drain_end = time.monotonic() + DRAIN_S
        while count_unfinished(database_path) and time.monotonic() < drain_end:
            max_stale = max(max_stale, count_stale_leases(database_path))
            time.sleep(0.2)
        duration = time.monotonic() - started

        rows = query(
            database_path,
            "SELECT id, status, result, progress, recoveries, attempts FROM tasks",
        )
        statuses: dict[str, int] = {}
        for _, status, *_ in rows:
            statuses[status] = statuses.get(status, 0) + 1
        recoveries = sum(row[4] for row in rows)
        recovered_tasks = sum(1 for row in rows if row[4] > 0)
        print(
            f"\nseed {SEED}: {kills} kills in {chaos_s:.1f} s; {recoveries} recoveries over "
            f"{recovered_tasks} tasks; at most {max(row[5] for row in rows)} attempts "
            f"of one task; statuses {statuses}; {duration:.1f} s in all"
        )

        assert statuses == {"FINISHED": TASKS}, failures_of(database_path)
        expected_sum = STEPS * (STEPS + 1) // 2
        wrong_results = [
            task_id
            for task_id, _, result, progress, _, _ in rows
            if json.loads(result) != {"sum": expected_sum} or progress != 100
        ]
        assert wrong_results == []

        ledger = {
            task_id: (count, first, last)
            for task_id, count, first, last in query(
                database_path,
                "SELECT task_id, count(*), min(step), max(step) FROM ledger "
                "GROUP BY task_id",
            )
        }
        assert set(ledger) == set(task_ids)
        wrong_ledger = {
            task_id: steps
            for task_id, steps in ledger.items()
            if steps != (STEPS, 1, STEPS)
        }
        assert wrong_ledger == {}

        assert count_unfinished(database_path) == 0
        assert count_stale_leases(database_path) == 0
        assert max_stale == 0
        assert kills >= 10
        assert recovered_tasks > 0
    finally:
        for runner in runners:
            runner.stop()
        store.shutdown()


def failures_of(database_path: Path) -> list[tuple[Any, ...]]:
    """Return the status, error and history of up to five tasks that did not finish."""
    rows = query(
        database_path,
        "SELECT id, status, error FROM tasks WHERE status != 'FINISHED' LIMIT 5",
    )
    return [
        (
            *row,
            query(
                database_path,
                "SELECT to_status, reason FROM task_events WHERE task_id = ? ORDER BY id",
                row[0],
            ),
        )
        for row in rows
    ]
