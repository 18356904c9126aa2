"""Runner ids, the check that another runner's run is lost, and taking such a run back.

A runner id is ``host:pid:random``. The host part names the machine and,
on Linux, the PID namespace, so that a runner can check whether a process
of the same host is still alive. Runners on other hosts are judged by their
lease alone.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from typing import Any

from sqlalchemy.orm import Session

from taskmill import crud
from taskmill.models import utcnow
from taskmill.outcome import Outcome, error_record
from taskmill.status import TaskStatus
from taskmill.task import BaseTask

logger = logging.getLogger(__name__)


def _host_key() -> str:
    host = socket.gethostname()[:32] or "localhost"
    try:
        # Containers on one machine may share a hostname; their PID
        # namespaces differ, and a PID means something only inside its own.
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return host
    return f"{host}~{namespace:x}"


_HOST_KEY = _host_key()


def new_runner_id() -> str:
    """Return a new runner id for a manager of this process."""
    return f"{_HOST_KEY}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def process_is_gone(runner_id: str | None) -> bool:
    """Return True when ``runner_id`` names a process of this host that has exited.

    False means alive or unknown: another host, another id format, or this
    very process (whose earlier managers may still run).
    """
    if runner_id is None:
        return True
    parts = runner_id.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != _HOST_KEY or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        # PermissionError: the process exists under another user.
        return False
    return False


def lease_lost(
    owner: str | None, lease_expires_at: dt.datetime | None, now: dt.datetime
) -> str | None:
    """Return why a RUNNING task's run is lost, or None while its owner keeps its lease.

    ``now`` and the stored expiry both come from the database's clock, so
    the clocks of the runners' hosts do not matter.
    """
    if process_is_gone(owner):
        return "its process is gone"
    if lease_expires_at is None:
        # Rows written before leases existed.
        return "it held no lease"
    if lease_expires_at <= now:
        return f"its lease expired at {lease_expires_at.isoformat(timespec='seconds')}"
    return None


def recover(
    session: Session,
    seen: crud.RunningTask,
    task_class: type[BaseTask[Any]],
    lost: str,
) -> tuple[TaskStatus, dt.datetime | None] | None:
    """Take back a RUNNING task whose runner is gone or whose lease expired.

    ``seen`` is the row as it was read before this write transaction. If the
    run changed since (it ended, or its owner renewed the lease), nothing is
    written and None is returned. Otherwise returns the new status and, for a
    task that waits for its retry backoff, when it may run.
    """
    task = crud.get_task(session, seen.id, for_update=True)
    if (
        task.status != TaskStatus.RUNNING
        or task.owner != seen.owner
        or lease_lost(task.owner, task.lease_expires_at, crud.read_clock(session))
        is None
    ):
        return None
    failures = task.failures + 1
    policy = task_class.retry
    was = (
        f"interrupted: runner {task.owner} ended during attempt {task.attempts} "
        f"({lost}) at {task.progress:g} %"
    )
    values: dict[str, Any] = {
        "owner": None,
        "control": None,
        "recoveries": task.recoveries + 1,
        "failures": failures,
    }
    outcome = Outcome(TaskStatus.PENDING, was, values).honouring(task.control)
    if outcome.status == TaskStatus.PENDING and not task_class.resumable:
        outcome = _interrupted(was, "the task type is not resumable", values)
    elif outcome.status == TaskStatus.PENDING and failures >= policy.max_attempts:
        detail = (
            f"exceeded max attempts ({policy.max_attempts}), last attempt interrupted"
        )
        outcome = _interrupted(was, detail, values)
    elif outcome.status == TaskStatus.PENDING:
        delay = policy.delay(failures)
        values["run_after"] = utcnow() + dt.timedelta(seconds=delay)
        reason = f"{was}; resumes from its last checkpoint in {delay:.1f} s"
        outcome = Outcome(TaskStatus.PENDING, reason, values)
    crud.change_status(
        session, task.id, outcome.status, reason=outcome.reason, values=outcome.values
    )
    level = logging.ERROR if outcome.status == TaskStatus.FAILED else logging.WARNING
    logger.log(
        level,
        "Task %s (%s) %s",
        task.id,
        task.name,
        outcome.reason,
        extra={"event": "task.recovered", "task_id": task.id, "task_name": task.name},
    )
    return outcome.status, outcome.values.get("run_after")


def _interrupted(was: str, detail: str, values: dict[str, Any]) -> Outcome:
    """Return the FAILED outcome of an interrupted run that must not run again."""
    reason = f"{was}; {detail}"
    error = {**error_record(RuntimeError(reason), "recovery"), "type": "Interrupted"}
    values = values | {"error": error, "finished_at": utcnow()}
    return Outcome(TaskStatus.FAILED, reason, values)
