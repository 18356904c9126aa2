"""Every database read and write that taskmill makes.

Each function takes the session of the caller's transaction and never commits:
the caller's ``Database.write()`` block does, so a status change and its
history row always land together. Writes on behalf of a run carry its
``RunToken`` and only apply while that run still owns the task, so a run that
lost its task (suspended at shutdown, recovered elsewhere) cannot overwrite it.

Leases are set and compared with the database's clock (``database_now``),
never a runner's. On PostgreSQL, a new PENDING task and a new pause or stop
request also send a notification on the ``taskmill`` channel when their
transaction commits, so that idle runners wake at once.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

from sqlalchemy import (
    Float,
    Row,
    Table,
    Update,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter, ClauseElement

from taskmill.exceptions import InvalidTransition, TaskNotFound
from taskmill.models import BackgroundTaskModel, TaskEventModel, database_now, utcnow
from taskmill.status import INITIAL, ControlRequest, TaskStatus, is_allowed

#: The PostgreSQL channel that ``notify()`` sends on and runners listen to.
CHANNEL = "taskmill"

#: The ORM model of a task row, by a shorter name.
TaskRow = BackgroundTaskModel
_tasks = cast(Table, BackgroundTaskModel.__table__)
_events = cast(Table, TaskEventModel.__table__)

#: A task row as the hot paths return it: a plain row read back by RETURNING,
#: with the columns of ``TaskRow`` as attributes. The ORM's unit of work costs
#: several times more than the statement itself, so creating, claiming and
#: changing tasks use Core statements.
Task = Row[Any]

#: Columns that a fresh run starts without.
RUN_RESET: Mapping[str, Any] = MappingProxyType(
    {
        "progress": 0.0,
        "message": None,
        "checkpoint": None,
        "result": None,
        "error": None,
        "started_at": None,
        "finished_at": None,
        "control": None,
        "owner": None,
        "failures": 0,
        "lease_expires_at": None,
        "heartbeat_at": None,
        "run_after": None,
    }
)


@dataclass(frozen=True, slots=True)
class RunToken:
    """Identifies one run of a task: the runner that claimed it and the attempt."""

    owner: str
    attempt: int


class RunLost(Exception):
    """The run no longer owns its task; its writes were not applied."""


def create_task(
    session: Session,
    *,
    name: str,
    params: dict[str, Any],
    status: TaskStatus = TaskStatus.PENDING,
    reason: str = "created",
) -> Task:
    [task] = create_tasks(
        session, name=name, params=[params], status=status, reason=reason
    )
    return task


def create_tasks(
    session: Session,
    *,
    name: str,
    params: Sequence[dict[str, Any]],
    status: TaskStatus = TaskStatus.PENDING,
    reason: str = "created",
) -> list[Task]:
    """Store one task of type ``name`` for each of ``params``; return the rows in order."""
    if status not in INITIAL:
        raise ValueError(
            f"A task cannot be created as {status}; use PENDING or PAUSED."
        )
    if not params:
        return []
    now = utcnow()
    # Claims and lists order tasks by (created_at, id), and ids are random:
    # one microsecond between the tasks of a batch keeps them in its order.
    rows = [
        {
            "id": str(uuid.uuid4()),
            "name": name,
            "status": status,
            "params": task_params,
            "created_at": now + dt.timedelta(microseconds=index),
        }
        for index, task_params in enumerate(params)
    ]
    # One multi-row INSERT; the rows come back in the order of ``params``.
    tasks = list(session.execute(_INSERT_TASKS, rows))
    task_ids = [task.id for task in tasks]
    _add_events(session, task_ids, None, status, now, reason)
    if status == TaskStatus.PENDING:
        # One notification is enough for the batch, because a runner that
        # receives it claims as many due tasks as it has free workers.
        notify(session, "pending", task_ids[0])
    return tasks


def get_task(session: Session, task_id: str, *, for_update: bool = False) -> Task:
    """Return the task with ``task_id``; raise ``TaskNotFound`` if there is none."""
    task = find_task(session, task_id, for_update=for_update)
    if task is None:
        raise TaskNotFound(task_id)
    return task


def find_task(
    session: Session, task_id: str, *, for_update: bool = False
) -> Task | None:
    """Return the task with ``task_id``, or None if there is none."""
    statement = _LOCK_TASK if for_update else _READ_TASK
    return session.execute(statement, {"p_id": task_id}).one_or_none()


def list_tasks(
    session: Session,
    *,
    statuses: Sequence[TaskStatus] = (),
    name: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Task]:
    """Return tasks newest first, filtered by status and name."""
    statement = select(*_tasks.c)
    if statuses:
        statement = statement.where(_tasks.c.status.in_(statuses))
    if name is not None:
        statement = statement.where(_tasks.c.name == name)
    statement = statement.order_by(_tasks.c.created_at.desc(), _tasks.c.id.desc())
    return list(session.execute(statement.limit(limit).offset(offset)))


def list_events(session: Session, task_id: str) -> list[TaskEventModel]:
    """Return the history of a task, oldest first."""
    get_task(session, task_id)
    statement = (
        select(TaskEventModel)
        .where(TaskEventModel.task_id == task_id)
        .order_by(TaskEventModel.id)
    )
    return list(session.scalars(statement))


def list_unfinished(session: Session) -> list[tuple[str, str, TaskStatus]]:
    """Return id, name and status of every PENDING, RUNNING or PAUSED task, oldest first."""
    statement = (
        select(TaskRow.id, TaskRow.name, TaskRow.status)
        .where(
            TaskRow.status.in_(
                [TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.PAUSED]
            )
        )
        .order_by(TaskRow.created_at, TaskRow.id)
    )
    return [(row.id, row.name, row.status) for row in session.execute(statement)]


def claim_due(
    session: Session,
    *,
    names: Sequence[str],
    owner: str,
    limit: int,
    lease: float,
    reason: str,
) -> list[Task]:
    """Claim up to ``limit`` of the oldest due PENDING tasks of ``names`` for ``owner``.

    One UPDATE over a ``FOR UPDATE SKIP LOCKED`` selection: on PostgreSQL,
    runners that claim at the same time take different tasks instead of
    waiting for each other. SQLite has one writer at a time, so there the
    selection needs no lock.
    """
    if limit < 1 or not names:
        return []
    due = (
        select(_tasks.c.id)
        .where(
            _tasks.c.status == TaskStatus.PENDING.value,
            _tasks.c.name.in_(names),
            _is_due(),
        )
        .order_by(_tasks.c.created_at, _tasks.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    now = utcnow()
    statement = (
        update(_tasks)
        .where(_tasks.c.id.in_(due.scalar_subquery()))
        .values(_claim_values(owner, now, lease))
        .returning(*_tasks.c)
    )
    return _claimed(session, session.execute(statement), now, reason)


@dataclass(frozen=True, slots=True)
class RunningTask:
    """A RUNNING task with the columns that the search for lost runs reads."""

    id: str
    name: str
    owner: str | None
    lease_expires_at: dt.datetime | None
    #: The database's clock when the row was read, to compare the lease with.
    read_at: dt.datetime


def list_running(session: Session) -> list[RunningTask]:
    """Return every RUNNING task with its owner and lease."""
    statement = select(
        TaskRow.id,
        TaskRow.name,
        TaskRow.owner,
        TaskRow.lease_expires_at,
        database_now().label("read_at"),
    ).where(TaskRow.status == TaskStatus.RUNNING)
    return [
        RunningTask(row.id, row.name, row.owner, row.lease_expires_at, row.read_at)
        for row in session.execute(statement)
    ]


def read_clock(session: Session) -> dt.datetime:
    """Return the database's clock."""
    return session.execute(select(database_now())).scalar_one()


