"""``taskmill tasks``: list, show, control and watch the tasks of a database.

The commands work on the database directly, through a manager that runs no
tasks (``max_workers=0``), so they work beside running servers and workers
and never run a task themselves. They never create or alter tables either.
Errors go to stderr with exit status 1.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from sqlalchemy import inspect, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from taskmill.database import (
    DEFAULT_DATABASE_URL,
    Database,
    display_url,
    is_transient,
)
from taskmill.demo import DATABASE_URL_VARIABLE
from taskmill.exceptions import InvalidTransition, TaskNotFound
from taskmill.manager import TaskManager
from taskmill.schemas import TaskEventInfo, TaskInfo
from taskmill.status import Action, TaskStatus

app = typer.Typer(
    name="tasks",
    help="List, show, control and watch the tasks of a database.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

#: Seconds between two reads of the task that ``watch`` shows.
WATCH_INTERVAL = 0.25
#: The exit status after Ctrl-C, as shells report a process ended by SIGINT.
EXIT_INTERRUPTED = 130

T = TypeVar("T")

STATUS_STYLES = {
    TaskStatus.PENDING: "dim",
    TaskStatus.RUNNING: "blue",
    TaskStatus.PAUSED: "yellow",
    TaskStatus.FINISHED: "green",
    TaskStatus.FAILED: "red",
    TaskStatus.STOPPED: "magenta",
}

DatabaseOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar=DATABASE_URL_VARIABLE,
        metavar="URL",
        help="SQLAlchemy URL of the task database.",
    ),
]
TaskIdArgument = Annotated[str, typer.Argument(metavar="ID", help="The task's id.")]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON, as the HTTP API returns it.")
]


# -- commands --


@app.command("list")
def list_tasks(
    status: Annotated[
        list[TaskStatus] | None,
        typer.Option(
            case_sensitive=False,
            metavar="STATUS",
            help="Show only tasks in this status; repeat for several.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Show only tasks of this task type."),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(min=1, max=500, metavar="N", help="Show at most N tasks."),
    ] = 50,
    offset: Annotated[
        int, typer.Option(min=0, metavar="N", help="Skip the N newest tasks.")
    ] = 0,
    as_json: JsonOption = False,
    db: DatabaseOption = DEFAULT_DATABASE_URL,
) -> None:
    """List tasks, newest first."""
    with _open_manager(db) as manager:
        tasks = _call(
            db,
            lambda: manager.list(
                statuses=status or (), name=name, limit=limit, offset=offset
            ),
        )
    if as_json:
        typer.echo(json.dumps([_json(task) for task in tasks], indent=2))
        return
    if not tasks:
        typer.echo("No tasks match.")
        return
    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True, min_width=36)
    table.add_column("NAME", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("PROGRESS", justify="right", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    table.add_column("MESSAGE", overflow="ellipsis", no_wrap=True)
    for task in tasks:
        table.add_row(
            task.id,
            _shown(task.name),
            _status_text(task),
            _percent(task.progress),
            _local_time(task.created_at),
            _shown(_message(task)),
        )
    _console().print(table)


@app.command()
def show(
    task_id: TaskIdArgument,
    as_json: JsonOption = False,
    db: DatabaseOption = DEFAULT_DATABASE_URL,
) -> None:
    """Show a task: status, progress, params, result, error and history."""
    with _open_manager(db) as manager:
        task = _call(db, lambda: manager.get(task_id))
        history = _call(db, lambda: manager.events(task_id))
    if as_json:
        body = {**_json(task), "history": [_json(event) for event in history]}
        typer.echo(json.dumps(body, indent=2))
        return
    console = _console()
    console.print(f"[bold]{_shown(task.name)}[/bold] {task.id}")
    details = Table.grid(padding=(0, 2))
    details.add_column(style="dim", no_wrap=True)
    details.add_column()
    for label, value in _details(task):
        details.add_row(label, value)
    console.print(details)
    if task.error is not None and task.error.traceback:
        console.print("[dim]Traceback[/dim]")
        console.print(
            _shown(task.error.traceback.rstrip(), keep_newlines=True), highlight=False
        )
    console.print("[dim]History[/dim]")
    for event in history:
        console.print(_event_line(event))


def _action_command(action: Action) -> Callable[..., None]:
    def command(
        task_id: TaskIdArgument, db: DatabaseOption = DEFAULT_DATABASE_URL
    ) -> None:
        with _open_manager(db) as manager:
            task = _call(db, lambda: manager.act(task_id, action))
        typer.echo(_action_outcome(task))

    command.__doc__ = _ACTION_HELP[action]
    return command


_ACTION_HELP = {
    Action.START: "Start a task that was created held (PAUSED).",
    Action.RESUME: "Resume a paused task from its last checkpoint.",
    Action.PAUSE: "Hold a pending task, or pause a running one at its next checkpoint.",
    Action.STOP: "Stop a task; a running one stops at its next checkpoint.",
    Action.RESTART: "Run a finished, failed or stopped task again from the start.",
}

for _action in Action:
    app.command(_action.value)(_action_command(_action))


@app.command()
def watch(
    task_id: TaskIdArgument,
    interval: Annotated[
        float,
        typer.Option(
            min=0.05,
            metavar="SECONDS",
            help="Seconds between two reads of the task.",
        ),
    ] = WATCH_INTERVAL,
    db: DatabaseOption = DEFAULT_DATABASE_URL,
) -> None:
    """Show a task's progress bar and transitions until it ends.

    The exit status is 0 when the task ends FINISHED, 1 when it ends FAILED or
    STOPPED, and 130 after Ctrl-C, which stops the watching, not the task.
    """
    console = _console()
    interrupted = threading.Event()
    # A flag that the loop checks, rather than KeyboardInterrupt, which could
    # land inside a database call or the progress bar's own thread.
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        with _open_manager(db) as manager:
            task = _watch(manager, db, task_id, interval, console, interrupted)
    finally:
        signal.signal(signal.SIGINT, previous)
    if task is None:
        console.print("Stopped watching; the task goes on.")
        raise typer.Exit(EXIT_INTERRUPTED)
    console.print(_ending(task))
    if task.status != TaskStatus.FINISHED:
        raise typer.Exit(1)


#: C0 and C1 control characters, which could move the cursor, clear the
#: screen or set the window title of the terminal that shows task data.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_CHARACTERS_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _shown(text: str, *, keep_newlines: bool = False) -> str:
    """Return task data ready for Rich: markup escaped, control characters as ``\\xNN``."""
    pattern = _CONTROL_CHARACTERS_BUT_NEWLINE if keep_newlines else _CONTROL_CHARACTERS
    visible = pattern.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
    return escape(visible)


# -- watch --


def _watch(
    manager: TaskManager,
    db: str,
    task_id: str,
    interval: float,
    console: Console,
    interrupted: threading.Event,
) -> TaskInfo | None:
    """Show the task until it reaches a terminal status; return its last state.

    Returns None once ``interrupted`` is set.
    """
    task = _call(db, lambda: manager.get(task_id))
    console.print(
        f"Watching {_shown(task.name)} {task.id}; Ctrl-C stops watching, not the task."
    )
    last_event_id = 0
    progress = Progress(
        TextColumn("{task.fields[status]}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f} %"),
        TextColumn("{task.fields[message]}"),
        console=console,
    )
    with progress:
        bar = progress.add_task(task.name, total=100, status="", message="")
        while True:
            events = _read_if_available(db, lambda: manager.events(task_id)) or []
            for event in events:
                if event.id > last_event_id:
                    progress.console.print(_event_line(event))
                    last_event_id = event.id
            progress.update(
                bar,
                completed=task.progress,
                status=_status_text(task),
                message=_shown(_message(task)),
            )
            if task.status.is_terminal:
                return task
            time.sleep(interval)
            if interrupted.is_set():
                return None
            task = _read_if_available(db, lambda: manager.get(task_id)) or task


def _read_if_available(db: str, read: Callable[[], T]) -> T | None:
    """Return ``read()``, or None while the database is unavailable for now."""
    try:
        return read()
    except SQLAlchemyError as exc:
        if is_transient(exc):
            return None
        _fail(f"Reading {display_url(db)} failed: {_first_line(exc)}")


def _ending(task: TaskInfo) -> str:
    if task.status == TaskStatus.FINISHED:
        return f"Task {task.id} finished; result: {json.dumps(task.result)}"
    if task.status == TaskStatus.FAILED and task.error is not None:
        return (
            f"Task {task.id} failed in {task.error.phase}: "
            f"{_shown(task.error.type)}: {_shown(task.error.message)}"
        )
    return f"Task {task.id} ended {task.status}."


# -- the database --


@contextmanager
def _open_manager(db: str) -> Iterator[TaskManager]:
    """Open ``db`` with a manager that runs no tasks; exit 1 if it has no tasks table."""
    _check_exists(db)
    try:
        database = Database(db)
    except (ArgumentError, ImportError, ValueError) as exc:
        _fail(f"Cannot open database {display_url(db)!r}: {_first_line(exc)}")
    try:
        has_tasks = _call(db, lambda: inspect(database.engine).has_table("tasks"))
        if not has_tasks:
            _fail(
                f"Database {display_url(db)} has no tasks table. Pass the database "
                f"that your app uses with --db or {DATABASE_URL_VARIABLE}."
            )
        yield TaskManager(database, max_workers=0)
    finally:
        database.dispose()


def _check_exists(db: str) -> None:
    """Exit 1 for a SQLite file that does not exist, which connecting would create."""
    try:
        url = make_url(db)
    except ArgumentError as exc:
        _fail(f"Cannot open database {db!r}: {_first_line(exc)}")
    if url.get_backend_name() != "sqlite" or url.query.get("uri") or not url.database:
        return
    if url.database != ":memory:" and not Path(url.database).exists():
        _fail(
            f"Database file {url.database} does not exist. Pass the database that "
            f"your app uses with --db or {DATABASE_URL_VARIABLE}."
        )


def _call(db: str, operation: Callable[[], T]) -> T:
    """Return ``operation()``; exit 1 with a message on a taskmill or database error."""
    try:
        return operation()
    except (TaskNotFound, InvalidTransition) as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        _fail(f"Database {display_url(db)} failed: {_first_line(exc)}")


def _fail(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


# -- output --


def _console() -> Console:
    # Wide when the output is not a terminal, so that a piped table keeps its
    # full ids instead of wrapping at 80 columns.
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 200
    return console


def _json(model: TaskInfo | TaskEventInfo) -> Any:
    return model.model_dump(mode="json")


def _status_text(task: TaskInfo) -> str:
    style = STATUS_STYLES[task.status]
    text = f"[{style}]{task.status.value}[/{style}]"
    if task.pending_request is not None:
        text += f" ({task.pending_request.value.lower()} requested)"
    return text


def _percent(value: float) -> str:
    return f"{value:.1f} %"


def _message(task: TaskInfo) -> str:
    if task.error is not None:
        return f"{task.error.type}: {task.error.message}"
    return task.message or ""


def _local_time(value: dt.datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _details(task: TaskInfo) -> list[tuple[str, str]]:
    rows = [
        ("status", _status_text(task)),
        ("progress", f"{_percent(task.progress)}  {_shown(task.message or '')}"),
        ("actions", ", ".join(action.value for action in task.allowed_actions)),
        (
            "attempts",
            f"{task.attempts} (failed {task.failures}, recovered {task.recoveries})",
        ),
        ("runner", task.owner or ""),
        ("created", _local_time(task.created_at)),
        ("started", _local_time(task.started_at)),
        ("finished", _local_time(task.finished_at)),
        ("updated", _local_time(task.updated_at)),
        ("heartbeat", _local_time(task.heartbeat_at)),
        ("retry after", _local_time(task.run_after)),
        ("params", _shown(json.dumps(task.params))),
    ]
    if task.result is not None:
        rows.append(("result", _shown(json.dumps(task.result))))
    if task.error is not None:
        error = f"{task.error.type}: {task.error.message} (in {task.error.phase})"
        rows.append(("error", f"[red]{_shown(error)}[/red]"))
    return [(label, value) for label, value in rows if value]


def _event_line(event: TaskEventInfo) -> str:
    source = f"{event.from_status.value} -> " if event.from_status else ""
    return (
        f"{_local_time(event.at)}  {source}{event.to_status.value}  "
        f"[dim]{_shown(event.reason)}[/dim]"
    )


def _action_outcome(task: TaskInfo) -> str:
    if task.status == TaskStatus.RUNNING and task.pending_request is not None:
        return (
            f"Task {task.id} ({task.name}) is RUNNING; it will "
            f"{task.pending_request.value.lower()} at its next checkpoint."
        )
    return f"Task {task.id} ({task.name}) is now {task.status.value}."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
