"""Pause latency: the time from a pause request until the running task is PAUSED.

The task, ``Ticker``, checkpoints every 10 ms. It spends the time between
checkpoints in ``time.sleep()``, which stands for work that a pause cannot
interrupt, so a pause waits for the next checkpoint, as it would in a real task.

Each sample starts from the UTC wall clock just before ``pause()`` is called
and ends at the ``at`` timestamp of the PAUSED event that the runner writes
(``TaskManager.events()``). Both are read from the system clock of this
machine, so they are comparable across processes. After each pause the task
is resumed; the next pause is sent 20 to 50 ms after it is RUNNING again.

Two variants:

- same process: the manager that runs the task receives ``pause()``;
- other process: a child process (bench/worker.py) runs the task, and this
  process sends ``pause()`` and ``resume()`` through a manager of its own with
  ``max_workers=0``, which stores the requests and runs no task.
"""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from bench.common import Benchmark, Figures, Sizes, percentile
from bench.worker import worker_process
from taskmill import BaseTask, TaskEventInfo, TaskManager, TaskStatus

#: How long one status change may take before the benchmark gives up, in seconds.
STATUS_TIMEOUT = 30.0
#: How often the benchmark reads the task's status while it waits, in seconds.
#: The latency comes from timestamps, so this only sets how much CPU the
#: benchmark's own reads take from the runner it measures.
STATUS_POLL = 0.01
#: The wait between the task being RUNNING again and the next pause, in seconds.
PAUSE_GAP = (0.020, 0.050)


class TickerParams(BaseModel):
    tick_s: float = Field(default=0.010, gt=0)
    #: Bounds the run (about 3 hours at 10 ms per tick) if the benchmark does not stop it.
    max_ticks: int = Field(default=1_000_000, ge=1)


class Ticker(BaseTask[TickerParams]):
    """Checkpoint the tick count every ``tick_s`` seconds, up to ``max_ticks``."""

    name = "bench_ticker"
    params_model = TickerParams

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, int]:
        tick = self.state["tick"] if self.state else 0
        while tick < self.params.max_ticks:
            time.sleep(self.params.tick_s)
            tick += 1
            self.checkpoint({"tick": tick})
        return {"ticks": tick}

    def post(self) -> None:
        pass


def measure(sizes: Sizes) -> Figures:
    pauses = sizes["pauses"]
    # A fixed seed: every repeat waits the same gaps between pauses.
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="taskmill-bench-pause-") as directory:
        same = _same_process(f"sqlite:///{directory}/same.db", pauses, rng)
        other = _other_process(
            f"sqlite:///{directory}/other.db", pauses, rng, Path(directory)
        )
    figures: Figures = {
        "pause_same_process_p50_ms": percentile(same, 50),
        "pause_same_process_p99_ms": percentile(same, 99),
        "pause_other_process_p50_ms": percentile(other, 50),
        "pause_other_process_p99_ms": percentile(other, 99),
    }
    figures["pause_p99_ms"] = figures["pause_same_process_p99_ms"]
    return figures


def _same_process(database_url: str, pauses: int, rng: random.Random) -> list[float]:
    manager = TaskManager(database_url, max_workers=1)
    manager.register(Ticker)
    manager.startup()
    try:
        task_id = manager.create(Ticker.name).id
        latencies = _pause_repeatedly(manager, task_id, pauses, rng)
        _stop(manager, task_id)
    finally:
        manager.shutdown()
    return latencies


def _other_process(
    database_url: str, pauses: int, rng: random.Random, directory: Path
) -> list[float]:
    # The child looks for resumed (PENDING) tasks every 50 ms rather than every
    # second, so that a resume takes effect quickly. A pause does not depend on
    # these intervals: each checkpoint reads the stored request in its UPDATE.
    with (
        worker_process(
            database_url,
            [f"{Ticker.__module__}:{Ticker.__qualname__}"],
            log_path=directory / "worker.log",
            progress_interval=0.05,
            poll_interval=0.05,
        ),
        _controller(database_url) as controller,
    ):
        task_id = controller.create(Ticker.name).id
        latencies = _pause_repeatedly(controller, task_id, pauses, rng)
        _stop(controller, task_id)
    return latencies


@contextmanager
def _controller(database_url: str) -> Iterator[TaskManager]:
    """Yield a manager that stores tasks and requests but runs no task.

    Its ``create()``, ``pause()`` and ``resume()`` only write to the database,
    and the worker process picks the changes up from there.
    """
    manager = TaskManager(database_url, max_workers=0)
    manager.register(Ticker)
    manager.startup()
    try:
        yield manager
    finally:
        manager.shutdown()


def _pause_repeatedly(
    manager: TaskManager, task_id: str, pauses: int, rng: random.Random
) -> list[float]:
    """Pause and resume the task ``pauses`` times; return each latency in ms."""
    latencies = []
    for _ in range(pauses):
        manager.wait(task_id, {TaskStatus.RUNNING}, STATUS_TIMEOUT, STATUS_POLL)
        time.sleep(rng.uniform(*PAUSE_GAP))
        requested_at = dt.datetime.now(dt.UTC)
        manager.pause(task_id)
        manager.wait(task_id, {TaskStatus.PAUSED}, STATUS_TIMEOUT, STATUS_POLL)
        paused_at = _last_paused_at(manager.events(task_id), requested_at)
        latencies.append((paused_at - requested_at).total_seconds() * 1000)
        manager.resume(task_id)
    return latencies


def _last_paused_at(
    events: list[TaskEventInfo], requested_at: dt.datetime
) -> dt.datetime:
    for event in reversed(events):
        if event.to_status == TaskStatus.PAUSED:
            if event.at < requested_at:
                raise RuntimeError(
                    f"Task {event.task_id}: the last PAUSED event is at {event.at}, "
                    f"before the pause was requested at {requested_at}."
                )
            return event.at
    raise RuntimeError("The task is PAUSED but its history has no PAUSED event.")


def _stop(manager: TaskManager, task_id: str) -> None:
    manager.stop(task_id)
    manager.wait(task_id, {TaskStatus.STOPPED}, STATUS_TIMEOUT, STATUS_POLL)


BENCHMARK = Benchmark(
    name="pause",
    description="pause latency of a task that checkpoints every 10 ms",
    sizes={"pauses": 200},
    quick_sizes={"pauses": 10},
    measure=measure,
)
