from __future__ import annotations

from taskmill.cli import app

app(prog_name="taskmill")
