"""Example task types that the demo app registers."""

from __future__ import annotations

from taskmill.examples.countdown import Countdown
from taskmill.examples.digest import DirectoryDigest

__all__ = ["Countdown", "DirectoryDigest"]
