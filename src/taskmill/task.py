"""``BaseTask``: the class that users subclass to define a kind of task."""

from __future__ import annotations

import abc
import asyncio
import math
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from taskmill.retry import Retry

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.orm import Session

    from taskmill.database import Database
    from taskmill.schemas import TaskInfo


class NoParams(BaseModel):
    """The params model of a task type that takes none."""

    model_config = ConfigDict(extra="forbid")


P = TypeVar("P", bound=BaseModel)


class _Runtime(Protocol):
    """The manager's side of a run, which a task instance calls while it runs."""

    @property
    def database(self) -> Database: ...
    def report_progress(self, percent: float, message: str | None) -> None: ...
    def save_checkpoint(
        self, state: Any, effects: Callable[[Session], object] | None
    ) -> None: ...
    def sleep(self, seconds: float) -> None: ...
    def act(self, action: str) -> TaskInfo: ...


class BaseTask(abc.ABC, Generic[P]):
    """A kind of background task: subclass it, then register it with a manager.

    The manager creates one instance per run and calls ``pre()``, ``run()`` and
    ``post()`` in turn. Each hook may be a plain method, which runs on a worker
    thread, or ``async def``, which runs on the manager's event loop. The
    return value of ``run()`` is the task's result and must be JSON.

    Inside a hook, ``set_progress()``, ``checkpoint()`` and ``sleep()`` are
    where a pending pause or stop takes effect: they raise a control signal (a
    ``BaseException``) that unwinds the hooks. Do not catch it.
    """

    #: The name the task type is registered, created and listed under.
    name: ClassVar[str]
    #: The pydantic model that validates the params of a new task.
    params_model: ClassVar[type[BaseModel]] = NoParams
    #: False when a run that was interrupted by a crash must not run again:
    #: it then ends FAILED instead of resuming from its checkpoint.
    resumable: ClassVar[bool] = True
    #: How many runs may fail (raise, or die with their process) and which
    #: exceptions are retried, after what backoff.
    retry: ClassVar[Retry] = Retry()
    #: The maximum time a run may take, in seconds, or None for no limit. A run past
    #: it ends FAILED at its next checkpoint, progress report or ``sleep()``
    #: (an ``async`` hook is cancelled at once).
    timeout: ClassVar[float | None] = None

    def __init__(
        self, *, task_id: str, params: P, state: Any, runtime: _Runtime
    ) -> None:
        self.task_id = task_id
        self.params = params
        #: The last checkpoint this run resumes from, or None on a fresh run.
        self.state = state
        #: What ``run()`` returned; set before ``post()`` is called.
        self.result: Any = None
        self._runtime = runtime

    @abc.abstractmethod
    def pre(self) -> Any:
        """Prepare the run: check inputs, open what ``run()`` needs."""

    @abc.abstractmethod
    def run(self) -> Any:
        """Do the work and return the result (a JSON value)."""

    @abc.abstractmethod
    def post(self) -> Any:
        """Clean up after ``run()`` returned; ``self.result`` contains its value."""

    @property
    def database(self) -> Database:
        """The manager's database, for tasks that read or write their own rows.

        Open a session per unit of work with ``database.read()`` or
        ``database.write()``; never keep one across checkpoints.
        """
        return self._runtime.database

    def set_progress(
        self, value: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Report progress: ``value`` percent, or ``value`` of ``total`` units.

        Cheap enough to call for every item: it updates memory, and the manager
        writes it to the database at a bounded rate.
        """
        if total is None:
            percent = value
        else:
            percent = 100.0 * value / total if total else 100.0
        if not math.isfinite(percent):
            raise ValueError(f"Progress must be a finite number, got {percent!r}.")
        self._runtime.report_progress(min(100.0, max(0.0, percent)), message)

    def checkpoint(
        self, state: Any, *, effects: Callable[[Session], object] | None = None
    ) -> None:
        """Save ``state`` (a JSON value) durably so that a later run resumes from it.

        ``effects``, if given, is called with the session of the checkpoint's
        transaction. The rows it writes commit together with the checkpoint, so
        a resumed run, which starts from the checkpoint, does not write them
        again. Returns once the transaction has committed.
        """
        self._runtime.save_checkpoint(state, effects)
        self.state = state

    async def checkpoint_async(
        self, state: Any, *, effects: Callable[[Session], object] | None = None
    ) -> None:
        """Save ``state`` like ``checkpoint()``, without blocking the event loop.

        For ``async`` hooks: the write runs on the manager's database thread,
        so other async tasks go on while it waits for the database's lock.
        """
        await asyncio.to_thread(self._runtime.save_checkpoint, state, effects)
        self.state = state

    def sleep(self, seconds: float) -> None:
        """Sleep in a plain hook, waking early when a stop or pause is requested.

        A pending stop or pause then takes effect here, as at a checkpoint.
        """
        self._runtime.sleep(seconds)

    def start(self) -> TaskInfo:
        """Run this task if it is held or paused."""
        return self._runtime.act("start")

    def pause(self) -> TaskInfo:
        """Ask this task to pause at its next checkpoint."""
        return self._runtime.act("pause")

    def stop(self) -> TaskInfo:
        """Ask this task to stop at its next checkpoint."""
        return self._runtime.act("stop")

    def restart(self) -> TaskInfo:
        """Run this task again from the start once it has ended."""
        return self._runtime.act("restart")
