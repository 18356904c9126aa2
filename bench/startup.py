"""Start a TaskManager in a fresh process; print its startup time and memory as JSON.

``bench/scale.py`` runs it, so that the memory it reads is that of a process
that did nothing but import taskmill and start a manager::

    python bench/startup.py sqlite:////tmp/x/scale.db --max-workers 4

It registers ``bench.tasks.NoOp``, times ``TaskManager(...)``, ``register()``
and ``startup()`` together, reads the resident set size (RSS) from
/proc/self/status before and after, prints one JSON object on stdout and
shuts the manager down.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Run as a script, Python puts bench/ on the path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tasks import NoOp
from taskmill import TaskManager


def resident_memory_mib() -> float:
    """Return this process's resident set size (VmRSS) in MiB; Linux only."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                kib = int(line.split()[1])
                return kib / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", help="SQLAlchemy URL of the database")
    parser.add_argument(
        "--max-workers", type=int, default=4, help="tasks that run at once (4)"
    )
    args = parser.parse_args(argv)

    rss_before = resident_memory_mib()
    started = time.perf_counter()
    manager = TaskManager(args.database, max_workers=args.max_workers)
    manager.register(NoOp)
    manager.startup()
    elapsed = time.perf_counter() - started
    try:
        report = {
            "startup_s": elapsed,
            "rss_before_mib": rss_before,
            "rss_mib": resident_memory_mib(),
            "tracked_tasks": len(manager.live_task_ids()),
        }
        print(json.dumps(report), flush=True)
    finally:
        manager.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
