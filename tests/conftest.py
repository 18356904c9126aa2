from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, make_url, select, text
from sqlalchemy.exc import SQLAlchemyError

from taskmill import BaseTask, Database, TaskManager
from taskmill.models import BackgroundTaskModel, TaskEventModel
from tests.tasks import create_ledger

ROOT = Path(__file__).resolve().parent.parent


#: A SQLAlchemy URL of a database on the PostgreSQL server that the
#: PostgreSQL half of the suite runs on. Each test creates a database of its
#: own on that server.
POSTGRES_URL_VARIABLE = "TASKMILL_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
#: Set to 1 (CI does) to fail, not skip, when PostgreSQL cannot be reached.
REQUIRE_POSTGRES_VARIABLE = "TASKMILL_TEST_REQUIRE_POSTGRES"


class PostgresServer:
    """Makes a fresh database per test, copied from a template that is migrated once."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self.admin = create_engine(
            self.url,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": 5},
        )
        self.prefix = f"taskmill_test_{os.getpid()}"
        self.template = f"{self.prefix}_template"
        self.count = 0

    def check(self) -> None:
        with self.admin.connect() as connection:
            connection.execute(text("SELECT 1"))

    def create_template(self) -> None:
        self._execute(f"DROP DATABASE IF EXISTS {self.template}")
        self._execute(f"CREATE DATABASE {self.template}")
        template = Database(self.url_of(self.template))
        try:
            template.upgrade()
            create_ledger(template)
        finally:
            template.dispose()

    def create_database(self, *, migrated: bool = True) -> str:
        """Create a database with the schema (and the ledger), or an empty one."""
        self.count += 1
        name = f"{self.prefix}_{self.count}"
        template = self.template if migrated else "template0"
        self._execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a server process that a test killed may leave connections.
        self._execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def url_of(self, name: str) -> str:
        return self.url.set(database=name).render_as_string(hide_password=False)

    def close(self) -> None:
        self.drop_database(self.template)
        self.admin.dispose()

    def _execute(self, statement: str) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(statement))


def postgres_problem(url: str) -> str | None:
    """Return why the PostgreSQL server at ``url`` cannot be used, or None."""
    server = PostgresServer(url)
    try:
        server.check()
    except SQLAlchemyError as exc:
        reason = str(exc).strip().splitlines()[0]
        return (
            f"PostgreSQL is not reachable at {server.url} ({reason}); set "
            f"{POSTGRES_URL_VARIABLE} to a SQLAlchemy URL of a server to run it"
        )
    finally:
        server.admin.dispose()
    return None


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Leave out the PostgreSQL half, with one message, when no server is reachable.

    With TASKMILL_TEST_REQUIRE_POSTGRES=1 it stays in, and fails.
    """
    postgres_items = [item for item in items if item.get_closest_marker("postgresql")]
    if not postgres_items or os.environ.get(REQUIRE_POSTGRES_VARIABLE) == "1":
        return
    problem = postgres_problem(
        os.environ.get(POSTGRES_URL_VARIABLE, DEFAULT_POSTGRES_URL)
    )
    if problem is None:
        return
    config.hook.pytest_deselected(items=postgres_items)
    items[:] = [item for item in items if not item.get_closest_marker("postgresql")]
    config.stash[_POSTGRES_SKIPPED] = f"{len(postgres_items)} tests left out: {problem}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    skipped = config.stash.get(_POSTGRES_SKIPPED, None)
    if skipped is not None:
        terminalreporter.write_line(f"PostgreSQL half skipped ({skipped})", yellow=True)


_POSTGRES_SKIPPED = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    url = os.environ.get(POSTGRES_URL_VARIABLE, DEFAULT_POSTGRES_URL)
    problem = postgres_problem(url)
    if problem is not None:
        # Only when the server is required (or went away since collection).
        pytest.fail(problem, pytrace=False)
    server = PostgresServer(url)
    server.create_template()
    yield server
    server.close()


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]
)
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend of the test: every test that uses a database runs on both."""
    return str(request.param)


@pytest.fixture
def database_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'tasks.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database()
    yield server.url_of(name)
    server.drop_database(name)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A database of the test's own on PostgreSQL, for tests of what only it does."""
    name = postgres_server.create_database()
    yield postgres_server.url_of(name)
    postgres_server.drop_database(name)