def renew_leases(session: Session, owner: str, *, lease: float) -> None:
    """Extend the lease of every run that ``owner`` holds.

    On PostgreSQL, a row that another transaction has locked is skipped
    until the next renewal, so one locked task cannot hold up the leases of
    the others.
    """
    owned = (
        select(_tasks.c.id)
        .where(
            _tasks.c.owner == owner,
            _tasks.c.status == TaskStatus.RUNNING.value,
        )
        .with_for_update(skip_locked=True)
    )
    statement = (
        update(_tasks)
        .where(_tasks.c.id.in_(owned.scalar_subquery()))
        .values(lease_expires_at=database_now(lease))
    )
    session.execute(statement)


def expire_leases(session: Session, owner: str) -> None:
    """End the leases that ``owner`` holds now, so another runner may take the runs."""
    statement = (
        update(_tasks)
        .where(
            _tasks.c.owner == owner,
            _tasks.c.status == TaskStatus.RUNNING.value,
        )
        .values(lease_expires_at=database_now())
    )
    session.execute(statement)


def change_status(
    session: Session,
    task_id: str,
    to: TaskStatus,
    *,
    reason: str,
    run: RunToken | None = None,
    values: Mapping[str, Any] | None = None,
) -> Task:
    """Move a task to ``to``, set ``values`` and write the history row.

    Raises ``InvalidTransition`` when the transition table does not allow the
    move, and ``RunLost`` when ``run`` no longer owns the task.
    """
    current = session.execute(_LOCK_STATUS, {"p_id": task_id}).one_or_none()
    if current is None:
        raise TaskNotFound(task_id)
    if run is not None and not _owns(current, run):
        raise RunLost(task_id)
    previous = current.status
    if not is_allowed(previous, to):
        raise InvalidTransition(task_id, previous, to)
    now = utcnow()
    values = dict(values or {})
    if to != TaskStatus.RUNNING:
        # Only a RUNNING task has an owner that holds a lease.
        values.setdefault("lease_expires_at", None)
    task = _update_task(session, task_id, {"status": to, **values})
    assert task is not None, "the row is locked since it was read"
    _add_event(session, task_id, previous, to, now, reason)
    if to == TaskStatus.PENDING and values.get("run_after") is None:
        notify(session, "pending", task_id)
    return task


