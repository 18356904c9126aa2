"""One run of one task: claim, call the hooks, and record how it ended."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from taskmill import crud
from taskmill.exceptions import (
    PauseRequested,
    RunTakenBack,
    StopRequested,
    SuspendRequested,
    _ControlSignal,
)
from taskmill.models import utcnow
from taskmill.schemas import TaskInfo
from taskmill.status import ControlRequest, TaskStatus
from taskmill.task import BaseTask

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from taskmill.database import Database
    from taskmill.manager import TaskManager

logger = logging.getLogger(__name__)

#: The in-memory request that a manager shutting down sends to its runs.
SUSPEND = "SUSPEND"


@dataclass(eq=False)
class LiveTask:
    """A task that is not finished, as this process tracks it."""

    task_id: str
    name: str
    #: A pause, stop or suspend that the current run must honour.
    request: ControlRequest | str | None = None
    run: Run | None = None
    queued: bool = False


@dataclass(eq=False)
class Run:
    """The state of one run while its hooks execute."""

    manager: TaskManager
    live: LiveTask
    task_class: type[BaseTask[Any]]
    token: crud.RunToken
    progress: float
    message: str | None
    #: The progress stored when the run started; see ``report_progress()``.
    progress_floor: float = 0.0
    #: Set when progress changed since it was last written.
    dirty: bool = False
    #: Set by the manager when it took the task back (shutdown past its grace).
    abandoned: bool = False
    #: Serialises this run's writes, so an older progress never lands last.
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    wakeup: threading.Event = field(default_factory=threading.Event)
    #: The asyncio task of ``execute()``, cancelled to stop an async hook at once.
    task: asyncio.Task[Any] | None = None
    in_async_hook: bool = False
    #: The hook being called: ``pre``, ``run`` or ``post``.
    phase: str = "pre"
    #: What ``run()`` returned, once it has.
    result: Any = None
    #: An outcome (status, reason, values) that the database failed to store.
    unrecorded: tuple[TaskStatus, str, dict[str, Any]] | None = None

    @property
    def task_id(self) -> str:
        return self.live.task_id

    # -- called by the task, from a hook thread or the manager's loop --

    def report_progress(self, percent: float, message: str | None) -> None:
        # A resumed run redoes the work since its last checkpoint, so it reports
        # less than was already shown. Keep the stored value until the run
        # passes it; from then on, every report is taken as it is.
        if percent >= self.progress_floor:
            self.progress_floor = 0.0
            self.progress = percent
        if message is not None:
            self.message = clean_text(message)
        self.dirty = True
        self.raise_if_requested("at a progress report")

    @property
    def database(self) -> Database:
        return self.manager.database

    def save_checkpoint(
        self, state: Any, effects: Callable[[Session], object] | None = None
    ) -> None:
        check_json(state, "Checkpoint state")
        with self.write_lock, self.manager.database.write() as session:
            if effects is not None:
                effects(session)
            try:
                control = crud.save_checkpoint(
                    session,
                    self.task_id,
                    self.token,
                    checkpoint=state,
                    progress=self.progress,
                    message=self.message,
                )
            except crud.RunLost:
                raise RunTakenBack("at a checkpoint") from None
            self.dirty = False
        if control is not None and self.live.request is None:
            self.live.request = control
        self.raise_if_requested("at a checkpoint")

    def sleep(self, seconds: float) -> None:
        self.wakeup.wait(seconds)
        self.raise_if_requested("in sleep()")

    def act(self, action: str) -> TaskInfo:
        return self.manager.act(self.task_id, action)

    def raise_if_requested(self, where: str) -> None:
        """Unwind the hooks if a request is pending; ``where`` goes into the history."""
        request = self.live.request
        if request == ControlRequest.PAUSE:
            raise PauseRequested(where)
        if request == ControlRequest.STOP:
            raise StopRequested(where)
        if request == SUSPEND:
            raise SuspendRequested(where)

    # -- called by the manager --

    def wake(self) -> None:
        """Tell the run that a request arrived; cancel an async hook on stop."""
        self.wakeup.set()
        if self.task is not None and self.live.request in (
            ControlRequest.STOP,
            SUSPEND,
        ):
            self.task.get_loop().call_soon_threadsafe(self._cancel_async_hook)

    def _cancel_async_hook(self) -> None:
        # Runs on the loop, where in_async_hook changes, so it cannot cancel
        # the wait for a plain hook that runs on a thread.
        if self.in_async_hook and self.task is not None:
            self.task.cancel()

    def flush_progress(self) -> None:
        """Write the latest progress if it changed; skip if a write is under way."""
        if not self.dirty or not self.write_lock.acquire(blocking=False):
            return
        try:
            self.dirty = False
            with self.manager.database.write() as session:
                crud.save_progress(
                    session, [(self.task_id, self.token, self.progress, self.message)]
                )
        finally:
            self.write_lock.release()

    async def execute(
        self, row_params: dict[str, Any], state: Any
    ) -> TaskStatus | None:
        """Call the hooks and record the outcome; return the status the run ended in."""
        self.task = asyncio.current_task()
        try:
            params = self.task_class.params_model.model_validate(row_params)
            instance = self.task_class(
                task_id=self.task_id, params=params, state=state, runtime=self
            )
            self.raise_if_requested("before the hooks ran")
            hooks = (instance.pre, instance.run, instance.post)
            if any(inspect.iscoroutinefunction(hook) for hook in hooks):
                result = await self._call_hooks_async(instance)
            else:
                # One thread for the three hooks: a thread start costs more
                # than a short task's whole run.
                result, error = await _in_daemon_thread(
                    lambda: self._call_hooks(instance)
                )
                if error is not None:
                    return self._settle(error)
        except asyncio.CancelledError as exc:
            return self._settle_cancelled(exc)
        except BaseException as exc:
            return self._settle(exc)
        return self._finish(result)

    def _settle(self, exc: BaseException) -> TaskStatus | None:
        """Record how a run that raised ends: on request, or FAILED."""
        if isinstance(exc, _ControlSignal):
            return self._end_on_request(exc)
        keep = {"result": self.result} if self.phase == "post" else {}
        return self._fail(exc, self.phase, keep)

    def _settle_cancelled(self, exc: asyncio.CancelledError) -> TaskStatus | None:
        if self.abandoned:
            return None
        where = "at an await in an async hook"
        if self.live.request == ControlRequest.STOP:
            return self._end_on_request(StopRequested(where))
        if self.live.request == SUSPEND:
            return self._end_on_request(SuspendRequested(where))
        # Nobody cancelled the run: the task's own code raised it.
        return self._settle(exc)

    def _call_hooks(self, instance: BaseTask[Any]) -> Any:
        instance.pre()
        self.phase = "run"
        result = instance.run()
        self._accept_result(instance, result)
        instance.post()
        return result

    async def _call_hooks_async(self, instance: BaseTask[Any]) -> Any:
        await self._call(instance.pre)
        self.phase = "run"
        result = await self._call(instance.run)
        self._accept_result(instance, result)
        await self._call(instance.post)
        return result

    def _accept_result(self, instance: BaseTask[Any], result: Any) -> None:
        """Check what ``run()`` returned before ``post()`` is called."""
        if self.live.request == ControlRequest.STOP:
            raise StopRequested("after run() returned")
        check_json(result, "The result")
        instance.result = self.result = result
        self.phase = "post"

    async def _call(self, hook: Callable[[], Any]) -> Any:
        if inspect.iscoroutinefunction(hook):
            self.in_async_hook = True
            try:
                return await hook()
            finally:
                self.in_async_hook = False
        result, error = await _in_daemon_thread(hook)
        if error is not None:
            raise error
        return result

    # -- outcomes --

    def _finish(self, result: Any) -> TaskStatus | None:
        values = {
            "result": result,
            "progress": 100.0,
            "checkpoint": None,
            "finished_at": utcnow(),
            "control": None,
        }
        return self._end(TaskStatus.FINISHED, "finished", values)

    def _fail(
        self, exc: BaseException, phase: str, values: dict[str, Any]
    ) -> TaskStatus | None:
        error = error_record(exc, phase)
        logger.error(
            "Task %s (%s) failed in %s(): %s: %s",
            self.task_id,
            self.live.name,
            phase,
            error["type"],
            error["message"],
            exc_info=exc,
            extra={
                "event": "task.failed",
                "task_id": self.task_id,
                "task_name": self.live.name,
            },
        )
        values |= {
            "error": error,
            "progress": self.progress,
            "message": self.message,
            "finished_at": utcnow(),
            "control": None,
        }
        return self._end(
            TaskStatus.FAILED, f"failed in {phase}(): {type(exc).__name__}", values
        )

    def _end_on_request(self, signal: _ControlSignal) -> TaskStatus | None:
        where = str(signal.args[0]) if signal.args else "during the run"
        if isinstance(signal, RunTakenBack):
            self._log_taken_back()
            return None
        base: dict[str, Any] = {
            "progress": self.progress,
            "message": self.message,
            "control": None,
        }
        if isinstance(signal, PauseRequested):
            values = base | {"owner": None}
            return self._end(TaskStatus.PAUSED, f"paused {where}", values)
        if isinstance(signal, StopRequested):
            values = base | {"finished_at": utcnow(), "checkpoint": None}
            return self._end(TaskStatus.STOPPED, f"stopped by request {where}", values)
        reason = (
            f"suspended {where} because the runner shut down; "
            "resumes from its last checkpoint"
        )
        return self._end(TaskStatus.PENDING, reason, base | {"owner": None})

    def suspend(self, reason: str) -> TaskStatus | None:
        """Put the task back to PENDING for a run that its hooks cannot end."""
        values = {"owner": None, "control": None, "progress": self.progress}
        return self._end(TaskStatus.PENDING, reason, values)

    def retry_outcome(self) -> TaskStatus | None:
        """Write the unrecorded outcome again; return its status once stored."""
        if self.unrecorded is None:
            return None
        return self._end(*self.unrecorded)

    def _log_taken_back(self) -> None:
        logger.warning(
            "Task %s (%s) was taken back from this run by another runner or a "
            "shutdown; the run ends without recording an outcome",
            self.task_id,
            self.live.name,
            extra={"event": "run.lost", "task_id": self.task_id},
        )

    def _end(
        self, status: TaskStatus, reason: str, values: dict[str, Any]
    ) -> TaskStatus | None:
        """Record the outcome; return the status written, or None if it was not.

        When the database fails, the outcome is kept in ``unrecorded`` and the
        manager writes it again later, so the task does not stay RUNNING.
        """
        try:
            with self.write_lock, self.manager.database.write() as session:
                if not status.is_terminal:
                    control = crud.get_task(session, self.task_id).control
                    status, reason, values = honour_request(
                        control, status, reason, values
                    )
                crud.change_status(
                    session,
                    self.task_id,
                    status,
                    reason=reason,
                    run=self.token,
                    values=values,
                )
        except crud.RunLost:
            self._log_taken_back()
            self.unrecorded = None
            return None
        except SQLAlchemyError as exc:
            if self.unrecorded is None:
                logger.warning(
                    "Task %s (%s): recording its outcome %s failed (%s); "
                    "retrying until the database accepts it",
                    self.task_id,
                    self.live.name,
                    status,
                    exc,
                    extra={"event": "task.outcome_deferred", "task_id": self.task_id},
                )
            self.unrecorded = (status, reason, values)
            return None
        self.unrecorded = None
        logger.info(
            "Task %s (%s) is %s: %s",
            self.task_id,
            self.live.name,
            status,
            reason,
            extra={"event": f"task.{status.lower()}", "task_id": self.task_id},
        )
        return status


def honour_request(
    control: ControlRequest | None,
    status: TaskStatus,
    reason: str,
    values: dict[str, Any],
) -> tuple[TaskStatus, str, dict[str, Any]]:
    """Let a stored stop or pause request decide where an unfinished run goes.

    A run that ends PAUSED may have received a stop after the pause it honoured.
    A run that goes back to PENDING at shutdown honoured no request at all.
    In both cases the stored request wins, so nothing a user asked for is lost.
    """
    if control == ControlRequest.STOP and status in (
        TaskStatus.PAUSED,
        TaskStatus.PENDING,
    ):
        values = values | {"finished_at": utcnow(), "checkpoint": None, "control": None}
        return TaskStatus.STOPPED, f"{reason}; stopped as requested", values
    if control == ControlRequest.PAUSE and status == TaskStatus.PENDING:
        return (
            TaskStatus.PAUSED,
            f"{reason}; paused as requested",
            values | {"control": None},
        )
    return status, reason, values


def error_record(exc: BaseException, phase: str) -> dict[str, Any]:
    """Describe a failure as the JSON stored in the task's ``error``."""
    return {
        "type": type(exc).__name__,
        "message": clean_text(_message_of(exc)),
        "traceback": clean_text("".join(traceback.format_exception(exc))),
        "phase": phase,
    }


