"""Runner ids, and how a runner tells that another runner's run is lost.

A runner id is ``host:pid:random``. The host part names the machine and,
on Linux, the PID namespace, so that a runner can check whether a process
of the same host is still alive. Runners on other hosts are judged by their
lease alone.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid


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
    """Return why a RUNNING task's run is lost, or None while its owner holds it.

    NOTE: ``now`` and the stored expiry come from the clocks of the runners'
    hosts, not the database's, so runners on several hosts need synchronised
    clocks.
    """
    if process_is_gone(owner):
        return "its process is gone"
    if lease_expires_at is None:
        # Rows written before leases existed.
        return "it held no lease"
    if lease_expires_at <= now:
        return f"its lease expired at {lease_expires_at.isoformat(timespec='seconds')}"
    return None
