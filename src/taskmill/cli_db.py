"""``taskmill db``: migrate a database to the schema of this version of taskmill.

SQLite databases migrate themselves when a manager starts. A PostgreSQL
database that several machines share is migrated once, with
``taskmill db upgrade``, before the new version starts anywhere.
"""

from __future__ import annotations

import typer
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from taskmill.cli_tasks import DatabaseOption, _fail, _first_line
from taskmill.database import DEFAULT_DATABASE_URL, Database, display_url
from taskmill.migrations import HEAD_REVISION

app = typer.Typer(
    name="db",
    help="Migrate the task database's schema.",
    no_args_is_help=True,
)


@app.command()
def upgrade(db: DatabaseOption = DEFAULT_DATABASE_URL) -> None:
    """Migrate the database to this version's schema, keeping every task.

    Creates the tables in an empty database. Safe to run again, and from
    several machines at once.
    """
    database = _open(db)
    try:
        before = database.upgrade()
    except SQLAlchemyError as exc:
        _fail(f"Migrating {display_url(db)} failed: {_first_line(exc)}")
    finally:
        database.dispose()
    head = HEAD_REVISION
    if before == head:
        typer.echo(f"Database {display_url(db)} is already at revision {head}.")
    else:
        typer.echo(
            f"Database {display_url(db)} migrated from "
            f"{before or 'an empty database'} to revision {head}."
        )


@app.command()
def current(db: DatabaseOption = DEFAULT_DATABASE_URL) -> None:
    """Print the database's schema revision; exit 1 if it needs an upgrade."""
    database = _open(db)
    try:
        revision = database.revision()
    except SQLAlchemyError as exc:
        _fail(f"Reading {display_url(db)} failed: {_first_line(exc)}")
    finally:
        database.dispose()
    head = HEAD_REVISION
    typer.echo(f"Database revision: {revision or 'none (no taskmill tables)'}")
    typer.echo(f"This version needs: {head}")
    if revision != head:
        _fail(f"run `taskmill db upgrade --db {display_url(db)}` to migrate it.")


def _open(db: str) -> Database:
    try:
        return Database(db)
    except (ArgumentError, ImportError, ValueError) as exc:
        _fail(f"Cannot open database {display_url(db)!r}: {_first_line(exc)}")
