"""Alembic's entry point for taskmill's migrations.

``Database.upgrade()`` (and so ``taskmill db upgrade``) runs them on a
connection that it has opened and locked, passed as ``connection``.
"""

from __future__ import annotations

from alembic import context

from taskmill.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "taskmill's migrations run through `taskmill db upgrade --db URL` or "
        "Database(url).upgrade(), not through the alembic command."
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite alters a table by copying it; batch mode does that for Alembic.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
