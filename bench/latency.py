"""Create-to-start latency: from ``create()`` returning to the task's ``run()`` being entered.

One producer creates ``Stamp`` tasks at a steady rate (50 a second in a full
run) on a manager in the same process, with ``max_workers=4`` and default
intervals, on a fresh SQLite file. The producer reads ``time.perf_counter()``
just after ``create()`` returns, and ``Stamp.run()`` reads it again on entry.
Both readings come from one process, so they share one monotonic clock.

At this rate the workers are idle most of the time, so the figure is the
cost of one hand-off, not a wait in the queue.

With a worker free, the transaction that stores the task also claims it,
and the manager starts the run before ``create()`` returns, so the hooks
often start while ``create()`` is still finishing. The benchmark therefore
also reports the latency from the call of ``create()`` (the whole
hand-off: the commit, the start of the hook thread and the ``pre()``
call), the time the call takes, and the share of tasks whose ``run()`` was
entered before ``create()`` returned (their latency from the return is
negative).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable

from bench.common import Benchmark, Figures, Sizes, percentile
from taskmill import BaseTask, NoParams, TaskManager

#: Tasks created per second.
RATE = 50.0
#: Maximum wait in seconds for the last task to start.
START_TIMEOUT = 30.0

#: ``time.perf_counter()`` on entry to ``run()``, by task id. Assigning a
#: dict item is atomic under the GIL, so hook threads write it without a lock.
_run_entered: dict[str, float] = {}


class Stamp(BaseTask[NoParams]):
    """Record when ``run()`` is entered, and do nothing else."""

    name = "bench_stamp"

    def pre(self) -> None:
        pass

    def run(self) -> None:
        _run_entered[self.task_id] = time.perf_counter()

    def post(self) -> None:
        pass


def measure(sizes: Sizes) -> Figures:
    tasks = sizes["tasks"]
    _run_entered.clear()
    called_at: dict[str, float] = {}
    returned_at: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="taskmill-bench-latency-") as directory:
        manager = TaskManager(f"sqlite:///{directory}/latency.db", max_workers=4)
        manager.register(Stamp)
        manager.startup()
        try:
            next_at = time.perf_counter()
            for _ in range(tasks):
                # When a create() takes longer than the interval, the next
                # one follows at once, so the rate drops below RATE.
                time.sleep(max(0.0, next_at - time.perf_counter()))
                called = time.perf_counter()
                task_id = manager.create(Stamp.name).id
                returned_at[task_id] = time.perf_counter()
                called_at[task_id] = called
                next_at += 1 / RATE
            _wait_until_started(returned_at.keys())
        finally:
            manager.shutdown()
    from_return = [
        (_run_entered[task_id] - returned) * 1000
        for task_id, returned in returned_at.items()
    ]
    from_call = [
        (_run_entered[task_id] - called) * 1000 for task_id, called in called_at.items()
    ]
    create_ms = [
        (returned_at[task_id] - called) * 1000 for task_id, called in called_at.items()
    ]
    started_early = sum(1 for latency in from_return if latency < 0)
    return {
        "create_to_start_p50_ms": percentile(from_return, 50),
        "create_to_start_p99_ms": percentile(from_return, 99),
        "create_called_to_start_p50_ms": percentile(from_call, 50),
        "create_called_to_start_p99_ms": percentile(from_call, 99),
        "create_call_p50_ms": percentile(create_ms, 50),
        "create_call_p99_ms": percentile(create_ms, 99),
        "started_before_create_returned_percent": 100 * started_early / tasks,
    }


def _wait_until_started(task_ids: Iterable[str]) -> None:
    expected = set(task_ids)
    deadline = time.monotonic() + START_TIMEOUT
    while not expected <= _run_entered.keys():
        if time.monotonic() > deadline:
            missing = len(expected - _run_entered.keys())
            raise TimeoutError(
                f"{missing} tasks did not start within {START_TIMEOUT} s of the last "
                "create()."
            )
        time.sleep(0.01)


BENCHMARK = Benchmark(
    name="latency",
    description=f"create-to-start latency at {RATE:g} tasks a second",
    sizes={"tasks": 1000},
    quick_sizes={"tasks": 25},
    measure=measure,
)
