"""Alembic migrations of taskmill's schema, one module per revision in versions/."""

from __future__ import annotations

#: The revision that this version of taskmill works with: the newest one in
#: versions/. A test checks that the two agree.
HEAD_REVISION = "0001"
