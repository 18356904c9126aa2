"""Run taskmill's benchmarks and store the median of each figure.

From the repository root, with taskmill installed in the virtual environment::

    .venv/bin/python bench/run.py                  # all benchmarks, 3 repeats
    .venv/bin/python bench/run.py --quick          # tiny sizes, 1 repeat: a smoke run
    .venv/bin/python bench/run.py --only pause --repeat 5

Each benchmark runs ``--repeat`` times. The table shows the median, min and
max of each figure over the repeats, and the medians go to bench/results.json
(or ``--output``) as one flat JSON object, with a ``meta`` entry that
describes the run. docs/benchmarks.md explains the figures.

To add a benchmark, write a module whose ``BENCHMARK`` is a
``bench.common.Benchmark`` and list it in ``BENCHMARK_MODULES``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script, Python puts bench/ on the path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Benchmark, Figures

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Modules that define a ``BENCHMARK``, in the order they run.
BENCHMARK_MODULES = (
    "bench.throughput",
    "bench.latency",
    "bench.scale",
    "bench.pause",
    "bench.postgres",
)
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results.json"
DEFAULT_REPEAT = 3


def load_benchmarks() -> dict[str, Benchmark]:
    benchmarks: dict[str, Benchmark] = {}
    for module_name in BENCHMARK_MODULES:
        benchmark = importlib.import_module(module_name).BENCHMARK
        if not isinstance(benchmark, Benchmark):
            raise TypeError(f"{module_name}.BENCHMARK is not a bench.common.Benchmark.")
        benchmarks[benchmark.name] = benchmark
    return benchmarks


def parse_args(
    argv: Sequence[str] | None, benchmarks: dict[str, Benchmark]
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run taskmill's benchmarks and write the median figures as JSON."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and 1 repeat (unless --repeat is given): a smoke run",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        metavar="N",
        help=f"how many times to run each benchmark ({DEFAULT_REPEAT}; 1 with --quick)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(benchmarks),
        metavar="NAME",
        help="run only this benchmark; may repeat. Benchmarks: "
        + "; ".join(f"{item.name}: {item.description}" for item in benchmarks.values()),
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="PATH",
        help="where to write the medians (bench/results.json)",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else DEFAULT_REPEAT
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    return args


def run_benchmark(benchmark: Benchmark, *, quick: bool, repeat: int) -> list[Figures]:
    """Measure ``repeat`` times; return the figures of each repeat."""
    sizes = benchmark.quick_sizes if quick else benchmark.sizes
    runs: list[Figures] = []
    for index in range(1, repeat + 1):
        started = time.monotonic()
        runs.append(benchmark.measure(sizes))
        elapsed = time.monotonic() - started
        print(
            f"{benchmark.name}: repeat {index}/{repeat} took {elapsed:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return runs


def summarize(runs: list[Figures]) -> dict[str, tuple[float, float, float]]:
    """Return the median, min and max of each figure over the repeats."""
    summary = {}
    for key in runs[0]:
        values = [figures[key] for figures in runs]
        summary[key] = (statistics.median(values), min(values), max(values))
    return summary


def print_table(summary: dict[str, tuple[float, float, float]], repeat: int) -> None:
    width = max([len("figure"), *(len(key) for key in summary)])
    print(f"{'figure':<{width}}  {'median':>10}  {'min':>10}  {'max':>10}")
    for key, (median, low, high) in summary.items():
        print(f"{key:<{width}}  {median:>10.2f}  {low:>10.2f}  {high:>10.2f}")
    print(f"({repeat} repeat{'s' if repeat != 1 else ''} of each benchmark)")


def describe_run(
    selected: Sequence[Benchmark], *, quick: bool, repeat: int
) -> dict[str, Any]:
    """Return the ``meta`` entry: when, on what and at which sizes the figures were taken."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        # Taken before the benchmarks start: other processes that run beside
        # them slow the figures down.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "taskmill": describe_source(),
        "quick": quick,
        "repeat": repeat,
        "sizes": {
            benchmark.name: dict(benchmark.quick_sizes if quick else benchmark.sizes)
            for benchmark in selected
        },
    }


def describe_source() -> dict[str, Any]:
    """Return where taskmill was imported from and the git commit of that tree.

    ``modified`` is True when the package's files differ from that commit,
    and None (as is ``commit``) outside a git work tree.
    """
    import taskmill

    package = Path(taskmill.__file__).resolve().parent
    commit = _git(package, "rev-parse", "--short", "HEAD")
    changes = _git(package, "status", "--porcelain", "--", ".")
    return {
        "path": str(package),
        "commit": commit,
        "modified": None if changes is None else bool(changes),
    }


def _git(directory: Path, *arguments: str) -> str | None:
    try:
        completed = subprocess.run(
            ["git", "-C", str(directory), *arguments],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    benchmarks = load_benchmarks()
    args = parse_args(argv, benchmarks)
    names = args.only or list(benchmarks)
    selected = [benchmarks[name] for name in dict.fromkeys(names)]

    meta = describe_run(selected, quick=args.quick, repeat=args.repeat)
    summary: dict[str, tuple[float, float, float]] = {}
    for benchmark in selected:
        runs = run_benchmark(benchmark, quick=args.quick, repeat=args.repeat)
        summary |= summarize(runs)
    print_table(summary, args.repeat)

    results: dict[str, Any] = {
        key: round(median, 3) for key, (median, _, _) in summary.items()
    }
    results["meta"] = meta
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
