"""A runner process for the scaling half of bench/postgres.py.

Run as a script, it builds a ``TaskManager`` on the given database with
``Sleep`` registered, prints ``ready`` on stdout, and waits for a ``go`` line
on stdin before it calls ``startup()``::

    python bench/postgres_runner.py postgresql+psycopg://postgres@127.0.0.1:5432/db

The benchmark starts several runners, waits until each is ready and then sends
``go`` to all of them at once. The start of the interpreter and the imports
then stay out of the timed part: ``import taskmill`` alone, which imports
SQLAlchemy, pydantic and FastAPI, takes about 0.7 s of CPU time on the machine
of docs/benchmarks.md. No runner claims tasks before the others can. The
runner shuts its manager down on SIGTERM, or when its standard input reaches
end of file. Then it prints ``stats <commits> <cpu seconds>``: the
transactions that its manager committed and the CPU time of the process, both
counted from ``go`` until the stop.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import event

from taskmill import BaseTask, TaskManager

#: Tasks that run at once in each runner process.
RUNNER_WORKERS = 8
#: Seconds between a runner's looks for PENDING tasks that it has not queued.
RUNNER_POLL_INTERVAL = 0.2
#: The line a runner prints once its manager is built.
READY = b"ready\n"
#: The line that makes a ready runner start its manager.
GO = b"go\n"
#: The start of the line a runner prints when it has stopped.
STATS_PREFIX = b"stats "


class SleepParams(BaseModel):
    seconds: float = Field(default=0.05, gt=0, le=60)


class Sleep(BaseTask[SleepParams]):
    """Wait ``seconds`` in ``self.sleep()``, as a task that waits on I/O would."""

    name = "bench_sleep"
    params_model = SleepParams

    def pre(self) -> None:
        pass

    def run(self) -> None:
        self.sleep(self.params.seconds)

    def post(self) -> None:
        pass


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwinds the main thread out of its read of stdin, so that the
    # ``finally`` in main() shuts the manager down.
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", help="SQLAlchemy URL of a migrated database")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )

    manager = TaskManager(
        args.database,
        max_workers=RUNNER_WORKERS,
        poll_interval=RUNNER_POLL_INTERVAL,
    )
    manager.register(Sleep)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    line = sys.stdin.buffer.readline()
    if line != GO:
        # The benchmark gave up (end of file) before it started the runners.
        manager.database.dispose()
        return 0
    # A C iterator: next() on it is atomic under the GIL, from any thread.
    commits = itertools.count()

    def count_commit(connection: Any) -> None:
        next(commits)

    event.listen(manager.database.engine, "commit", count_commit)
    cpu_started = time.process_time()
    manager.startup()
    try:
        # Returns at end of file, when the benchmark closes the pipe.
        sys.stdin.buffer.read()
    finally:
        cpu_seconds = time.process_time() - cpu_started
        commit_count = next(commits)
        manager.shutdown()
        # Suppressed: after end of file the benchmark may be gone.
        with contextlib.suppress(OSError):
            sys.stdout.buffer.write(
                STATS_PREFIX + f"{commit_count} {cpu_seconds:.6f}\n".encode()
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
