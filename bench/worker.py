"""A TaskManager in a child process, for benchmarks that act on it from outside.

Run as a script, it starts a manager on a database, registers the given task
classes and prints ``ready`` on stdout once ``startup()`` has returned::

    python bench/worker.py sqlite:////tmp/x/bench.db bench.pause:Ticker \\
        --max-workers 1 --progress-interval 0.05 --poll-interval 0.05

It shuts the manager down when its standard input reaches end of file or it
receives SIGTERM. ``worker_process()`` starts it and stops it again.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from taskmill import BaseTask, TaskManager

#: The line the worker prints once its manager has started.
READY = b"ready\n"


@contextmanager
def worker_process(
    database_url: str,
    task_classes: Sequence[str],
    *,
    log_path: Path,
    max_workers: int = 1,
    progress_interval: float = 0.5,
    poll_interval: float = 1.0,
    startup_timeout: float = 30.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a worker, wait until it is ready, and stop it when the block ends.

    ``task_classes`` are ``module:ClassName`` strings that the child imports.
    The child's stderr (its log) goes to ``log_path``.
    """
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        database_url,
        *task_classes,
        f"--max-workers={max_workers}",
        f"--progress-interval={progress_interval}",
        f"--poll-interval={poll_interval}",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
    try:
        _wait_until_ready(process, startup_timeout, log_path)
        yield process
    finally:
        _stop(process)


def _wait_until_ready(
    process: subprocess.Popen[bytes], timeout: float, log_path: Path
) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"The worker process did not start within {timeout} s; "
                f"its log is {log_path}:\n{_tail(log_path)}"
            )
        readable, _, _ = select.select([process.stdout], [], [], remaining)
        if not readable:
            continue
        line = process.stdout.readline()
        if line == READY:
            return
        if not line:
            process.wait(timeout=5)
            raise RuntimeError(
                f"The worker process exited with code {process.returncode} "
                f"before it was ready; its log is {log_path}:\n{_tail(log_path)}"
            )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Close the worker's stdin so that it shuts down; kill it if it hangs."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
    if process.stdout is not None:
        process.stdout.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read the log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _load_task_class(spec: str) -> type[BaseTask[Any]]:
    # Run as a script, Python puts bench/ on the path, not the repository
    # root that contains the ``bench`` package.
    repo_root = str(Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"Invalid task class {spec!r}; expected 'module:ClassName'.")
    task_class: type[BaseTask[Any]] = getattr(
        importlib.import_module(module_name), class_name
    )
    return task_class


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwinds the main thread out of its read of stdin, so that the
    # ``finally`` in main() shuts the manager down.
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", help="SQLAlchemy URL of the database")
    parser.add_argument(
        "task_classes", nargs="+", help="task classes to register, as module:Class"
    )
    parser.add_argument(
        "--max-workers", type=int, default=1, help="tasks that run at once (1)"
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=0.5,
        help="seconds between writes of reported progress (0.5)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="seconds between looks for PENDING tasks of other processes (1)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )

    manager = TaskManager(
        args.database,
        max_workers=args.max_workers,
        progress_interval=args.progress_interval,
        poll_interval=args.poll_interval,
    )
    for spec in args.task_classes:
        manager.register(_load_task_class(spec))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    manager.startup()
    try:
        sys.stdout.buffer.write(READY)
        sys.stdout.flush()
        # Returns at end of file, when the parent closes the pipe.
        sys.stdin.buffer.read()
    finally:
        manager.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