def _message_of(exc: BaseException) -> str:
    # A task's exception may have a broken __str__; raising here would leave
    # the task RUNNING with no outcome recorded.
    try:
        return str(exc)
    except Exception as str_error:
        return f"<str() of the exception raised {type(str_error).__name__}>"


def clean_text(text: str) -> str:
    """Escape unpaired surrogates, which no database or JSON response can encode.

    ``os.fsdecode()`` makes them of file names that are not UTF-8; other text
    is returned unchanged.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_json(value: Any, label: str) -> None:
    """Raise TypeError unless ``value`` can be stored and returned as JSON."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TypeError(
            f"{label} contains text with an unpaired surrogate ({exc.reason}); "
            "decode bytes with errors='backslashreplace' instead of os.fsdecode()"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{label} must be JSON-serializable: {exc}") from exc


async def _in_daemon_thread(
    function: Callable[[], Any],
) -> tuple[Any, BaseException | None]:
    """Call ``function`` on a new daemon thread; return its result and exception.

    The exception is returned, not raised, because asyncio cannot carry some
    of them (``StopIteration``, ``GeneratorExit``) through a future. Daemon
    threads, unlike a ThreadPoolExecutor's, do not hold the process open at
    exit, so a hook stuck in a blocking call cannot stop a shutdown.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[Any, BaseException | None]] = loop.create_future()

    def settle(outcome: tuple[Any, BaseException | None]) -> None:
        if not future.cancelled():
            future.set_result(outcome)

    def target() -> None:
        outcome: tuple[Any, BaseException | None]
        try:
            outcome = (function(), None)
        except BaseException as exc:
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:
            logger.warning("A task hook returned after its manager's loop closed")

    threading.Thread(target=target, name="taskmill-hook", daemon=True).start()
    return await future
