"""The ``taskmill`` command line: ``serve``, ``worker``, ``tasks`` and ``db``.

``serve`` runs the demo app, ``worker`` runs tasks, ``tasks`` lists,
shows, controls and watches the tasks of a database, and ``db`` migrates it.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import math
import os
import signal
import sys
import threading
import time
from types import FrameType, ModuleType
from typing import Annotated, Any

import typer
import uvicorn
import uvicorn.config
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette

from taskmill import cli_db, cli_tasks
from taskmill.api_key import API_KEY_HEADER, API_KEY_VARIABLE, api_key_from_environment
from taskmill.database import DEFAULT_DATABASE_URL, Database, display_url
from taskmill.demo import (
    CONCURRENCY_VARIABLE,
    DATABASE_URL_VARIABLE,
    DEFAULT_CONCURRENCY,
    create_manager,
)
from taskmill.exceptions import SchemaOutOfDate
from taskmill.manager import TaskManager

logger = logging.getLogger(__name__)

# rich_markup_mode=None: plain click output, so that an error stays on one line
# instead of being wrapped inside a panel at the terminal's width.
app = typer.Typer(
    help="Durable background tasks for FastAPI.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = tuple(uvicorn.config.LOG_LEVELS)
APP_FORMS = (
    "a TaskManager, a FastAPI app whose app.state.manager is a TaskManager, "
    "or a function with no arguments that returns one of them"
)
#: Seconds between checks of the stop flag that the signal handlers set.
SIGNAL_POLL_INTERVAL = 0.1
#: Seconds that ``serve`` waits for open connections when it stops, before it
#: closes them and shuts the manager down. uvicorn runs the app's lifespan
#: shutdown only after every connection has closed. The demo app ends its
#: event streams on SIGINT and SIGTERM, and this bounds the wait for any
#: other connection.
SERVE_CONNECTION_GRACE = 3

LogLevelOption = Annotated[
    str,
    typer.Option(
        metavar="LEVEL", help=f"Logging level, one of {', '.join(LOG_LEVELS)}."
    ),
]


app.add_typer(cli_tasks.app)
app.add_typer(cli_db.app)


@app.callback()
def main() -> None:
    """Durable background tasks for FastAPI."""


@app.command()
def serve(
    db: Annotated[
        str,
        typer.Option(
            envvar=DATABASE_URL_VARIABLE,
            metavar="URL",
            help="SQLAlchemy URL of the task database.",
        ),
    ] = DEFAULT_DATABASE_URL,
    host: Annotated[
        str, typer.Option(metavar="HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(metavar="PORT", help="TCP port to listen on.")
    ] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Number of web server processes, 1 or more. They share the port "
            "and the database.",
        ),
    ] = 1,
    concurrency: Annotated[
        int,
        typer.Option(
            envvar=CONCURRENCY_VARIABLE,
            metavar="N",
            help="Maximum number of tasks that each web process runs at once. "
            "0 makes the web processes store and control tasks but run none, "
            "so that `taskmill worker` processes on the same database run them.",
        ),
    ] = DEFAULT_CONCURRENCY,
    log_level: LogLevelOption = "info",
) -> None:
    """Serve the demo app with the example tasks (countdown, directory_digest)."""
    level = _check_log_level(log_level)
    if workers < 1:
        raise typer.BadParameter(
            f"the number of web processes must be 1 or more, got {workers}.",
            param_hint=["--workers"],
        )
    if concurrency < 0:
        raise typer.BadParameter(
            f"the number of tasks run at once must be 0 or more, got {concurrency}. "
            "Pass 0 for web processes that run no tasks.",
            param_hint=["--concurrency"],
        )
    try:
        api_key_required = api_key_from_environment() is not None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=[API_KEY_VARIABLE]) from exc
    if api_key_required and level == "trace":
        # uvicorn logs each request's scope at trace level before the app
        # removes the key from the query string of the stream endpoints.
        raise typer.BadParameter(
            f"trace logging writes each request's query string, which carries the "
            f"key of the dashboard's streams, to the log; use debug or a higher "
            f"level while {API_KEY_VARIABLE} is set.",
            param_hint=["--log-level"],
        )
    _check_database(db)
    # The app factory reads both variables, in this process or, with
    # --workers above 1, in each process that uvicorn starts.
    os.environ[DATABASE_URL_VARIABLE] = db
    os.environ[CONCURRENCY_VARIABLE] = str(concurrency)
    typer.echo(_serve_banner(db, host, port, workers, concurrency, api_key_required))
    uvicorn.run(
        "taskmill.demo:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=level,
        log_config=_uvicorn_log_config(level),
        timeout_graceful_shutdown=SERVE_CONNECTION_GRACE,
    )


@app.command()
def worker(
    app_path: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:ATTRIBUTE",
            help=f"The task manager to run: {APP_FORMS}. The module is imported "
            "from the current directory or sys.path; the app's lifespan does not "
            "run. Without --app, the worker runs the demo's example tasks.",
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="SQLAlchemy URL of the task database of the demo's example tasks; "
            "not allowed with --app, whose manager has its own database. Default: "
            f"the {DATABASE_URL_VARIABLE} variable, else {DEFAULT_DATABASE_URL}.",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Maximum number of tasks that this process runs at once, 1 or "
            "more. Default: the manager's max_workers (for the demo, the "
            f"{CONCURRENCY_VARIABLE} variable, else {DEFAULT_CONCURRENCY}).",
        ),
    ] = None,
    grace: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Seconds that shutdown waits for running tasks to reach a "
            "checkpoint before it puts them back to PENDING regardless. "
            "Default: the manager's shutdown_grace.",
        ),
    ] = None,
    log_level: LogLevelOption = "info",
) -> None:
    """Run tasks without serving HTTP, until SIGTERM or SIGINT (Ctrl-C).

    The worker runs the PENDING tasks of the database, including those created
    through web processes that run none (`taskmill serve --concurrency 0`). On
    SIGTERM or SIGINT, running tasks stop at their next checkpoint and go back
    to PENDING, so that the next worker resumes them. A task that reaches no
    checkpoint within --grace seconds goes back regardless. A second SIGTERM
    or SIGINT during that shutdown is logged and otherwise ignored, because
    the shutdown ends by itself soon after the grace. The exit status is 0
    after a shutdown.
    """
    level = _check_log_level(log_level)
    if concurrency is not None and concurrency < 1:
        raise typer.BadParameter(
            f"the number of tasks run at once must be 1 or more, got {concurrency}.",
            param_hint=["--concurrency"],
        )
    if grace is not None and not (math.isfinite(grace) and grace >= 0):
        raise typer.BadParameter(
            f"the shutdown grace must be a number of seconds, 0 or more, got {grace}.",
            param_hint=["--grace"],
        )
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    manager = _worker_manager(app_path, db)
    if concurrency is not None:
        manager.max_workers = concurrency
    if grace is not None:
        manager.shutdown_grace = grace
    if manager.max_workers < 1:
        # The manager was built to run no tasks, e.g. for web processes.
        raise typer.BadParameter(
            f"the manager runs no tasks (max_workers is {manager.max_workers}). "
            "Pass --concurrency N to run up to N tasks at once.",
            param_hint=["--app"] if app_path is not None else [CONCURRENCY_VARIABLE],
        )
    _run_worker(manager)


def _worker_manager(app_path: str | None, db: str | None) -> TaskManager:
    """Return the manager that ``--app`` names, or the demo's on ``--db``."""
    if app_path is not None:
        if db is not None:
            raise typer.BadParameter(
                "cannot be combined with --app, because the manager that --app "
                "names has its own database. Leave out --db, or set the database "
                "where that manager is built.",
                param_hint=["--db"],
            )
        return load_manager(app_path)
    url = db or os.environ.get(DATABASE_URL_VARIABLE) or DEFAULT_DATABASE_URL
    _check_database(url)
    try:
        return create_manager(url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=[CONCURRENCY_VARIABLE]) from exc


