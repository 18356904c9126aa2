"""``Retry``: how many runs of a task may fail, and how long to wait between them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from taskmill.exceptions import PayloadTooLarge


@dataclass(frozen=True)
class Retry:
    """The retry policy of a task type, set as ``retry = Retry(...)`` on the class.

    A run fails when a hook raises or when its process dies (a crash, kill -9,
    out of memory). Each failure counts against ``max_attempts``. A run that
    is paused, stopped, or put back at shutdown does not count.

    Parameters
    ----------
    max_attempts:
        How many runs may fail before the task is FAILED for good. Runs that
        die with their process count too, so a task that crashes its process
        every time stops being resumed after this many tries.
    retry_on:
        Exception types that retry the task. Any other exception fails it at
        once. The default retries none: only crashed runs are retried.
    backoff:
        Seconds before the first retry.
    factor:
        The wait grows by this factor with each failure.
    max_backoff:
        The maximum wait before jitter, in seconds.
    jitter:
        Each wait is scaled by a random factor in ``[1 - jitter, 1 + jitter]``
        so that tasks that failed together do not retry together.
    """

    max_attempts: int = 5
    retry_on: tuple[type[BaseException], ...] = ()
    backoff: float = 1.0
    factor: float = 2.0
    max_backoff: float = 600.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(
                f"Retry.max_attempts must be at least 1, got {self.max_attempts!r}."
            )
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"Retry.{name} must be a finite number >= 0, got {value!r}."
                )
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(
                f"Retry.factor must be a finite number >= 1, got {self.factor!r}."
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"Retry.jitter must be in [0, 1), got {self.jitter!r}.")
        if isinstance(self.retry_on, type):
            # Retry(retry_on=ConnectionError) is an easy slip for a 1-tuple.
            object.__setattr__(self, "retry_on", (self.retry_on,))
        object.__setattr__(self, "retry_on", tuple(self.retry_on))
        for exc_type in self.retry_on:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise TypeError(
                    f"Retry.retry_on must contain exception classes, got {exc_type!r}."
                )

    def retries(self, exc: BaseException) -> bool:
        """Return whether a run that raised ``exc`` is retried (attempts permitting).

        A result or checkpoint over its size limit is not retried, even when
        ``retry_on`` covers it, because the next run would most likely build
        the same payload.
        """
        return isinstance(exc, self.retry_on) and not isinstance(exc, PayloadTooLarge)

    def delay(self, failures: int) -> float:
        """Return the seconds to wait after the ``failures``-th failed run."""
        exponent = max(failures - 1, 0)
        try:
            growth = self.factor**exponent
        except OverflowError:
            # A float cannot hold factor ** exponent: the wait is past any cap.
            growth = math.inf
        base = min(self.max_backoff, self.backoff * growth) if self.backoff else 0.0
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)
