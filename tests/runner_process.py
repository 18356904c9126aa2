"""A task runner process without a web server, and a handle that tests drive it by.

``python -m tests.runner_process`` builds a TaskManager on
``TASKMILL_DATABASE_URL``, starts it, prints ``runner <runner_id> ready`` and
runs tasks until SIGTERM or SIGINT, then shuts the manager down. It reads the
same settings as ``tests/app.py``: ``TASKMILL_TEST_WORKERS``, ``_GRACE``,
``_LEASE`` and ``_POLL``. ``TASKMILL_TEST_HOST`` and ``_CLOCK_SKEW`` make it
act as a runner on another machine whose clock is off by that many seconds.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from taskmill import Retry, TaskManager, models, runners
from tests.tasks import StepTask, create_ledger

ROOT = Path(__file__).resolve().parent.parent


class RetriedStepTask(StepTask):
    """StepTask that survives many killed runs: each SIGKILL of its runner is a failure."""

    name = "step_retried"
    retry = Retry(max_attempts=50, backoff=0.05, max_backoff=0.5)


class BackoffStepTask(StepTask):
    """StepTask whose ValueError (see ``fail_step``) is retried after a 600 s backoff."""

    name = "step_backoff"
    retry = Retry(max_attempts=3, retry_on=(ValueError,), backoff=600.0, jitter=0.0)


def build_manager() -> TaskManager:
    manager = TaskManager(
        os.environ["TASKMILL_DATABASE_URL"],
        max_workers=int(os.environ.get("TASKMILL_TEST_WORKERS", "4")),
        progress_interval=0.1,
        shutdown_grace=float(os.environ.get("TASKMILL_TEST_GRACE", "2")),
        lease_duration=float(os.environ.get("TASKMILL_TEST_LEASE", "60")),
        poll_interval=float(os.environ.get("TASKMILL_TEST_POLL", "1")),
    )
    manager.register(StepTask)
    manager.register(RetriedStepTask)
    manager.register(BackoffStepTask)
    manager.database.create_schema()
    create_ledger(manager.database)
    return manager


def pretend_other_machine(host: str, clock_skew: float) -> None:
    """Make this process look like a runner on another machine with a wrong clock.

    Its runner ids name ``host``, so no other runner can check whether its
    process is alive, and leases alone decide. Every clock reading of
    taskmill's own is ``clock_skew`` seconds off.
    """
    runners._HOST_KEY = host
    true_utcnow = models.utcnow

    def skewed_utcnow() -> dt.datetime:
        return true_utcnow() + dt.timedelta(seconds=clock_skew)

    for name, module in list(sys.modules.items()):
        if (
            name.startswith("taskmill")
            and getattr(module, "utcnow", None) is true_utcnow
        ):
            module.utcnow = skewed_utcnow  # type: ignore[attr-defined]


def main() -> None:
    host = os.environ.get("TASKMILL_TEST_HOST")
    if host:
        skew = float(os.environ.get("TASKMILL_TEST_CLOCK_SKEW", "0"))
        pretend_other_machine(host, skew)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    manager = build_manager()
    manager.startup()
    print(f"runner {manager.runner_id} ready", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        manager.shutdown()


class RunnerProcess:
    """``python -m tests.runner_process`` in its own session, logging to a file."""

    def __init__(self, database_url: str, log_path: Path, env: dict[str, str]) -> None:
        self.database_url = database_url
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, wait: bool = True, timeout: float = 20.0) -> None:
        """Start the process; with ``wait``, return once its manager has started."""
        env = {**os.environ, **self.env, "TASKMILL_DATABASE_URL": self.database_url}
        command = [sys.executable, "-m", "tests.runner_process"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.process.poll() is not None:
                raise AssertionError(f"Runner exited; log:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"Runner not ready in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def runner_prefix(self) -> str:
        """Return the ``host:pid:`` start of this process's runner id."""
        return f":{self.pid}:"

    def is_ready(self) -> bool:
        pattern = rf"^runner \S*{re.escape(self.runner_prefix())}\S+ ready$"
        return re.search(pattern, self.log(), re.MULTILINE) is not None

    def owns(self, owner: str | None) -> bool:
        """Tell whether a task's ``owner`` column names a runner of this process."""
        return owner is not None and self.runner_prefix() in owner

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill9(self) -> None:
        """SIGKILL the process and reap it at once.

        A killed child stays a zombie until its parent reaps it, and
        ``kill(pid, 0)`` still succeeds on a zombie, so other runners would
        take it for alive.
        """
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def term(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill the process if it still runs (SIGCONT first, in case it is stopped)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGCONT)
        self.process.kill()
        self.process.wait(timeout=10)

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")


if __name__ == "__main__":
    main()