@pytest.fixture
def empty_database_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A database without tables, on the test's backend."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database(migrated=False)
    yield server.url_of(name)
    server.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file, for tests of what only SQLite does."""
    return f"sqlite:///{tmp_path / 'tasks.db'}"


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A connection of the test's own to its database, for reading rows and the ledger."""
    opened = Database(database_url)
    yield opened
    opened.dispose()


@contextmanager
def manager_factory(url: str) -> Iterator[Callable[..., TaskManager]]:
    """Build started managers on ``url``; shut them down when the block ends."""
    managers: list[TaskManager] = []

    def make(*task_classes: type[BaseTask[Any]], **options: Any) -> TaskManager:
        options.setdefault("progress_interval", 0.05)
        options.setdefault("shutdown_grace", 2.0)
        manager = TaskManager(options.pop("url", url), **options)
        for task_class in task_classes:
            manager.register(task_class)
        manager.database.create_schema()
        create_ledger(manager.database)
        manager.startup()
        managers.append(manager)
        return manager

    try:
        yield make
    finally:
        for manager in managers:
            manager.shutdown(grace=1.0)


@pytest.fixture
def make_manager(database_url: str) -> Iterator[Callable[..., TaskManager]]:
    """Build started managers on the test's database; shut them down afterwards."""
    with manager_factory(database_url) as make:
        yield make


@pytest.fixture
def make_postgres_manager(postgres_url: str) -> Iterator[Callable[..., TaskManager]]:
    """Build started managers on the test's PostgreSQL database."""
    with manager_factory(postgres_url) as make:
        yield make


def read_row(database: Database, task_id: str) -> dict[str, Any]:
    """Read a task's row on the test's own connection, bypassing any server."""
    tasks = BackgroundTaskModel.__table__
    with database.read() as session:
        row = (
            session.execute(select(tasks).where(tasks.c.id == task_id))
            .mappings()
            .one_or_none()
        )
    assert row is not None, f"Task {task_id} is not in the database"
    return dict(row)


def read_event_reasons(database: Database, task_id: str) -> list[str]:
    """Read the reasons of a task's history rows, oldest first."""
    with database.read() as session:
        reasons = session.scalars(
            select(TaskEventModel.reason)
            .where(TaskEventModel.task_id == task_id)
            .order_by(TaskEventModel.id)
        )
        return list(reasons)


def eventually(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"Condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def run_pipeline(directory: Path, command: str) -> bytes:
    """Run a shell pipeline in ``directory`` and return its output."""
    completed = subprocess.run(
        ["bash", "-c", command],
        cwd=directory,
        capture_output=True,
        check=True,
        timeout=30,
    )
    return completed.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """The test app served by uvicorn in its own process group."""

    def __init__(self, database_url: str, log_path: Path, env: dict[str, str]) -> None:
        self.database_url = database_url
        self.log_path = log_path
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def start(self) -> None:
        env = {**os.environ, **self.env, "TASKMILL_DATABASE_URL": self.database_url}
        command = [
            sys.executable, "-m", "uvicorn", "tests.app:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        eventually(self._is_healthy, timeout=20, interval=0.05)

    def _is_healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"Server exited; log:\n{self.log_path.read_text()}")
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def kill9(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def term(self, timeout: float = 10.0) -> float:
        """Send SIGTERM and return how long the process took to exit."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=timeout)
        return time.monotonic() - started

    def restart(self) -> None:
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.client.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def make_server(
    database_url: str, tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    servers: list[ServerProcess] = []

    def make(**env: str) -> ServerProcess:
        log_path = tmp_path / f"server-{len(servers)}.log"
        server = ServerProcess(database_url, log_path, env)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()