def _run_worker(manager: TaskManager) -> None:
    """Start ``manager``, wait for SIGTERM or SIGINT, then shut it down."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            logger.warning(
                "Worker %s received %s again while stopping; the shutdown continues "
                "and ends soon after its grace of %s s",
                manager.runner_id,
                name,
                manager.shutdown_grace,
                extra={
                    "event": "worker.signal_ignored",
                    "runner_id": manager.runner_id,
                },
            )
            return
        logger.info(
            "Worker %s received %s; stopping, with %s s for running tasks to "
            "reach a checkpoint",
            manager.runner_id,
            name,
            manager.shutdown_grace,
            extra={"event": "worker.stopping", "runner_id": manager.runner_id},
        )
        stop.set()

    # Installed before startup, so that a signal during startup is not lost.
    previous = {
        signum: signal.signal(signum, on_signal)
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        _start_manager(manager)
        _log_started(manager)
        # Poll rather than block in stop.wait(): a handler that calls set()
        # while this thread holds the event's internal lock inside wait()
        # would deadlock, because handlers run on this thread.
        while not stop.is_set():
            time.sleep(SIGNAL_POLL_INTERVAL)
        manager.shutdown()
        logger.info(
            "Worker %s stopped",
            manager.runner_id,
            extra={"event": "worker.stopped", "runner_id": manager.runner_id},
        )
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start_manager(manager: TaskManager) -> None:
    try:
        manager.startup()
    except (SQLAlchemyError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        logger.error(
            "Worker %s: starting the task manager on %s failed: %s",
            manager.runner_id,
            display_url(manager.database.url),
            reason,
            extra={"event": "worker.start_failed", "runner_id": manager.runner_id},
        )
        raise typer.Exit(1) from exc


def _log_started(manager: TaskManager) -> None:
    names = sorted(manager.task_types)
    if not names:
        logger.warning(
            "Worker %s has no registered task types, so it runs no tasks",
            manager.runner_id,
            extra={"event": "worker.no_task_types", "runner_id": manager.runner_id},
        )
    logger.info(
        "Worker %s started on %s: runs task types %s, up to %d at once; "
        "SIGTERM or SIGINT stops it",
        manager.runner_id,
        display_url(manager.database.url),
        ", ".join(names) or "(none)",
        manager.max_workers,
        extra={"event": "worker.started", "runner_id": manager.runner_id},
    )


def load_manager(spec: str) -> TaskManager:
    """Import the TaskManager that ``spec`` (``MODULE:ATTRIBUTE``) names.

    ``ATTRIBUTE`` may be dotted. Raise ``typer.BadParameter`` when ``spec``
    does not name one of the forms in ``APP_FORMS``. An exception raised while
    the module is imported or the function runs propagates unchanged.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise _invalid_app(spec, "is not of the form MODULE:ATTRIBUTE")
    target: Any = _import_app_module(spec, module_name)
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise _invalid_app(
                spec,
                f"names attribute {attribute!r}, which module {module_name!r} "
                "does not have",
            ) from None
    manager = _manager_of(target)
    if manager is not None:
        return manager
    if isinstance(target, Starlette) or not callable(target):
        raise _invalid_app(spec, f"is {_describe(target)}")
    try:
        inspect.signature(target).bind()
    except TypeError:
        raise _invalid_app(spec, "is a callable that requires arguments") from None
    except ValueError:
        pass  # Some builtins have no signature to check, so call them directly.
    result = target()
    manager = _manager_of(result)
    if manager is None:
        raise _invalid_app(spec, f"returned {_describe(result)}")
    return manager


