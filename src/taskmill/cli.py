"""The ``taskmill`` command line."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer
import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from taskmill.database import DEFAULT_DATABASE_URL, Database
from taskmill.demo import DATABASE_URL_VARIABLE

app = typer.Typer(help="Durable background tasks for FastAPI.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Durable background tasks for FastAPI."""


@app.command()
def serve(
    db: Annotated[
        str,
        typer.Option(
            envvar=DATABASE_URL_VARIABLE, help="SQLAlchemy URL of the task database."
        ),
    ] = DEFAULT_DATABASE_URL,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
) -> None:
    """Serve the demo app with the example tasks (countdown, directory_digest)."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _check_database(db)
    os.environ[DATABASE_URL_VARIABLE] = db
    typer.echo(f"taskmill demo: API docs at http://{host}:{port}/docs, database {db}")
    uvicorn.run(
        "taskmill.demo:create_app",
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
    )


def _check_database(url: str) -> None:
    """Open the database once, so that a bad ``--db`` fails with one clear line."""
    try:
        database = Database(url)
        try:
            database.create_schema()
        finally:
            database.dispose()
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise typer.BadParameter(
            f"cannot open database {url!r}: {reason}. Pass a SQLAlchemy URL of a "
            "database that exists or can be created, e.g. sqlite:///./taskmill.db.",
            param_hint="--db",
        ) from exc