def end_run(
    session: Session,
    task_id: str,
    run: RunToken,
    to: TaskStatus,
    *,
    reason: str,
    values: Mapping[str, Any],
) -> None:
    """Move a task from RUNNING to ``to`` for its current run, with its history row.

    It does what ``change_status()`` does for a run, in one UPDATE that
    checks the ownership itself instead of reading the row first. Raises ``RunLost``,
    having written nothing, when ``run`` no longer owns the task.
    """
    if not is_allowed(TaskStatus.RUNNING, to) or to == TaskStatus.RUNNING:
        raise InvalidTransition(task_id, TaskStatus.RUNNING, to)
    now = utcnow()
    values = {"lease_expires_at": None, **values, "status": to}
    if _update_task(session, task_id, values, run) is None:
        raise RunLost(task_id)
    _add_event(session, task_id, TaskStatus.RUNNING, to, now, reason)
    if to == TaskStatus.PENDING and values.get("run_after") is None:
        notify(session, "pending", task_id)


def set_control(session: Session, task_id: str, request: ControlRequest | None) -> Task:
    """Store (or clear) the pause or stop request of a task."""
    statement = (
        update(_tasks)
        .where(_tasks.c.id == task_id)
        .values(control=request, updated_at=database_now())
        .returning(*_tasks.c)
    )
    task = session.execute(statement).one_or_none()
    if task is None:
        raise TaskNotFound(task_id)
    if request is not None:
        notify(session, f"control {request.value}", task_id)
    return task


def claim_task(
    session: Session, task_id: str, owner: str, *, reason: str, lease: float
) -> Task | None:
    """Move a PENDING task to RUNNING for ``owner``, with a lease of ``lease`` seconds.

    Returns None if the task is not PENDING, or waits for the backoff of a
    retry. The claim is one conditional UPDATE, so two runners cannot both win it.
    """
    claimed = claim_tasks(session, [task_id], owner, reason=reason, lease=lease)
    return claimed[0] if claimed else None


def claim_tasks(
    session: Session,
    task_ids: Sequence[str],
    owner: str,
    *,
    reason: str,
    lease: float,
) -> list[Task]:
    """Claim those of ``task_ids`` that are PENDING and due, in one UPDATE.

    Returns the claimed rows in no particular order. The others are left as
    they are, as ``claim_task()`` leaves a task that it cannot claim.
    """
    if not task_ids:
        return []
    now = utcnow()
    parameters = {
        "p_ids": list(task_ids),
        "p_owner": owner,
        "p_now": now,
        "p_lease": float(lease),
    }
    return _claimed(session, session.execute(_CLAIM_TASKS, parameters), now, reason)


def _claimed(
    session: Session, rows: Iterable[Task], now: dt.datetime, reason: str
) -> list[Task]:
    """Write the history rows of the tasks that a claim returned; return them."""
    tasks = list(rows)
    _add_events(
        session,
        [task.id for task in tasks],
        TaskStatus.PENDING,
        TaskStatus.RUNNING,
        now,
        reason,
    )
    return tasks