def _import_app_module(spec: str, module_name: str) -> ModuleType:
    # Like uvicorn: modules in the current directory are importable even when
    # the `taskmill` script, whose own directory is on sys.path, runs this.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if module_name.startswith("."):
        raise _invalid_app(spec, "names a relative module; use its full name")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # A missing module that the named module imports is an error in that
        # module, not in the --app value, so its traceback is kept.
        missing = exc.name or ""
        if not (module_name == missing or module_name.startswith(missing + ".")):
            raise
        raise _invalid_app(
            spec,
            f"names module {module_name!r}, which was not found in the current "
            "directory or on sys.path",
        ) from None


def _manager_of(value: Any) -> TaskManager | None:
    if isinstance(value, TaskManager):
        return value
    manager = getattr(getattr(value, "state", None), "manager", None)
    return manager if isinstance(manager, TaskManager) else None


def _describe(value: Any) -> str:
    if isinstance(value, Starlette):
        return (
            f"a {type(value).__name__} app without a TaskManager in app.state.manager"
        )
    value_type = type(value)
    if value_type.__module__ == "builtins":
        return f"an object of type {value_type.__qualname__}"
    return f"an object of type {value_type.__module__}.{value_type.__qualname__}"


def _invalid_app(spec: str, problem: str) -> typer.BadParameter:
    return typer.BadParameter(
        f"{spec!r} {problem}. Pass MODULE:ATTRIBUTE naming {APP_FORMS}, "
        "e.g. myproject.main:app.",
        param_hint=["--app"],
    )


