"""``TaskManager``: the registry of task types and live tasks, and their runner."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from taskmill import crud, registry, runners
from taskmill.database import (
    DEFAULT_DATABASE_URL,
    Database,
    is_lock_timeout,
    is_transient,
)
from taskmill.exceptions import (
    InvalidParams,
    InvalidTransition,
    TaskNotFound,
    TaskTypeAlreadyRegistered,
    UnknownTaskType,
)
from taskmill.listener import Listener
from taskmill.models import utcnow
from taskmill.outcome import Outcome, error_record, failed
from taskmill.runner import LiveTask, Request, Run, RunnerRequest
from taskmill.schemas import TaskEventInfo, TaskInfo
from taskmill.status import (
    TERMINAL,
    Action,
    ControlRequest,
    TaskStatus,
    allowed_actions,
)
from taskmill.task import BaseTask
from taskmill.watchdog import LoopWatchdog

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=type[BaseTask[Any]])
R = TypeVar("R")

#: The outcome of a run that waits for the database thread, with the future
#: that the run awaits.
_WaitingOutcome = tuple[Run, Outcome, asyncio.Future[TaskStatus | None]]


class TaskManager:
    """Registers task types, stores tasks, and runs them on this process.

    Parameters
    ----------
    database:
        A ``Database`` or a SQLAlchemy URL; SQLite by default.
    max_workers:
        How many tasks run at once. Plain hooks run on threads, ``async``
        hooks on the manager's own event loop, which runs on its own thread so
        that a task cannot stall the web server's loop. 0 makes a manager that
        stores and controls tasks but runs none, for web processes that leave
        the work to ``taskmill worker`` processes.
    progress_interval:
        Seconds between writes of the progress that tasks report.
    poll_interval:
        Seconds between looks for PENDING tasks that another process stored,
        and for runs of other processes whose lease expired.
    shutdown_grace:
        Seconds that ``shutdown()`` waits for running tasks to reach a
        checkpoint before it puts them back to PENDING regardless.
    lease_duration:
        How long a claim reserves a task, in seconds. The manager renews the
        leases of its runs every third of this. When a runner stops renewing
        (it died, or its host did), another runner takes the task back once
        the lease has expired. A runner on this host whose process is gone
        loses its tasks at once.
    max_params_bytes:
        The largest params that ``create()`` accepts, in bytes of compact
        JSON in UTF-8, as stored (validated, defaults filled in). Larger
        params raise ``InvalidParams`` (HTTP 422). Params are returned with
        every task that the API lists, so pass large inputs by reference.
    max_result_bytes:
        The largest result of a run, measured as params are. A larger result
        fails the run with a ``ResultTooLarge`` error. Results are returned
        with every task that the API lists, up to 500 a page.
    max_checkpoint_bytes:
        The largest checkpoint state, measured as params are. ``checkpoint()``
        raises ``CheckpointTooLarge`` for a larger one, which fails the run
        unless the task catches it. Checkpoints are never returned by the
        API, but each one is written whole, so this limit is the loosest.
    """

    def __init__(
        self,
        database: Database | str = DEFAULT_DATABASE_URL,
        *,
        max_workers: int = 4,
        progress_interval: float = 0.5,
        poll_interval: float = 1.0,
        shutdown_grace: float = 10.0,
        lease_duration: float = 60.0,
        max_params_bytes: int = 64 * 1024,
        max_result_bytes: int = 1024 * 1024,
        max_checkpoint_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if max_workers < 0:
            raise ValueError(
                f"max_workers must be 0 (run no tasks) or more, got {max_workers!r}."
            )
        for setting, seconds in (
            ("progress_interval", progress_interval),
            ("poll_interval", poll_interval),
            ("lease_duration", lease_duration),
        ):
            if not 0 < seconds <= _MAX_SECONDS:
                raise ValueError(
                    f"{setting} must be a number of seconds above 0 and at most "
                    f"{_MAX_SECONDS:g}, got {seconds!r}."
                )
        if not 0 <= shutdown_grace <= _MAX_SECONDS:
            raise ValueError(
                f"shutdown_grace must be a number of seconds from 0 to "
                f"{_MAX_SECONDS:g}, got {shutdown_grace!r}."
            )
        for setting, value in (
            ("max_params_bytes", max_params_bytes),
            ("max_result_bytes", max_result_bytes),
            ("max_checkpoint_bytes", max_checkpoint_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{setting} must be a positive number of bytes, got {value!r}."
                )
        self._owns_database = not isinstance(database, Database)
        self.database = (
            database
            if isinstance(database, Database)
            # A connection for each worker and the manager's own thread, with
            # room for web requests.
            else Database(database, pool_size=max(10, max_workers + 5))
        )
        self.max_workers = max_workers
        self.progress_interval = progress_interval
        self.poll_interval = poll_interval
        self.shutdown_grace = shutdown_grace
        self.lease_duration = lease_duration
        self.max_params_bytes = max_params_bytes
        self.max_result_bytes = max_result_bytes
        self.max_checkpoint_bytes = max_checkpoint_bytes
        #: Identifies this manager's runs in the ``owner`` column.
        self.runner_id = runners.new_runner_id()
        self._types: dict[str, type[BaseTask[Any]]] = {}
        self._live: dict[str, LiveTask] = {}
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runs: set[asyncio.Task[Any]] = set()
        #: Runs whose outcome the database failed to store; retried by upkeep.
        self._unrecorded: set[Run] = set()
        #: Timeout timers of the current runs, cancelled when a run ends.
        self._deadlines: dict[Run, asyncio.TimerHandle] = {}
        self._accepting = False
        self._upkeep: asyncio.Task[None] | None = None
        self._watchdog: LoopWatchdog | None = None
        self._listener: Listener | None = None
        #: Workers held for tasks that a claim of due tasks is taking.
        self._reserved = 0
        #: Chores (a claim of due tasks, a check of requests) waiting to start.
        self._scheduled: set[str] = set()
        #: Set when the last claim of due tasks took as many as it asked for.
        self._backlog = False
        #: Claims and request checks that notifications started.
        self._chores: set[asyncio.Task[None]] = set()
        #: Queued tasks with a worker held for them, waiting to be claimed.
        self._claims: builtins.list[LiveTask] = []
        #: Outcomes of runs waiting to be written, with the future of each.
        self._outcomes: builtins.list[_WaitingOutcome] = []
        self._writes_scheduled = False
        #: Tasks that ``create()`` callers wait to see committed.
        self._creates: builtins.list[_Create] = []
        self._executor: ThreadPoolExecutor | None = None
        self._database_thread: int | None = None

    # -- task types --

    def register(self, task_class: T) -> T:
        """Register a task class under its ``name``; usable as a decorator."""
        registry.check_task_class(task_class)
        name = task_class.name
        if self._types.get(name, task_class) is not task_class:
            raise TaskTypeAlreadyRegistered(name)
        self._types[name] = task_class
        return task_class

    @property
    def task_types(self) -> Mapping[str, type[BaseTask[Any]]]:
        return dict(self._types)

    def _task_class(self, name: str) -> type[BaseTask[Any]]:
        try:
            return self._types[name]
        except KeyError:
            raise UnknownTaskType(name, self._types) from None

    # -- manager lifecycle --

    @property
    def is_running(self) -> bool:
        return self._accepting

    def startup(self) -> None:
        """Migrate a SQLite schema, start the runner, and take up unfinished tasks.

        PAUSED tasks stay paused, PENDING ones are claimed as workers are
        free, and RUNNING ones that a process left behind when it died resume
        from their checkpoint. A PostgreSQL schema must be at this version's
        revision already (``taskmill db upgrade``), or ``SchemaOutOfDate`` is
        raised.
        """
        if self._loop is not None or self._accepting:
            raise RuntimeError("The task manager is already running.")
        if self.database.is_memory:
            raise ValueError(
                f"Cannot run tasks on {self.database.url!r}: an in-memory SQLite "
                "database is private to each connection. Use a file, e.g. "
                "'sqlite:///./taskmill.db'."
            )
        if self.database.dialect == "sqlite":
            # The embedded default migrates itself; a shared server database
            # is migrated once, by `taskmill db upgrade`.
            self.database.upgrade()
        else:
            self.database.check_schema()
        if not self.max_workers:
            self._accepting = True
            logger.info(
                "Task manager %s started without running tasks (max_workers=0); "
                "worker processes run them",
                self.runner_id,
                extra={"event": "manager.started", "runner_id": self.runner_id},
            )
            return
        self._restore()
        loop = asyncio.new_event_loop()
        # One thread for the manager's own database work (new tasks, claims,
        # outcomes, upkeep), started now so that the thread count stays level
        # later. It is not the loop's default executor: task code that calls
        # asyncio.to_thread() must not hold up the writes of every task.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskmill-db")
        self._database_thread = executor.submit(threading.get_ident).result()
        self._executor = executor
        self._thread = threading.Thread(
            target=loop.run_forever, name="taskmill-manager", daemon=True
        )
        self._loop = loop
        self._thread.start()
        self._watchdog = LoopWatchdog(loop, self._thread, self._report_blocked_loop)
        self._watchdog.start()
        self._accepting = True
        loop.call_soon_threadsafe(self._begin)
        if self.database.dialect == "postgresql":
            self._listener = Listener(self.database, self._notified)
            self._listener.start()
        logger.info(
            "Task manager %s started with %d workers, %d paused or recovered tasks",
            self.runner_id,
            self.max_workers,
            len(self._live),
            extra={"event": "manager.started", "runner_id": self.runner_id},
        )

    def shutdown(self, grace: float | None = None) -> None:
        """Suspend running tasks at their next checkpoint, then stop the runner.

        Waits up to ``grace`` seconds (``shutdown_grace`` by default). A task
        still running after that goes back to PENDING from its last checkpoint,
        and its thread is left to end with the process.
        """
        loop = self._loop
        if loop is None:
            if self._accepting:
                # A manager with max_workers=0: nothing runs here.
                self._accepting = False
                self._finish_shutdown()
            return
        self._accepting = False
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        grace = self.shutdown_grace if grace is None else grace
        drain = asyncio.run_coroutine_threadsafe(self._drain(grace), loop)
        try:
            drain.result(timeout=grace + 5)
        except TimeoutError:
            # An async hook that blocks the loop (time.sleep in async def)
            # keeps the drain from running. Other runners take its tasks back
            # once the leases are released here.
            logger.error(
                "Task manager %s: the event loop did not respond within the "
                "shutdown grace; its RUNNING tasks go to the next runner",
                self.runner_id,
                extra={"event": "manager.stop_timed_out", "runner_id": self.runner_id},
            )
            self._release_leases()
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not loop.is_running():
            loop.close()
        if self._executor is not None:
            # Without waiting: a write that waits for a lock must not hold up
            # the shutdown. Writes already queued still run.
            self._executor.shutdown(wait=False)

        self._loop = self._thread = None
        self._executor = None
        self._database_thread = None
        with self._lock:
            self._live.clear()
            self._queue.clear()
            self._unrecorded.clear()
        self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        if self._owns_database:
            self.database.dispose()
        logger.info(
            "Task manager %s stopped",
            self.runner_id,
            extra={"event": "manager.stopped", "runner_id": self.runner_id},
        )

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Run the manager for the life of a FastAPI app: ``FastAPI(lifespan=...)``."""
        await asyncio.to_thread(self.startup)
        try:
            yield
        finally:
            await asyncio.to_thread(self.shutdown)

    # -- tasks --

    def create(
        self,
        name: str,
        params: Mapping[str, Any] | BaseModel | None = None,
        *,
        start: bool = True,
    ) -> TaskInfo:
        """Store a new task and queue it; with ``start=False`` it is held as PAUSED."""
        task_class = self._task_class(name)
        stored = registry.validate_params(task_class, params, self.max_params_bytes)
        [task] = self._store_new(name, [stored], start)
        return task

    def create_many(
        self,
        name: str,
        params: Iterable[Mapping[str, Any] | BaseModel | None],
        *,
        start: bool = True,
    ) -> builtins.list[TaskInfo]:
        """Store a task of type ``name`` for each of ``params`` in one transaction.

        All of them are stored, or none: invalid params raise
        ``InvalidParams`` whose errors name the params by their position
        (``loc`` starts with the index), before anything is written. The
        tasks are queued in the order of ``params`` and returned in it.
        """
        if isinstance(params, Mapping | BaseModel | str | bytes):
            raise TypeError(
                f"create_many() takes a list with the params of each task, got "
                f"{type(params).__name__}; for one task, call create()."
            )
        task_class = self._task_class(name)
        stored = []
        for index, task_params in enumerate(params):
            try:
                stored.append(
                    registry.validate_params(
                        task_class, task_params, self.max_params_bytes
                    )
                )
            except InvalidParams as exc:
                errors = [{**e, "loc": (index, *e["loc"])} for e in exc.errors]
                raise InvalidParams(name, errors) from exc
        return self._store_new(name, stored, start) if stored else []

    def _store_new(
        self, name: str, stored: builtins.list[dict[str, Any]], start: bool
    ) -> builtins.list[TaskInfo]:
        """Store new tasks with validated params in one transaction, then queue them."""
        status = TaskStatus.PENDING if start else TaskStatus.PAUSED
        reason = "created" if start else "created held until started"
        create = _Create(name, stored, status, reason)
        if self._queue_create(create):
            # Committed on the database thread, in one transaction with the
            # other writes that wait by then.
            tasks = create.done.result()
        else:
            with self.database.write() as session:
                tasks = create.write(session)
        infos = []
        for task in tasks:
            logger.info(
                "Task %s (%s) created",
                task.id,
                name,
                extra={"event": "task.created", "task_id": task.id, "task_name": name},
            )
            infos.append(TaskInfo.model_validate(task))
        # Queued last: the claim that it wakes competes with this thread.
        self._track_new(
            [task.id for task in tasks if task.id not in create.started],
            name,
            queue=start,
        )
        return infos

    def get(self, task_id: str) -> TaskInfo:
        with self.database.read() as session:
            return TaskInfo.model_validate(crud.get_task(session, task_id))

    def list(
        self,
        *,
        statuses: Sequence[TaskStatus] = (),
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> builtins.list[TaskInfo]:
        """Return tasks newest first."""
        with self.database.read() as session:
            tasks = crud.list_tasks(
                session, statuses=statuses, name=name, limit=limit, offset=offset
            )
            return [TaskInfo.model_validate(task) for task in tasks]

    def events(self, task_id: str) -> builtins.list[TaskEventInfo]:
        """Return the status history of a task, oldest first."""
        with self.database.read() as session:
            events = crud.list_events(session, task_id)
            return [TaskEventInfo.model_validate(event) for event in events]

    def start(self, task_id: str) -> TaskInfo:
        """Queue a task that is held or paused; its run resumes from its checkpoint."""
        return self.act(task_id, Action.START)

    def resume(self, task_id: str) -> TaskInfo:
        """Same as ``start()``."""
        return self.act(task_id, Action.RESUME)

    def pause(self, task_id: str) -> TaskInfo:
        """Hold a PENDING task, or ask a RUNNING one to pause at its next checkpoint."""
        return self.act(task_id, Action.PAUSE)

    def stop(self, task_id: str) -> TaskInfo:
        """End a PENDING or PAUSED task now, or a RUNNING one at its next checkpoint.

        An ``async`` hook is cancelled at once. A plain hook on a thread cannot
        be cancelled, so the task stays RUNNING with the request pending until
        the hook reaches a checkpoint or returns.
        """
        return self.act(task_id, Action.STOP)

    def restart(self, task_id: str) -> TaskInfo:
        """Run a FINISHED, FAILED or STOPPED task again from the start, same id."""
        return self.act(task_id, Action.RESTART)

    def act(self, task_id: str, action: Action | str) -> TaskInfo:
        """Take a user action by name: start, resume, pause, stop or restart.

        The request is committed before this returns. A RUNNING task honours a
        pause or stop at its next checkpoint, so the returned snapshot may
        still show RUNNING with ``pending_request`` set.
        """
        action = Action(action)
        with self.database.write() as session:
            task = crud.get_task(session, task_id, for_update=True)
            if action not in allowed_actions(task.status, task.control):
                raise InvalidTransition(task.id, task.status, action, task.control)
            if task.status == TaskStatus.RUNNING:
                request = ControlRequest(action.value.upper())
                task = crud.set_control(session, task_id, request)
            else:
                target, reason, values = _ACTION_RESULTS[action]
                values = dict(values)
                if target == TaskStatus.STOPPED:
                    values["finished_at"] = utcnow()
                task = crud.change_status(
                    session, task_id, target, reason=reason, values=values
                )
        logger.info(
            "Task %s (%s) %s requested",
            task_id,
            task.name,
            action.value,
            extra={"event": f"task.{action.value}_requested", "task_id": task_id},
        )
        if task.status == TaskStatus.RUNNING and task.control is not None:
            self._signal(task_id, task.control, task.attempts)
        elif task.status == TaskStatus.PENDING:
            self._track(task_id, task.name, queue=True)
        elif task.status.is_terminal:
            self._untrack(task_id)
        return TaskInfo.model_validate(task)

    def wait(
        self,
        task_id: str,
        statuses: Iterable[TaskStatus] = TERMINAL,
        timeout: float = 30.0,
        poll: float = 0.02,
    ) -> TaskInfo:
        """Poll until the task reaches one of ``statuses``; raise TimeoutError after ``timeout``."""
        expected = set(statuses)
        deadline = time.monotonic() + timeout
        while True:
            info = self.get(task_id)
            if info.status in expected:
                return info
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Task {task_id!r} is still {info.status} after {timeout} s; "
                    f"expected one of {sorted(expected)}."
                )
            time.sleep(poll)

    def live_task_ids(self) -> set[str]:
        """Return the ids of the unfinished tasks this process tracks."""
        with self._lock:
            return set(self._live)

    # -- the live registry and the queue --

    def _track(
        self,
        task_id: str,
        name: str,
        *,
        queue: bool,
        run_after: dt.datetime | None = None,
    ) -> None:
        """Track a task; queue it now, or at ``run_after`` if that is later."""
        if not self.max_workers:
            return
        delay = 0.0 if run_after is None else (run_after - utcnow()).total_seconds()
        with self._lock:
            live = self._live.setdefault(task_id, LiveTask(task_id, name))
            if queue and delay <= 0 and not live.queued:
                live.queued = True
                self._queue.append(task_id)
        loop = self._loop
        if not queue or loop is None or not self._accepting:
            # Not queued before startup: the first poll queues tasks that are due.
            return
        if delay > 0:
            # Claims compare run_after with the clock: 1 ms later, it has passed.
            requeue = functools.partial(self._track, task_id, name, queue=True)
            loop.call_soon_threadsafe(loop.call_later, delay + 0.001, requeue)
        else:
            loop.call_soon_threadsafe(self._dispatch)

    def _track_new(self, task_ids: Sequence[str], name: str, *, queue: bool) -> None:
        """Track new tasks, in order; queue them unless they are held as PAUSED."""
        if not self.max_workers or not task_ids:
            return
        with self._lock:
            for task_id in task_ids:
                live = self._live.setdefault(task_id, LiveTask(task_id, name))
                if queue and not live.queued:
                    live.queued = True
                    self._queue.append(task_id)
        loop = self._loop
        if queue and loop is not None and self._accepting:
            loop.call_soon_threadsafe(self._dispatch)

    def _untrack(self, task_id: str) -> None:
        with self._lock:
            live = self._live.get(task_id)
            if live is None:
                return
            # A restart may have queued the task again since it ended.
            if not (live.queued or live.claiming or live.run):
                del self._live[task_id]
            elif live.run is not None:
                # A run whose end the loop has yet to handle: that drops it.
                live.ended = True

    def _signal(
        self, task_id: str, request: Request, attempt: int | None = None
    ) -> None:
        """Pass a request to the task's current run, if ``attempt`` is that run.

        A request that arrives after its run ended is dropped: the database
        stores it, and the next run reads it when it is claimed.
        """
        with self._lock:
            live = self._live.get(task_id)
            run = live.run if live is not None else None
            if live is None or run is None:
                return
            if attempt is not None and run.token.attempt != attempt:
                return
            if (
                live.request == RunnerRequest.TIME_OUT
                and request not in _OUTRANKS_TIMEOUT
            ):
                return
            live.request = request
        run.wake()

    def _restore(self) -> None:
        """Track PAUSED tasks and take back the runs of runners that are gone.

        PENDING tasks are left in the database: the first claim of due tasks
        takes as many as there are free workers, so runners that start
        together share the backlog instead of all queuing all of it. A
        RUNNING task whose owner still holds its lease is left alone: its
        runner may be alive in another process.
        """
        with self.database.read() as session:
            rows = crud.list_unfinished(session)
        for task_id, name, status in rows:
            if name not in self._types:
                logger.warning(
                    "Task %s has unregistered type %r; it is left as %s",
                    task_id,
                    name,
                    status,
                    extra={"event": "task.unknown_type", "task_id": task_id},
                )
            elif status == TaskStatus.PAUSED:
                self._track(task_id, name, queue=False)
        self._recover_lost()

    def _recover_lost(self) -> None:
        """Take back RUNNING tasks whose lease expired or whose runner is gone."""
        with self.database.read() as session:
            running = crud.list_running(session)
        for row in running:
            task_class = self._types.get(row.name)
            if row.owner == self.runner_id or task_class is None:
                continue
            lost = runners.lease_lost(row.owner, row.lease_expires_at, row.read_at)
            if lost is None:
                continue
            with self.database.write() as session:
                recovered = runners.recover(session, row, task_class, lost)
            if recovered is not None and recovered[0] == TaskStatus.PENDING:
                self._track(row.id, row.name, queue=True, run_after=recovered[1])

    # -- running, on the manager's loop --

    def _begin(self) -> None:
        self._upkeep = asyncio.ensure_future(self._upkeep_forever())
        self._dispatch()
        self._schedule_claim_due()

    def _dispatch(self) -> None:
        """Hold a worker for each queued task, up to the free ones, and claim them."""
        with self._lock:
            taken = self._take_queued(ending=0)
            self._claims.extend(taken)
        if taken:
            self._schedule_writes()

    def _take_queued(self, ending: int) -> builtins.list[LiveTask]:
        """Hold a worker for each queued task, up to the free ones; return the tasks.

        ``ending`` counts runs whose outcomes are written in the transaction
        that claims these tasks, so their workers are free once it commits.
        The caller must hold ``_lock``, and must claim the tasks.
        """
        taken: builtins.list[LiveTask] = []
        free = self.max_workers + ending - len(self._runs) - self._reserved
        while self._accepting and self._queue and len(taken) < free:
            task_id = self._queue.popleft()
            live = self._live.get(task_id)
            if live is None or not live.queued:
                # Claimed meanwhile with the due tasks of other processes.
                continue
            live.queued = False
            live.claiming = True
            taken.append(live)
        self._reserved += len(taken)
        return taken

    def _run_done(self, run: asyncio.Task[Any]) -> None:
        self._runs.discard(run)
        if not run.cancelled() and run.exception() is not None:
            logger.error(
                "Task runner crashed",
                exc_info=run.exception(),
                extra={"event": "runner.crashed", "runner_id": self.runner_id},
            )
        self._dispatch()
        if self._backlog:
            # The last claim filled every free worker, so more tasks may wait.
            self._schedule_claim_due()

    def _prepare_run(self, live: LiveTask, task: crud.Task) -> Run:
        """Make ``live``'s run for a claimed ``task``; callable from any thread."""
        run = Run(
            manager=self,
            live=live,
            task_class=self._task_class(task.name),
            token=crud.RunToken(self.runner_id, task.attempts),
            progress=task.progress,
            progress_floor=task.progress,
            message=task.message,
            failures=task.failures,
        )
        with self._lock:
            live.run = run
            live.claiming = False
            # The stored request, never one left in memory by an earlier run.
            live.request = task.control
            if live.request is None and not self._accepting:
                # Claimed while the manager shuts down: back to PENDING at once.
                live.request = RunnerRequest.SUSPEND
        return run

    def _launch(self, run: Run, task: crud.Task) -> None:
        """Start a run prepared by a claim of due tasks, in a worker held for it."""
        future = asyncio.ensure_future(self._run(run, task))
        with self._lock:
            # In one step, so that a count of free workers on another thread
            # never misses this one.
            self._reserved -= 1
            self._runs.add(future)
        future.add_done_callback(self._run_done)

    async def _run(self, run: Run, task: crud.Task) -> None:
        timeout = run.task_class.timeout
        if timeout is not None:
            loop = asyncio.get_running_loop()
            self._deadlines[run] = loop.call_later(timeout, self._time_out, run)
        logger.info(
            "Task %s (%s) started, attempt %d",
            task.id,
            task.name,
            task.attempts,
            extra={"event": "task.started", "task_id": task.id, "task_name": task.name},
        )
        try:
            status = await run.execute(task.params, task.checkpoint)
        except Exception as exc:
            # A fault in taskmill itself, not in the task: still end the run.
            logger.exception(
                "Task %s (%s): the runner failed",
                task.id,
                task.name,
                extra={"event": "runner.crashed", "task_id": task.id},
            )
            outcome = failed(error_record(exc, "runner"), run.progress, run.message)
            status = await self._on_database_thread(run.record, outcome)
        finally:
            deadline = self._deadlines.pop(run, None)
            if deadline is not None:
                deadline.cancel()
        self._after_run(run, status)

    def _time_out(self, run: Run) -> None:
        """Ask a run that exceeded its task type's ``timeout`` to end FAILED."""
        with self._lock:
            live = run.live
            if live.run is not run or live.request in _OUTRANKS_TIMEOUT:
                return
            live.request = RunnerRequest.TIME_OUT
        logger.warning(
            "Task %s (%s) exceeded its time limit of %g s; it fails at its next "
            "checkpoint, progress report or sleep()",
            run.task_id,
            live.name,
            run.task_class.timeout,
            extra={"event": "task.timed_out", "task_id": run.task_id},
        )
        run.wake()

    # -- new tasks, claims and outcomes, written together --

    async def _store_outcome(self, run: Run, outcome: Outcome) -> TaskStatus | None:
        """Store the outcome of ``run``; return the status written, or None.

        The outcome waits for the database thread, which writes every new
        task, claim and outcome waiting by then in one transaction (a group
        commit), so that one commit serves many runs when tasks are short.
        The caller hears back only after that commit.
        """
        assert self._loop is not None
        done: asyncio.Future[TaskStatus | None] = self._loop.create_future()
        with self._lock:
            self._outcomes.append((run, outcome, done))
        self._schedule_writes()
        return await done

    async def _on_database_thread(self, function: Callable[..., R], *args: Any) -> R:
        """Run ``function`` on the manager's database thread and wait for it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    def _queue_create(self, create: _Create) -> bool:
        """Hand a new task to the database thread; False if the caller must write it.

        The database thread cannot wait for itself. A thread inside a write
        transaction would hold up the database thread's write, so it writes by
        itself, which raises a clear error. A manager that runs no tasks, or
        has not started, has no database thread.

        On PostgreSQL every caller writes its own tasks. There, the database
        thread's claims and outcomes can wait up to ``busy_timeout`` for a
        row that another transaction has locked, and no such lock can hold
        up an INSERT of a new task.
        """
        if (
            self._executor is None
            or not self._accepting
            or self.database.dialect == "postgresql"
            or threading.get_ident() == self._database_thread
            or self.database.writing_here()
        ):
            return False
        with self._lock:
            self._creates.append(create)
        if self._schedule_writes():
            return True
        with self._lock:
            if create in self._creates:
                self._creates.remove(create)
                return False
        # A write that was under way took it.
        return True

    def _schedule_writes(self) -> bool:
        """Run ``_write_waiting`` on the database thread soon, once until it starts.

        Callable from any thread. Returns False when the database thread has
        ended (the manager shut down), so that a caller can write by itself.
        """
        with self._lock:
            if self._writes_scheduled:
                return True
            self._writes_scheduled = True
        executor = self._executor
        try:
            if executor is None:
                raise RuntimeError("no database thread")
            executor.submit(self._write_waiting)
        except RuntimeError:
            with self._lock:
                self._writes_scheduled = False
            return False
        return True

    def _write_waiting(self) -> None:
        """Write the waiting new tasks, claims and outcomes in one transaction.

        Then tell the waiting callers and start the claimed runs. When that
        transaction fails for another reason than an unavailable database,
        each write is made on its own, with the error handling of a single
        write, so that one bad outcome cannot hold up the others.
        """
        with self._lock:
            self._writes_scheduled = False
            creates, self._creates = self._creates, []
            claims, self._claims = self._claims, []
            outcomes, self._outcomes = self._outcomes, []
            # A run whose outcome is written here hands its worker to the next
            # queued task, claimed in the same transaction.
            claims.extend(self._take_queued(ending=len(outcomes)))
            claiming = self._hold_workers_for(creates)
        if not creates and not claims and not outcomes:
            return
        try:
            created, claimed, missed, statuses = self._write_together(
                creates, claims, outcomes
            )
        except Exception as exc:
            with self._lock:
                self._reserved -= claiming
            if isinstance(exc, _RowLocked):
                # A row that one write waited for: the others, and the new
                # tasks, which no lock on a row can hold up, may well succeed
                # on their own.
                self._write_apart(creates, claims, outcomes, exc)
            elif isinstance(exc, SQLAlchemyError) and is_transient(exc):
                self._write_later(creates, claims, outcomes, exc)
            else:
                self._write_apart(creates, claims, outcomes, exc)
            return
        for create, tasks in zip(creates, created, strict=True):
            for task in create.claims:
                self._start_created(create, task)
            if create.held > len(create.claims):
                # Not claimable after all: the caller queues them.
                with self._lock:
                    self._reserved -= create.held - len(create.claims)
            create.done.set_result(tasks)
        for (run, outcome, done), status in zip(outcomes, statuses, strict=True):
            try:
                if status is None:
                    run.lost()
                else:
                    run.recorded(outcome, status)
            finally:
                self._settle(done, status)
        for live, row in missed:
            self._claim_missed(live, row)
        for live, task in claimed:
            self._start_claimed(live, task)

    def _hold_workers_for(self, creates: Sequence[_Create]) -> int:
        """Hold free workers for new PENDING tasks, to claim them as they are stored.

        Only while no queued task waits, so that new tasks do not overtake
        older ones. The caller holds ``_lock``. Returns how many it held.
        """
        free = self.max_workers - len(self._runs) - self._reserved
        if not self._accepting or self._queue or free <= 0:
            return 0
        reserved = 0
        for create in creates:
            if create.status == TaskStatus.PENDING:
                # The first tasks of each create, in order.
                create.held = min(free - reserved, len(create.params))
                reserved += create.held
        self._reserved += reserved
        return reserved

    def _start_created(self, create: _Create, task: crud.Task) -> None:
        """Start the run of a new task that was claimed as it was stored."""
        with self._lock:
            live = self._live.setdefault(task.id, LiveTask(task.id, task.name))
            live.claiming = True
        create.started.add(task.id)
        self._start_claimed(live, task)

    def _write_later(
        self,
        creates: Sequence[_Create],
        claims: Sequence[LiveTask],
        outcomes: Sequence[_WaitingOutcome],
        exc: SQLAlchemyError,
    ) -> None:
        """Give up for now on writes that failed because the database is unavailable.

        ``create()`` raises the error, as a write of its own would. The claims
        wait for the next poll and the outcomes for the upkeep, so that they
        do not each wait for the database again here.
        """
        for create in creates:
            create.done.set_exception(exc)
        for live in claims:
            self._log_claim_failed(live, exc)
            self._claim_missed(live, None)
        for run, outcome, done in outcomes:
            run.defer(outcome, exc)
            self._settle(done, None)

    def _write_apart(
        self,
        creates: Sequence[_Create],
        claims: Sequence[LiveTask],
        outcomes: Sequence[_WaitingOutcome],
        exc: Exception,
    ) -> None:
        """Write each create, claim and outcome on its own, after writing them
        together failed."""
        if len(creates) + len(claims) + len(outcomes) > 1:
            logger.info(
                "Task manager %s: writing %d new tasks, %d claims and %d outcomes "
                "together failed (%s); writing them one by one",
                self.runner_id,
                len(creates),
                len(claims),
                len(outcomes),
                exc,
                extra={"event": "manager.batch_failed", "runner_id": self.runner_id},
            )
        for create in creates:
            try:
                with self.database.write() as session:
                    tasks = create.write(session)
            except BaseException as error:
                create.done.set_exception(error)
            else:
                # Only once committed.
                create.done.set_result(tasks)
        for live in claims:
            self._claim_alone(live)
        for run, outcome, done in outcomes:
            status = None
            try:
                status = self._record_alone(run, outcome)
            finally:
                self._settle(done, status)

    def _write_together(
        self,
        creates: Sequence[_Create],
        claims: Sequence[LiveTask],
        outcomes: Sequence[_WaitingOutcome],
    ) -> tuple[
        builtins.list[builtins.list[crud.Task]],
        builtins.list[tuple[LiveTask, crud.Task]],
        builtins.list[tuple[LiveTask, crud.Task | None]],
        builtins.list[TaskStatus | None],
    ]:
        """Store ``creates``, claim ``claims`` and write ``outcomes`` in one transaction.

        Raises ``_RowLocked`` when a claim or an outcome waited too long for
        a row that another transaction holds (PostgreSQL).
        """
        with contextlib.ExitStack() as stack:
            for run, _, _ in outcomes:
                # A progress flush of the run must not land after its outcome.
                stack.enter_context(run.write_lock)
            with self.database.write() as session, crud.history_together(session):
                created = [create.write(session) for create in creates]
                try:
                    claimed, missed, statuses = self._claim_and_end(
                        session, creates, created, claims, outcomes
                    )
                except SQLAlchemyError as exc:
                    if is_lock_timeout(exc):
                        raise _RowLocked from exc
                    raise
        return created, claimed, missed, statuses

    def _claim_and_end(
        self,
        session: Session,
        creates: Sequence[_Create],
        created: Sequence[Sequence[crud.Task]],
        claims: Sequence[LiveTask],
        outcomes: Sequence[_WaitingOutcome],
    ) -> tuple[
        builtins.list[tuple[LiveTask, crud.Task]],
        builtins.list[tuple[LiveTask, crud.Task | None]],
        builtins.list[TaskStatus | None],
    ]:
        """Write outcomes, then claim new and queued tasks, in the caller's transaction.

        Outcomes first: a task that an outcome puts back to PENDING can be
        claimed again at once, and its history lists the changes in order.
        """
        statuses: builtins.list[TaskStatus | None] = []
        for run, outcome, _ in outcomes:
            try:
                statuses.append(run.write_outcome(session, outcome))
            except crud.RunLost:
                # Raised before the outcome wrote anything.
                statuses.append(None)
        new_ids = [
            task.id
            for create, tasks in zip(creates, created, strict=True)
            for task in tasks[: create.held]
        ]
        rows = crud.claim_tasks(
            session,
            [*new_ids, *(live.task_id for live in claims)],
            self.runner_id,
            reason=f"claimed by {self.runner_id}",
            lease=self.lease_duration,
        )
        by_id = {row.id: row for row in rows}
        for create, tasks in zip(creates, created, strict=True):
            create.claims = [
                by_id[task.id] for task in tasks[: create.held] if task.id in by_id
            ]
        claimed = [
            (live, by_id[live.task_id]) for live in claims if live.task_id in by_id
        ]
        missed = [
            (live, crud.find_task(session, live.task_id))
            for live in claims
            if live.task_id not in by_id
        ]
        return claimed, missed, statuses

    def _claim_alone(self, live: LiveTask) -> None:
        """Claim one queued task in its own transaction, and start its run."""
        try:
            with self.database.write() as session:
                task = crud.claim_task(
                    session,
                    live.task_id,
                    self.runner_id,
                    reason=f"claimed by {self.runner_id}",
                    lease=self.lease_duration,
                )
                row = (
                    None if task is not None else crud.find_task(session, live.task_id)
                )
        except SQLAlchemyError as exc:
            self._log_claim_failed(live, exc)
            self._claim_missed(live, None)
            return
        if task is None:
            self._claim_missed(live, row)
        else:
            self._start_claimed(live, task)

    def _log_claim_failed(self, live: LiveTask, exc: SQLAlchemyError) -> None:
        logger.warning(
            "Task %s (%s): claiming it failed (%s); it stays PENDING and is "
            "queued again by the next poll",
            live.task_id,
            live.name,
            exc,
            extra={"event": "task.claim_failed", "task_id": live.task_id},
        )

    def _record_alone(self, run: Run, outcome: Outcome) -> TaskStatus | None:
        try:
            return run.record(outcome)
        except Exception as exc:
            # A fault in taskmill itself, not in the task: still end the run.
            logger.exception(
                "Task %s (%s): the runner failed",
                run.task_id,
                run.live.name,
                extra={"event": "runner.crashed", "task_id": run.task_id},
            )
            return run.record(
                failed(error_record(exc, "runner"), run.progress, run.message)
            )

    def _claim_missed(self, live: LiveTask, row: crud.Task | None) -> None:
        """Release the worker held for a task that could not be claimed."""
        with self._lock:
            live.claiming = False
            self._reserved -= 1
        if (
            row is not None
            and row.status == TaskStatus.PENDING
            and row.run_after is not None
        ):
            # In its retry backoff: queued again when that has passed.
            self._track(live.task_id, row.name, queue=True, run_after=row.run_after)
        elif row is not None:
            # Ended, paused, or claimed by another runner meanwhile.
            self._untrack(live.task_id)
        # A failed claim (row None) leaves the task to the next poll.
        self._call_on_loop(self._dispatch)

    def _start_claimed(self, live: LiveTask, task: crud.Task) -> None:
        """Start the run of a claimed task in the worker held for it."""
        run = self._prepare_run(live, task)
        self._call_on_loop(self._launch, run, task)

    def _settle(
        self, done: asyncio.Future[TaskStatus | None], status: TaskStatus | None
    ) -> None:
        self._call_on_loop(_set_result, done, status)

    def _call_on_loop(self, callback: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            # The loop closed: the manager shut down meanwhile.
            logger.debug("The manager's loop closed before %s ran", callback)

    def _after_run(self, run: Run, status: TaskStatus | None) -> None:
        """Update the registry once a run's outcome is stored (or given up)."""
        live = run.live
        with self._lock:
            if run.unrecorded is not None:
                # The database failed: the run keeps its place in the registry
                # until the upkeep loop stores the outcome.
                self._unrecorded.add(run)
                return
            self._unrecorded.discard(run)
            if live.run is run:
                live.run = None
                live.request = None
            # None: the task was taken back and is no longer this process's to
            # track. A restart that queued it again meanwhile keeps the entry.
            # A run suspended because the database failed stays tracked, and
            # the next poll queues it again: that interval is its backoff.
            ended = status is None or status.is_terminal or live.ended
            # A newer run of the task may have started here meanwhile: the
            # entry is then its own.
            newer = live.queued or live.claiming or live.run is not None
            if ended and not newer and self._live.get(live.task_id) is live:
                del self._live[live.task_id]
            live.ended = False
        if status == TaskStatus.PENDING and run.run_after is not None:
            self._track(live.task_id, live.name, queue=True, run_after=run.run_after)

    async def _upkeep_forever(self) -> None:
        """Flush progress every ``progress_interval``, renew leases every third of
        ``lease_duration``, and adopt or recover tasks every ``poll_interval``.
        """
        next_poll = time.monotonic() + self.poll_interval
        next_renewal = time.monotonic() + self.lease_duration / 3
        interval = min(
            self.progress_interval, self.poll_interval, self.lease_duration / 3
        )
        failures = 0
        while True:
            # While the database fails, wait twice as long after each failure,
            # up to _MAX_UPKEEP_BACKOFF seconds.
            backoff = interval * 2 ** min(failures, 16)
            await asyncio.sleep(min(backoff, max(interval, _MAX_UPKEEP_BACKOFF)))
            now = time.monotonic()
            adopt = now >= next_poll
            if adopt:
                next_poll = now + self.poll_interval
            renew = now >= next_renewal
            if renew:
                next_renewal = now + self.lease_duration / 3
            try:
                # Off the loop: each write may wait for the database's lock.
                await self._on_database_thread(self._upkeep_once, adopt, renew)
            except Exception:
                # Log the first failure in a row with its traceback, not one per try.
                if not failures:
                    logger.exception(
                        "Task manager upkeep failed; retrying with backoff",
                        extra={"event": "manager.upkeep_failed"},
                    )
                failures += 1
                continue
            if failures:
                logger.info(
                    "Task manager upkeep works again after %d failed tries",
                    failures,
                    extra={"event": "manager.upkeep_recovered"},
                )
            failures = 0

    def _upkeep_once(self, adopt: bool, renew: bool) -> None:
        if renew:
            with self.database.write() as session:
                crud.renew_leases(session, self.runner_id, lease=self.lease_duration)
        self._retry_unrecorded()
        self._flush_progress()
        if adopt:
            self._recover_lost()
            self._adopt_pending()

    def _retry_unrecorded(self) -> None:
        with self._lock:
            runs = builtins.list(self._unrecorded)
        for run in runs:
            status = run.retry_outcome()
            if run.unrecorded is None:
                self._after_run(run, status)

    def _adopt_pending(self) -> None:
        """Claim due PENDING tasks that this process has not queued, up to its free workers.

        Other processes may have stored them: a web process that runs no
        tasks, a script, or a runner that put its tasks back when it shut
        down. Runners that claim at once take different tasks.
        """
        with self._lock:
            free = (
                self.max_workers - len(self._runs) - len(self._queue) - self._reserved
            )
            if free <= 0 or not self._accepting:
                return
            self._reserved += free
        claimed: builtins.list[crud.Task] = []
        try:
            with self.database.write() as session:
                claimed = crud.claim_due(
                    session,
                    names=builtins.list(self._types),
                    owner=self.runner_id,
                    limit=free,
                    lease=self.lease_duration,
                    reason=f"claimed by {self.runner_id}",
                )
        finally:
            with self._lock:
                self._reserved -= free - len(claimed)
        self._backlog = len(claimed) == free
        loop = self._loop
        if loop is not None:
            # Tasks queued here while the workers were held wait for a dispatch.
            loop.call_soon_threadsafe(self._dispatch)
        for task in claimed:
            with self._lock:
                live = self._live.setdefault(task.id, LiveTask(task.id, task.name))
                # Queued here too: the claim by id finds it taken and skips it.
                live.queued = False
            # The run is in the registry before this returns, so that a failed
            # claim of the same task by id keeps the entry.
            run = self._prepare_run(live, task)
            assert loop is not None
            loop.call_soon_threadsafe(self._launch, run, task)

    def _notified(self, event: str, task_id: str) -> None:
        """Handle a notification from the database; called on the listener's thread."""
        loop = self._loop
        if loop is None or not self._accepting:
            return
        with self._lock:
            live = self._live.get(task_id)
            running = live is not None and live.run is not None
            # Queued, being claimed or running here: no claim of due tasks needed.
            handled_here = running or (
                live is not None and (live.queued or live.claiming)
            )
        if event == "pending" and not handled_here:
            # If every worker is busy, the claim takes nothing now; as a
            # backlog, the next run that ends claims the new tasks.
            self._backlog = True
            loop.call_soon_threadsafe(self._schedule_claim_due)
        elif event == "control" and running:
            loop.call_soon_threadsafe(self._schedule_request_check)

    def _schedule_claim_due(self) -> None:
        self._schedule_chore("claim", self._adopt_pending, "claiming due tasks")

    def _schedule_request_check(self) -> None:
        self._schedule_chore("requests", self._check_requests, "reading requests")

    def _schedule_chore(self, key: str, work: Callable[[], object], doing: str) -> None:
        """Run ``work`` on the database thread soon, once for all calls until it starts."""
        if key in self._scheduled or not self._accepting:
            return
        self._scheduled.add(key)
        future = asyncio.ensure_future(self._run_chore(key, work, doing))
        # The loop keeps only a weak reference to a task: this set keeps it alive.
        self._chores.add(future)
        future.add_done_callback(self._chores.discard)

    async def _run_chore(
        self, key: str, work: Callable[[], object], doing: str
    ) -> None:
        self._scheduled.discard(key)
        try:
            await self._on_database_thread(work)
        except SQLAlchemyError as exc:
            logger.warning(
                "Task manager %s: %s failed (%s); the next poll tries again",
                self.runner_id,
                doing,
                exc,
                extra={"event": "manager.chore_failed", "runner_id": self.runner_id},
            )

    def _flush_progress(self) -> None:
        """Write reported progress, and pick up requests stored by other processes."""
        with self._lock:
            runs = [live.run for live in self._live.values() if live.run is not None]
        for run in runs:
            run.flush_progress()
        self._check_requests(runs)

    def _check_requests(self, runs: Sequence[Run] | None = None) -> None:
        """Pass the requests that other processes stored to the runs of this one."""
        if runs is None:
            with self._lock:
                runs = [live.run for live in self._live.values() if live.run]
        if not runs:
            return
        with self.database.read() as session:
            controls = crud.get_controls(session, [run.task_id for run in runs])
        for run in runs:
            request = controls.get(run.task_id)
            if request is not None and run.live.request is None:
                self._signal(run.task_id, request, run.token.attempt)

    async def _drain(self, grace: float) -> None:
        with self._lock:
            lives = [live for live in self._live.values() if live.run is not None]
        for live in lives:
            self._signal(live.task_id, RunnerRequest.SUSPEND)
        if self._runs:
            await asyncio.wait(set(self._runs), timeout=grace)
        await self._on_database_thread(self._suspend_remaining)
        pending = [
            *self._runs,
            *self._chores,
            *([self._upkeep] if self._upkeep else []),
        ]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    def _suspend_remaining(self) -> None:
        """Put back to PENDING the runs that did not end within the grace."""
        # Outcomes that runs stored just now come first: they are not suspended.
        self._write_waiting()
        self._retry_unrecorded()
        with self._lock:
            # Read again: a claim that was under way when the drain began may
            # have started a run since.
            lives = [live for live in self._live.values() if live.run is not None]
        for live in lives:
            run = live.run
            if run is None or run.unrecorded is not None or run.settled:
                # An outcome the database still rejects stays unwritten: the
                # task is RUNNING in the database and is recovered at startup.
                continue
            logger.warning(
                "Task %s (%s) did not reach a checkpoint within the shutdown grace; "
                "it goes back to PENDING",
                run.task_id,
                live.name,
                extra={"event": "task.suspended", "task_id": run.task_id},
            )
            run.abandoned = True
            run.suspend(
                "suspended: the runner shut down before the task reached a "
                "checkpoint; resumes from its last checkpoint"
            )
        # Outcomes that could not be written: let the next runner take those
        # tasks back now rather than when their leases run out.
        self._release_leases()

    def _report_blocked_loop(
        self, task: BaseTask[Any] | None, where: str, seconds: float
    ) -> None:
        """Log a blocked event loop, and write it into the history of the task at fault."""
        if task is None:
            logger.warning(
                "Task manager %s: its event loop has been blocked for over %g s %s",
                self.runner_id,
                seconds,
                where,
                extra={"event": "manager.loop_blocked", "runner_id": self.runner_id},
            )
            return
        reason = (
            f"loop_blocked: an async hook has blocked the manager's event loop for "
            f"over {seconds:g} s, in {where}. Other async tasks and the manager's "
            "upkeep wait meanwhile; await asynchronous calls, and run blocking ones "
            "with asyncio.to_thread()"
        )
        logger.warning(
            "Task %s (%s): %s",
            task.task_id,
            task.name,
            reason,
            extra={"event": "task.loop_blocked", "task_id": task.task_id},
        )
        try:
            with self.database.write() as session:
                crud.add_warning(session, task.task_id, reason)
        except (SQLAlchemyError, TaskNotFound) as exc:
            logger.warning(
                "Task %s: writing the loop_blocked warning failed (%s)",
                task.task_id,
                exc,
                extra={"event": "task.warning_lost", "task_id": task.task_id},
            )

    def _release_leases(self) -> None:
        try:
            with self.database.write() as session:
                crud.expire_leases(session, self.runner_id)
        except SQLAlchemyError as exc:
            logger.warning(
                "Task manager %s could not release its leases (%s); other runners "
                "take its tasks back when the leases expire",
                self.runner_id,
                exc,
                extra={"event": "manager.release_failed", "runner_id": self.runner_id},
            )