def save_checkpoint(
    session: Session,
    task_id: str,
    run: RunToken,
    *,
    checkpoint: Any,
    progress: float,
    message: str | None,
) -> ControlRequest | None:
    """Store the resumable state and progress of a run; return its pending request.

    Raises ``RunLost`` when the run no longer owns the task.
    """
    now = utcnow()
    statement = (
        update(_tasks)
        .where(_owned_by(run, task_id))
        .values(
            checkpoint=checkpoint,
            progress=progress,
            message=message,
            heartbeat_at=now,
            updated_at=database_now(),
        )
        .returning(_tasks.c.control)
    )
    row = session.execute(statement).one_or_none()
    if row is None:
        raise RunLost(task_id)
    control: ControlRequest | None = row.control
    return control


def save_progress(
    session: Session, updates: Iterable[tuple[str, RunToken, float, str | None]]
) -> None:
    """Store the progress of several runs in one statement per run.

    Runs that lost their task are skipped; their next checkpoint raises ``RunLost``.
    """
    now = utcnow()
    for task_id, run, progress, message in updates:
        session.execute(
            update(_tasks)
            .where(_owned_by(run, task_id))
            .values(
                progress=progress,
                message=message,
                heartbeat_at=now,
                updated_at=database_now(),
            )
        )


def get_controls(
    session: Session, task_ids: Sequence[str]
) -> dict[str, ControlRequest]:
    """Return the pending requests of those tasks that have one."""
    if not task_ids:
        return {}
    statement = select(TaskRow.id, TaskRow.control).where(
        TaskRow.id.in_(task_ids), TaskRow.control.is_not(None)
    )
    return {row.id: row.control for row in session.execute(statement)}


def add_warning(session: Session, task_id: str, reason: str) -> None:
    """Write a warning into a task's history, under its current status."""
    status = session.execute(
        select(_tasks.c.status).where(_tasks.c.id == task_id)
    ).scalar_one_or_none()
    if status is None:
        raise TaskNotFound(task_id)
    session.execute(
        insert(_events).values(
            task_id=task_id,
            from_status=status,
            to_status=status,
            at=utcnow(),
            reason=reason,
            kind="warning",
        )
    )


