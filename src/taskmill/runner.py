"""One run of one task: call the hooks, serve the task's calls, record the outcome."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import inspect
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from taskmill import crud
from taskmill._json import clean_text, to_json_value
from taskmill.database import is_transient
from taskmill.exceptions import (
    CheckpointTooLarge,
    DatabaseUnavailable,
    PauseRequested,
    ResultTooLarge,
    RunTakenBack,
    StopRequested,
    SuspendRequested,
    TimeLimitExceeded,
    _ControlSignal,
)
from taskmill.outcome import (
    Outcome,
    error_record,
    failed,
    finished,
    on_request,
    retry_later,
)
from taskmill.schemas import TaskInfo
from taskmill.status import ControlRequest, TaskStatus
from taskmill.task import BaseTask

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from taskmill.database import Database
    from taskmill.manager import TaskManager

logger = logging.getLogger(__name__)


class RunnerRequest(enum.Enum):
    """A request that the manager itself sends to a run, kept in memory only."""

    #: The manager shuts down: the run goes back to PENDING.
    SUSPEND = "SUSPEND"
    #: The run exceeded its task type's ``timeout``: it ends FAILED.
    TIME_OUT = "TIME_OUT"


#: A request a run honours: a stored pause or stop, or one from the manager.
Request = ControlRequest | RunnerRequest


@dataclass(eq=False)
class LiveTask:
    """A task that is not finished, as this process tracks it."""

    task_id: str
    name: str
    #: A pause, stop or suspend that the current run must honour.
    request: Request | None = None
    run: Run | None = None
    queued: bool = False
    #: Set between leaving the queue and the end of the claim, so that a poll
    #: does not queue the task again while its claim is under way.
    claiming: bool = False
    #: Set when the task ended (stopped) while the end of its last run was
    #: still to be handled, so that handling it drops the entry.
    ended: bool = False


@dataclass(eq=False)
class Run:
    """The state of one run while its hooks execute."""

    manager: TaskManager
    live: LiveTask
    task_class: type[BaseTask[Any]]
    token: crud.RunToken
    progress: float
    message: str | None
    #: Failed runs of the task before this one; see ``Retry``.
    failures: int = 0
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
    #: An outcome that the database failed to store; the manager retries it.
    unrecorded: Outcome | None = None
    #: When a run that ended in a retry backoff may run again.
    run_after: dt.datetime | None = None
    #: Set once the outcome is written, or known to be no longer this run's to write.
    settled: bool = False

    @property
    def task_id(self) -> str:
        return self.live.task_id

    @property
    def database(self) -> Database:
        return self.manager.database

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

    def save_checkpoint(
        self, state: Any, effects: Callable[[Session], object] | None = None
    ) -> None:
        state = to_json_value(
            state,
            "The checkpoint state",
            max_bytes=self.manager.max_checkpoint_bytes,
            too_large=CheckpointTooLarge,
        )
        try:
            with self.write_lock, self.database.write() as session:
                # The ownership check comes first, so that a run that lost its
                # task stops here rather than in a constraint of its effects.
                control = crud.save_checkpoint(
                    session,
                    self.task_id,
                    self.token,
                    checkpoint=state,
                    progress=self.progress,
                    message=self.message,
                )
                if effects is not None:
                    effects(session)
                self.dirty = False
        except crud.RunLost:
            raise RunTakenBack("at a checkpoint") from None
        except SQLAlchemyError as exc:
            if not is_transient(exc):
                raise
            # Not the task's fault: the run goes back to PENDING and resumes
            # from its last checkpoint once the database is back.
            logger.warning(
                "Task %s (%s): a checkpoint failed (%s); the run is suspended",
                self.task_id,
                self.live.name,
                exc.orig if isinstance(exc, DBAPIError) else exc,
                extra=self._log_extra("task.checkpoint_failed"),
            )
            reason = f"the database did not accept a checkpoint ({type(exc).__name__})"
            raise DatabaseUnavailable(reason) from exc
        if control is not None and self.live.request is None:
            self.live.request = control
        self.raise_if_requested("at a checkpoint")

    def sleep(self, seconds: float) -> None:
        if self.task is not None and _on_loop(self.task):
            raise RuntimeError(
                "BaseTask.sleep() blocks, and this hook runs on the manager's event "
                "loop; use `await asyncio.sleep(...)` in async hooks."
            )
        self.wakeup.wait(seconds)
        self.raise_if_requested("in sleep()")

    def act(self, action: str) -> TaskInfo:
        return self.manager.act(self.task_id, action)

    def raise_if_requested(self, where: str) -> None:
        """Unwind the hooks if a request is pending; ``where`` goes into the history.

        Once ``run()`` has returned, ``post()`` only cleans up: requests no
        longer unwind it, and the task finishes.
        """
        request = self.live.request
        if request is None or self.phase == "post":
            return
        if request == ControlRequest.PAUSE:
            raise PauseRequested(where)
        if request == ControlRequest.STOP:
            raise StopRequested(where)
        if request == RunnerRequest.TIME_OUT:
            raise self._time_limit_exceeded(where)
        raise SuspendRequested(where)

    def _time_limit_exceeded(self, where: str) -> TimeLimitExceeded:
        limit = self.task_class.timeout
        return TimeLimitExceeded(
            f"the run exceeded its time limit of {limit:g} s "
            f"(timeout on {self.task_class.__name__}); it ended {where}"
        )

    # -- called by the manager --

    def wake(self) -> None:
        """Tell the run that a request arrived; cancel an async hook on stop."""
        self.wakeup.set()
        stopping = self.live.request in _CANCELLING
        if self.task is not None and stopping:
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
            with self.database.write() as session:
                crud.save_progress(
                    session, [(self.task_id, self.token, self.progress, self.message)]
                )
        finally:
            self.write_lock.release()

    async def execute(
        self, row_params: dict[str, Any], state: Any
    ) -> TaskStatus | None:
        """Call the hooks and record the outcome; return the status the run ended in.

        None means that no outcome was stored: the task was taken back, or the
        database failed and ``unrecorded`` contains the outcome to retry.
        """
        self.task = asyncio.current_task()
        outcome = await self._call_hooks(row_params, state)
        if outcome is None:
            return None
        # Written on the manager's database thread, together with the claims
        # and outcomes of other runs that are waiting by then.
        return await self.manager._store_outcome(self, outcome)

    async def _call_hooks(
        self, row_params: dict[str, Any], state: Any
    ) -> Outcome | None:
        try:
            # JSON mode, as the params were stored: a UUID or a date in the
            # stored JSON validates back even when the model is strict.
            params = self.task_class.params_model.model_validate_json(
                json.dumps(row_params)
            )
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
                    lambda: self._call_hooks_sync(instance)
                )
                if error is not None:
                    return self._settle(error)
        except asyncio.CancelledError as exc:
            return self._settle_cancelled(exc)
        except BaseException as exc:
            return self._settle(exc)
        return finished(result)

    def _settle(self, exc: BaseException) -> Outcome | None:
        """Return the outcome of a run whose hooks raised: on request, retry, or FAILED."""
        if isinstance(exc, RunTakenBack):
            self._log_taken_back()
            return None
        if isinstance(exc, _ControlSignal) and not isinstance(exc, TimeLimitExceeded):
            return on_request(exc, self.progress, self.message)
        error = error_record(exc, self.phase)
        failures = self.failures + 1
        policy = self.task_class.retry
        if policy.retries(exc) and failures < policy.max_attempts:
            delay = policy.delay(failures)
            logger.warning(
                "Task %s (%s) failed in %s(): %s: %s; retry %d of %d in %.1f s",
                self.task_id,
                self.live.name,
                self.phase,
                error["type"],
                error["message"],
                failures,
                policy.max_attempts - 1,
                delay,
                exc_info=exc,
                extra=self._log_extra("task.retry_scheduled"),
            )
            return retry_later(
                error,
                failures=failures,
                max_attempts=policy.max_attempts,
                delay=delay,
                progress=self.progress,
                message=self.message,
            )
        logger.error(
            "Task %s (%s) failed in %s(): %s: %s",
            self.task_id,
            self.live.name,
            self.phase,
            error["type"],
            error["message"],
            exc_info=exc,
            extra=self._log_extra("task.failed"),
        )
        result = self.result if self.phase == "post" else None
        outcome = failed(error, self.progress, self.message, result)
        if policy.retries(exc):
            reason = f"{outcome.reason}; no attempts left ({failures} of {policy.max_attempts})"
            outcome = Outcome(outcome.status, reason, outcome.values)
        outcome.values["failures"] = failures
        return outcome

    def _settle_cancelled(self, exc: asyncio.CancelledError) -> Outcome | None:
        if self.abandoned:
            return None
        where = "at an await in an async hook"
        if self.live.request == ControlRequest.STOP:
            return self._settle(StopRequested(where))
        if self.live.request == RunnerRequest.SUSPEND or not self.manager.is_running:
            # Cancelled by a shutdown, whether or not the request reached it.
            return self._settle(SuspendRequested(where))
        if self.live.request == RunnerRequest.TIME_OUT:
            return self._settle(self._time_limit_exceeded(where))
        # The manager did not cancel the run, so the task's own code raised it.
        return self._settle(exc)

    def _call_hooks_sync(self, instance: BaseTask[Any]) -> Any:
        instance.pre()
        self.phase = "run"
        result = instance.run()
        self._accept_result(instance, result)
        instance.post()
        return self.result

    async def _call_hooks_async(self, instance: BaseTask[Any]) -> Any:
        await self._call(instance.pre)
        self.phase = "run"
        self.raise_if_requested("before run()")
        result = await self._call(instance.run)
        self._accept_result(instance, result)
        await self._call(instance.post)
        return self.result

    def _accept_result(self, instance: BaseTask[Any], result: Any) -> None:
        """Check what ``run()`` returned before ``post()`` is called."""
        if self.live.request == ControlRequest.STOP:
            raise StopRequested("after run() returned")
        if self.live.request == RunnerRequest.TIME_OUT:
            # A run that reached no checkpoint past its limit still fails.
            raise self._time_limit_exceeded("after run() returned")
        self.result = to_json_value(
            result,
            "The result",
            max_bytes=self.manager.max_result_bytes,
            too_large=ResultTooLarge,
        )
        instance.result = result
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

    # -- recording the outcome, on a thread other than the loop --

    def suspend(self, reason: str) -> TaskStatus | None:
        """Put the task back to PENDING for a run that its hooks cannot end.

        The hook is still running and dies with the process, so this counts
        as an interrupted run in ``recoveries``, but not as a failure.
        """
        values = {
            "owner": None,
            "control": None,
            "progress": self.progress,
            "recoveries": crud.TaskRow.recoveries + 1,
        }
        return self.record(Outcome(TaskStatus.PENDING, reason, values))

    def retry_outcome(self) -> TaskStatus | None:
        """Write the unrecorded outcome again; return its status once stored."""
        if self.unrecorded is None:
            return None
        return self.record(self.unrecorded)

    def record(self, outcome: Outcome) -> TaskStatus | None:
        """Store the outcome; return the status written, or None if it was not.

        When the database is unavailable, the outcome is kept in
        ``unrecorded`` and the manager writes it again later, so the task does
        not stay RUNNING. An outcome that the database rejects for another
        reason is replaced by a FAILED one that gives the reason.
        """
        try:
            with self.write_lock, self.database.write() as session:
                status = self.write_outcome(session, outcome)
        except crud.RunLost:
            self.lost()
            return None
        except SQLAlchemyError as exc:
            if is_transient(exc):
                self.defer(outcome, exc)
                return None
            if (
                outcome.status == TaskStatus.FAILED
                and outcome.values["error"]["phase"] == "record"
            ):
                logger.exception(
                    "Task %s (%s): its outcome cannot be stored; it stays RUNNING "
                    "until the next startup recovers it",
                    self.task_id,
                    self.live.name,
                    extra=self._log_extra("task.outcome_lost"),
                )
                self.unrecorded = None
                return None
            error = error_record(exc, "record")
            logger.error(
                "Task %s (%s): storing its outcome %s failed: %s",
                self.task_id,
                self.live.name,
                outcome.status,
                error["message"],
                exc_info=exc,
                extra=self._log_extra("task.failed"),
            )
            return self.record(failed(error, self.progress, self.message))
        return self.recorded(outcome, status)

    def write_outcome(self, session: Session, outcome: Outcome) -> TaskStatus:
        """Write ``outcome`` in the caller's transaction; return the status written.

        A pause or stop stored meanwhile takes the place of a retry backoff or
        a suspension. Raises ``crud.RunLost``, before writing anything, when
        the run no longer owns its task.
        """
        if not outcome.status.is_terminal:
            outcome = outcome.honouring(crud.get_task(session, self.task_id).control)
        crud.end_run(
            session,
            self.task_id,
            self.token,
            outcome.status,
            reason=outcome.reason,
            values=outcome.values,
        )
        return outcome.status

    def recorded(self, outcome: Outcome, status: TaskStatus) -> TaskStatus:
        """Log ``outcome``, committed as ``status``, and mark the run settled."""
        self.unrecorded = None
        self.settled = True
        self.run_after = outcome.values.get("run_after")
        logger.info(
            "Task %s (%s) is %s: %s",
            self.task_id,
            self.live.name,
            status,
            outcome.reason,
            extra=self._log_extra(f"task.{status.lower()}"),
        )
        return status

    def lost(self) -> None:
        """Log that the run lost its task, and mark it settled without an outcome."""
        self._log_taken_back()
        self.unrecorded = None
        self.settled = True

    def defer(self, outcome: Outcome, exc: SQLAlchemyError) -> None:
        """Keep ``outcome`` for the manager to write again once the database is back."""
        if self.unrecorded is None:
            logger.warning(
                "Task %s (%s): storing its outcome %s failed (%s); "
                "retrying until the database accepts it",
                self.task_id,
                self.live.name,
                outcome.status,
                exc,
                extra=self._log_extra("task.outcome_deferred"),
            )
        self.unrecorded = outcome

    def _log_taken_back(self) -> None:
        logger.warning(
            "Task %s (%s) was taken back from this run by another runner or a "
            "shutdown; the run ends without recording an outcome",
            self.task_id,
            self.live.name,
            extra=self._log_extra("run.lost"),
        )

    def _log_extra(self, event: str) -> dict[str, Any]:
        return {"event": event, "task_id": self.task_id, "task_name": self.live.name}


#: Requests that cancel an async hook at once rather than at its next checkpoint.
_CANCELLING = (ControlRequest.STOP, RunnerRequest.SUSPEND, RunnerRequest.TIME_OUT)


def _on_loop(task: asyncio.Task[Any]) -> bool:
    try:
        return asyncio.get_running_loop() is task.get_loop()
    except RuntimeError:
        return False


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