class _RowLocked(Exception):
    """A grouped write waited too long for a row lock; the cause is the database's error."""


@dataclass(eq=False)
class _Create:
    """New tasks of one type that ``create_many()`` waits to see committed."""

    name: str
    params: builtins.list[dict[str, Any]]
    status: TaskStatus
    reason: str
    done: Future[builtins.list[crud.Task]] = field(default_factory=Future)
    #: How many free workers are held for the first of the tasks, to claim
    #: them as they are stored.
    held: int = 0
    #: The rows that the transaction that stored the tasks also claimed.
    claims: builtins.list[crud.Task] = field(default_factory=builtins.list)
    #: The tasks whose runs started from those claims; the caller does not queue them.
    started: set[str] = field(default_factory=set)

    def write(self, session: Session) -> builtins.list[crud.Task]:
        return crud.create_tasks(
            session,
            name=self.name,
            params=self.params,
            status=self.status,
            reason=self.reason,
        )


def _set_result(
    future: asyncio.Future[TaskStatus | None], status: TaskStatus | None
) -> None:
    if not future.done():
        future.set_result(status)


#: The maximum interval, lease or grace, in seconds (one year). The range
#: checks against it also reject NaN and infinity, which would stall the
#: upkeep loop or the claims.
_MAX_SECONDS = 365 * 24 * 3600.0

#: The maximum wait, in seconds, between two tries of a failing upkeep.
_MAX_UPKEEP_BACKOFF = 5.0

#: Requests that a timeout does not replace: the run ends as they ask.
_OUTRANKS_TIMEOUT = (ControlRequest.STOP, RunnerRequest.SUSPEND)

#: The status, history reason and values that an action gives a task that is not RUNNING.
_ACTION_RESULTS: dict[Action, tuple[TaskStatus, str, Mapping[str, Any]]] = {
    Action.START: (TaskStatus.PENDING, "started by request", {}),
    Action.RESUME: (TaskStatus.PENDING, "resumed by request", {}),
    Action.PAUSE: (TaskStatus.PAUSED, "paused by request", {}),
    Action.STOP: (
        TaskStatus.STOPPED,
        "stopped by request",
        {"control": None, "checkpoint": None},
    ),
    Action.RESTART: (TaskStatus.PENDING, "restarted by request", crud.RUN_RESET),
}