def notify(session: Session, event: str, task_id: str) -> None:
    """Send ``"<event> <task_id>"`` on ``CHANNEL`` when the transaction commits.

    ``event`` is ``pending``, or ``control`` and the request (``control PAUSE``).

    PostgreSQL only; elsewhere runners find changes by polling.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(CHANNEL, f"{event} {task_id}")))


def _is_due() -> Any:
    """True for a task with no retry backoff, or one whose backoff has passed."""
    return or_(_tasks.c.run_after.is_(None), _tasks.c.run_after <= database_now())


def _claim_values(owner: str, now: dt.datetime, lease: float) -> dict[str, Any]:
    """Return the columns that a claim sets."""
    return {
        "status": TaskStatus.RUNNING,
        "owner": owner,
        "attempts": _tasks.c.attempts + 1,
        "lease_expires_at": database_now(lease),
        "heartbeat_at": now,
        "run_after": None,
        "started_at": now,
        "finished_at": None,
        "updated_at": database_now(),
    }


@contextmanager
def history_together(session: Session) -> Iterator[None]:
    """Insert the history rows that the block writes in one statement at its end.

    For a transaction that changes many tasks: one multi-row INSERT costs
    about as much as a single row. The rows keep their order, so each task's
    history stays in the order of its changes.
    """
    rows: list[dict[str, Any]] = []
    session.info[_HISTORY] = rows
    try:
        yield
    finally:
        del session.info[_HISTORY]
    if rows:
        session.execute(_INSERT_EVENT, rows)


def _add_event(
    session: Session,
    task_id: str,
    from_status: TaskStatus | None,
    to_status: TaskStatus,
    at: dt.datetime,
    reason: str,
) -> None:
    _add_events(session, [task_id], from_status, to_status, at, reason)


def _add_events(
    session: Session,
    task_ids: Sequence[str],
    from_status: TaskStatus | None,
    to_status: TaskStatus,
    at: dt.datetime,
    reason: str,
) -> None:
    """Write the same history row for several tasks in one statement."""
    if not task_ids:
        return
    rows = [
        {
            "task_id": task_id,
            "from_status": from_status,
            "to_status": to_status,
            "at": at,
            "reason": reason,
        }
        for task_id in task_ids
    ]
    pending = session.info.get(_HISTORY)
    if pending is not None:
        pending.extend(rows)
    else:
        session.execute(_INSERT_EVENT, rows[0] if len(rows) == 1 else rows)


def _owns(task: Any, run: RunToken) -> bool:
    return bool(
        task.status == TaskStatus.RUNNING
        and task.owner == run.owner
        and task.attempts == run.attempt
    )


def _owned_by(run: RunToken, task_id: str) -> Any:
    return and_(
        _tasks.c.id == task_id,
        _tasks.c.status == TaskStatus.RUNNING.value,
        _tasks.c.owner == run.owner,
        _tasks.c.attempts == run.attempt,
    )


def _update_task(
    session: Session,
    task_id: str,
    values: Mapping[str, Any],
    run: RunToken | None = None,
) -> Row[Any] | None:
    """Set ``values`` on a task, for ``run`` only while it owns the task.

    Returns the row, or with ``run`` its id alone, and None if no row matched.
    Values that are SQL expressions, such as ``TaskRow.recoveries + 1``, are
    added to the prebuilt statement.
    """
    plain = {k: v for k, v in values.items() if not isinstance(v, ClauseElement)}
    statement = _update_statement(frozenset(plain), owned=run is not None)
    if len(plain) < len(values):
        statement = statement.values(
            {k: v for k, v in values.items() if k not in plain}
        )
    parameters = {f"p_{key}": value for key, value in plain.items()}
    parameters["p_id"] = task_id
    if run is not None:
        parameters.update(p_run_owner=run.owner, p_run_attempt=run.attempt)
    return session.execute(statement, parameters).one_or_none()


@functools.lru_cache(maxsize=128)
def _update_statement(columns: frozenset[str], *, owned: bool = False) -> Update:
    """Return an UPDATE of a task by id that sets ``columns``.

    With ``owned``, only while the run given by ``p_run_owner`` and
    ``p_run_attempt`` owns the task, returning the id; otherwise returning
    the row. Built once for each set of columns, so that SQLAlchemy finds the
    compiled form in its cache without building the statement and its cache
    key again.
    """
    statement = update(_tasks).values(
        {
            **{name: _bind(name) for name in sorted(columns)},
            "updated_at": database_now(),
        }
    )
    if not owned:
        return statement.where(_tasks.c.id == bindparam("p_id")).returning(*_tasks.c)
    return statement.where(
        _tasks.c.id == bindparam("p_id"),
        _tasks.c.status == TaskStatus.RUNNING.value,
        _tasks.c.owner == bindparam("p_run_owner"),
        _tasks.c.attempts == bindparam("p_run_attempt"),
    ).returning(_tasks.c.id)


def _bind(column: str) -> BindParameter[Any]:
    return bindparam(f"p_{column}", type_=_tasks.c[column].type)


# Statements of the hot paths, built once with named parameters (``p_...``).

#: Parameters: one dict per task with ``id``, ``name``, ``status``, ``params``
#: and ``created_at``. Client-side ids let SQLAlchemy return the rows in the
#: order of the parameters.
_INSERT_TASKS = (
    insert(_tasks)
    .values(
        progress=0.0,
        attempts=0,
        recoveries=0,
        failures=0,
        updated_at=database_now(),
    )
    .returning(*_tasks.c, sort_by_parameter_order=True)
)

_INSERT_EVENT = insert(_events)

#: The key in ``Session.info`` of the history rows that ``history_together()`` collects.
_HISTORY = "taskmill_history"

_READ_TASK = select(*_tasks.c).where(_tasks.c.id == bindparam("p_id"))

_LOCK_TASK = _READ_TASK.with_for_update()

_LOCK_STATUS = (
    select(_tasks.c.status, _tasks.c.owner, _tasks.c.attempts)
    .where(_tasks.c.id == bindparam("p_id"))
    .with_for_update()
)

_CLAIM_TASKS = (
    update(_tasks)
    .where(
        _tasks.c.id.in_(bindparam("p_ids", expanding=True)),
        _tasks.c.status == TaskStatus.PENDING.value,
        _is_due(),
    )
    .values(
        status=TaskStatus.RUNNING,
        owner=_bind("owner"),
        attempts=_tasks.c.attempts + 1,
        lease_expires_at=database_now(bindparam("p_lease", type_=Float())),
        heartbeat_at=bindparam("p_now", type_=_tasks.c.heartbeat_at.type),
        run_after=None,
        started_at=bindparam("p_now", type_=_tasks.c.started_at.type),
        finished_at=None,
        updated_at=database_now(),
    )
    .returning(*_tasks.c)
)
