"""The shape of a benchmark module, and helpers that several benchmarks use.

A benchmark module defines ``BENCHMARK``, a ``Benchmark`` whose ``measure``
function takes the size settings and returns its figures by key. bench/run.py
repeats it, prints the median, min and max of each figure and stores the
medians.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Size settings by name, e.g. ``{"pauses": 200}``.
Sizes = Mapping[str, int]
#: Measured figures by key; the key ends with its unit, e.g. ``pause_p99_ms``.
Figures = dict[str, float]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark that bench/run.py can select by name and repeat."""

    name: str
    description: str
    #: Sizes of a full run: the figures in docs/benchmarks.md use these.
    sizes: Sizes
    #: Sizes of a ``--quick`` smoke run, which takes a few seconds.
    quick_sizes: Sizes
    #: The function that measures once at the given sizes and returns the figures.
    measure: Callable[[Sizes], Figures]


def percentile(samples: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile (0 to 100) of ``samples``.

    Interpolates linearly between the two nearest ranks, as NumPy's default
    method does, so p99 of 200 samples lies between the 198th and the 199th
    smallest value.
    """
    if not samples:
        raise ValueError("Cannot take a percentile of no samples.")
    if not 0 <= q <= 100:
        raise ValueError(f"Percentile must be between 0 and 100, got {q!r}.")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    fraction = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * fraction


def tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file, or why it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read the log: {exc})"
    return "\n".join(text.splitlines()[-lines:])