def _check_log_level(name: str) -> str:
    level = name.lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(
            f"unknown logging level {name!r}; use one of {', '.join(LOG_LEVELS)}.",
            param_hint=["--log-level"],
        )
    return level


def _uvicorn_log_config(level: str) -> dict[str, Any]:
    """Return uvicorn's logging setup, plus a root handler for taskmill's records.

    uvicorn applies it in each web process that it starts; a
    ``logging.basicConfig()`` call here would reach only this process.
    """
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["taskmill"] = {"format": LOG_FORMAT}
    config["handlers"]["taskmill"] = {
        "class": "logging.StreamHandler",
        "formatter": "taskmill",
        "stream": "ext://sys.stderr",
    }
    config["root"] = {"handlers": ["taskmill"], "level": level.upper()}
    return config


def _serve_banner(
    db: str,
    host: str,
    port: int,
    workers: int,
    concurrency: int,
    api_key_required: bool = False,
) -> str:
    processes = "1 web process" if workers == 1 else f"{workers} web processes"
    if concurrency == 0:
        tasks = (
            "that store and control tasks but run none (run them with "
            "`taskmill worker` on the same database)"
        )
    else:
        tasks = f"each running up to {concurrency} tasks at once"
    address = f"http://{_url_host(host)}:{port}"
    banner = (
        f"taskmill demo: {processes} {tasks}; dashboard at {address}/dashboard, "
        f"API docs at {address}/docs, database {display_url(db)}"
    )
    if api_key_required:
        # Names the variable, never its value.
        banner += (
            f"; the API requires the key from {API_KEY_VARIABLE} "
            f"in the {API_KEY_HEADER} header"
        )
    return banner


def _url_host(host: str) -> str:
    """Return ``host`` as a URL writes it: an IPv6 address goes in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _check_database(url: str) -> None:
    """Open the database once, so that a bad ``--db`` fails with one clear line."""
    try:
        database = Database(url)
        try:
            if database.dialect == "sqlite":
                database.upgrade()
            else:
                database.check_schema()
        finally:
            database.dispose()
    except SchemaOutOfDate as exc:
        raise typer.BadParameter(str(exc), param_hint=["--db"]) from exc
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise typer.BadParameter(
            f"cannot open database {display_url(url)!r}: {reason}. Pass a SQLAlchemy URL of a "
            "database that exists or can be created, e.g. sqlite:///./taskmill.db.",
            param_hint=["--db"],
        ) from exc
