"""A watchdog that notices when an ``async`` hook blocks the manager's event loop.

A blocking call such as ``time.sleep()`` inside ``async def`` stalls every
async task of the manager, and the manager's own upkeep (progress writes,
lease renewals). The watchdog cannot end the call, but it names the task and
the line, logs a warning, and writes it into the task's history.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from taskmill.task import BaseTask

logger = logging.getLogger(__name__)

#: Seconds between two probes of the loop.
PROBE_INTERVAL = 0.25


class LoopWatchdog:
    """Probe a loop from a thread of its own; report blocks longer than ``threshold``.

    ``report(task, where, seconds)`` is called on the watchdog's thread once
    per block, when the block is noticed. ``task`` is the task instance whose
    code is on the loop thread's stack, or None if there is none.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: threading.Thread,
        report: Callable[[BaseTask[Any] | None, str, float], None],
        threshold: float = 1.0,
    ) -> None:
        self.loop = loop
        self.loop_thread = loop_thread
        self.report = report
        self.threshold = threshold
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="taskmill-watchdog", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _watch(self) -> None:
        while not self._stop.wait(PROBE_INTERVAL):
            answered = threading.Event()
            try:
                self.loop.call_soon_threadsafe(answered.set)
            except RuntimeError:
                return  # The loop is closed.
            if answered.wait(self.threshold) or self._stop.is_set():
                continue
            task, where = self._find_task()
            try:
                self.report(task, where, self.threshold)
            except Exception:
                logger.exception("Reporting a blocked event loop failed")
            # One report per block: wait until the loop runs the probe again.
            while not answered.wait(PROBE_INTERVAL):
                if self._stop.is_set():
                    return

    def _find_task(self) -> tuple[BaseTask[Any] | None, str]:
        """Return the task whose code the loop thread runs, and where."""
        frame: FrameType | None = sys._current_frames().get(self.loop_thread.ident or 0)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, BaseTask):
                code = frame.f_code
                return owner, f"{code.co_name}() at {code.co_filename}:{frame.f_lineno}"
            frame = frame.f_back
        return None, "outside any task"
