"""Engines, sessions and schema migrations, on SQLite or PostgreSQL.

SQLite runs in WAL mode (readers beside one writer) with a busy timeout.
Write transactions start with ``BEGIN IMMEDIATE``: one that began as a read
and later writes fails at once with "database is locked" when another
connection wrote meanwhile, whatever the busy timeout is.

PostgreSQL is reached through psycopg 3 (``postgresql+psycopg://`` URLs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from taskmill.exceptions import SchemaOutOfDate
from taskmill.migrations import HEAD_REVISION

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "sqlite:///./taskmill.db"


class Database:
    """An engine and the sessions taskmill opens on it.

    Each ``read()`` or ``write()`` block is one short transaction on its own
    session, so a session never crosses threads.
    """

    def __init__(
        self,
        url: str = DEFAULT_DATABASE_URL,
        *,
        busy_timeout: float = 30.0,
        synchronous: str = "NORMAL",
        pool_size: int = 10,
        echo: bool = False,
    ) -> None:
        self.url = url
        options: dict[str, Any] = {}
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
            # Request threads, hook threads and the manager share the pool, and
            # SQLite connections are cheap: never make a caller wait for one.
            options["max_overflow"] = -1
        elif backend == "postgresql":
            # Connections that stay open: an overflow connection is closed
            # when it is returned, so a pool smaller than the number of
            # threads that use it opens a server process for each checkout.
            options["pool_size"] = pool_size
            options["max_overflow"] = 10
            options["pool_timeout"] = busy_timeout
            if "connect_timeout" not in parsed.query:
                options["connect_args"] = {"connect_timeout": _CONNECT_TIMEOUT}
        self.engine = create_engine(url, echo=echo, **options)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        #: True for an in-memory SQLite database, which is private to each connection.
        self.is_memory = self.is_sqlite and self.engine.url.database in (
            None,
            "",
            ":memory:",
        )
        if self.is_sqlite:
            _configure_sqlite(self.engine, busy_timeout, synchronous)
        elif self.engine.dialect.name == "postgresql":
            _configure_postgresql(self.engine, busy_timeout)
        _explain_missing_schema(self.engine, display_url(url))
        self._local = threading.local()
        self.busy_timeout = busy_timeout
        # SQLite has one writer at a time, and a connection that finds the
        # lock taken sleeps in steps of up to 100 ms before it tries again.
        # Threads of one process take turns on this lock instead, which wakes
        # the next writer as soon as the previous one commits.
        self._write_turn = threading.Lock() if self.is_sqlite else None
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(
            self.engine.execution_options(taskmill_write=True),
            expire_on_commit=False,
        )

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def revision(self) -> str | None:
        """Return the schema revision that the database is at; None for an empty one."""
        with self.engine.connect() as connection:
            return _current_revision(connection)

    def upgrade(self) -> str | None:
        """Migrate the schema to this version of taskmill, keeping every row.

        Creates the tables in an empty database, and returns the revision
        that the database was at (None for an empty one). Safe to run from
        several processes at once: one migrates while the others wait, then
        find nothing to do.
        """
        head = HEAD_REVISION
        current = self.revision()
        if current == head:
            return current
        # One write transaction (BEGIN IMMEDIATE on SQLite, a transaction-wide
        # advisory lock on PostgreSQL) around the whole migration.
        with self.engine.execution_options(taskmill_write=True).begin() as connection:
            if self.dialect == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": _MIGRATION_LOCK},
                )
            # Read again under the lock: another process may have migrated.
            current = _current_revision(connection)
            if current != head:
                # Imported here: Alembic adds megabytes to every process, and
                # most starts find the schema up to date.
                from alembic import command
                from alembic.config import Config

                config = Config()
                config.set_main_option("script_location", "taskmill:migrations")
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        return current

    def create_schema(self) -> None:
        """Same as ``upgrade()``."""
        self.upgrade()

    def check_schema(self) -> None:
        """Raise ``SchemaOutOfDate`` unless the schema is at this version's revision."""
        current, head = self.revision(), HEAD_REVISION
        if current != head:
            raise SchemaOutOfDate(display_url(self.url), current, head)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with _transaction(self._reader) as session:
            yield session

    def writing_here(self) -> bool:
        """True while the calling thread has a write transaction open."""
        return bool(getattr(self._local, "writing", False))

    @contextmanager
    def write(self) -> Iterator[Session]:
        """Open a write transaction; it commits when the block ends.

        Raises RuntimeError inside another write block on the same thread:
        the inner one would wait for the outer one's lock until it timed out.
        """
        if self.writing_here():
            raise RuntimeError(
                "A write transaction is already open on this thread, and a second "
                "one would wait for it forever; write the rows in the first one "
                "(in a task: pass them as checkpoint(state, effects=...))."
            )
        turn = self._write_turn
        if turn is not None and not turn.acquire(timeout=self.busy_timeout):
            raise OperationalError(
                "BEGIN IMMEDIATE",
                {},
                TimeoutError(
                    f"database is locked: no write turn within {self.busy_timeout} s"
                ),
            )
        self._local.writing = True
        try:
            with _transaction(self._writer) as session:
                yield session
        finally:
            self._local.writing = False
            if turn is not None:
                turn.release()

    def dispose(self) -> None:
        self.engine.dispose()


#: PostgreSQL's SQLSTATE for a write in a read-only transaction.
_READ_ONLY_TRANSACTION = "25006"

#: PostgreSQL's SQLSTATE for a statement on a table that does not exist.
_UNDEFINED_TABLE = "42P01"

#: PostgreSQL's SQLSTATE for a statement that waited ``lock_timeout`` for a lock.
_LOCK_NOT_AVAILABLE = "55P03"

#: Seconds that a new PostgreSQL connection may take, unless the URL sets
#: ``connect_timeout``.
_CONNECT_TIMEOUT = 10

#: The key of the PostgreSQL advisory lock that serialises migrations.
_MIGRATION_LOCK = 0x7461736B6D696C6C  # "taskmill" in ASCII


def _current_revision(connection: Connection) -> str | None:
    """Return the revision in Alembic's version table; None when there is none."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(
        text("SELECT version_num FROM alembic_version")
    ).scalar_one_or_none()


@contextmanager
def _transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Run a block in one transaction: commit if it returns, roll back if it raises.

    When the rollback itself fails (the block broke the connection), the
    rollback error is logged and the block's own exception propagates, so the
    error that a task raised is the one recorded.
    """
    session = factory()
    try:
        session.begin()
        yield session
        session.commit()
    except BaseException as exc:
        try:
            session.rollback()
        except Exception:
            logger.warning(
                "Rolling back after %s failed", type(exc).__name__, exc_info=True
            )
        raise
    finally:
        session.close()


#: SQLite result codes that mean "unavailable for now", not "bad statement":
#: sqlite3 raises OperationalError for both, e.g. for "no such table" too.
_TRANSIENT_SQLITE_ERRORS = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_READONLY",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_PROTOCOL",
)


def display_url(url: str) -> str:
    """Return ``url`` with its password masked, in the user part or the query."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def is_transient(exc: SQLAlchemyError) -> bool:
    """Tell a database that is unavailable for now from one that rejects the statement."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, PoolTimeout):
        # Every connection of the pool stayed busy for busy_timeout seconds.
        return True
    if not isinstance(exc, OperationalError):
        return False
    name = getattr(exc.orig, "sqlite_errorname", None)
    return name is None or name.startswith(_TRANSIENT_SQLITE_ERRORS)


def is_lock_timeout(exc: SQLAlchemyError) -> bool:
    """True for a PostgreSQL lock timeout: the rows of one statement were locked.

    Unlike SQLite's "database is locked", it does not mean that other writes
    would wait too: they may well succeed.
    """
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == _LOCK_NOT_AVAILABLE


def _configure_postgresql(engine: Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        # A server in read-only mode (a standby, or default_transaction_read_only)
        # may be writable again later. Marked as a disconnect, the error counts
        # as transient and the pool replaces the connection.
        sqlstate = getattr(context.original_exception, "sqlstate", None)
        if sqlstate == _READ_ONLY_TRANSACTION:
            context.is_disconnect = True

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # A statement that waits longer than this for a row or table lock
        # fails as transient (the API returns 503), as with SQLite's busy
        # timeout, instead of blocking its thread for as long as the lock lasts.
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = {int(busy_timeout * 1000)}")
        dbapi_connection.commit()


def _explain_missing_schema(engine: Engine, shown_url: str) -> None:
    """Raise ``SchemaOutOfDate`` for a statement that finds no ``tasks`` table.

    A manager that was never started, or the CLI, may open a database that
    was never migrated, and the driver's "no such table" does not say what
    to do about it.
    """

    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        error = context.original_exception
        sqlstate = getattr(error, "sqlstate", None)
        if str(error) == "no such table: tasks" or (
            sqlstate == _UNDEFINED_TABLE
            and 'relation "tasks" does not exist' in str(error)
        ):
            raise SchemaOutOfDate(shown_url, None, HEAD_REVISION) from error


def _configure_sqlite(engine: Engine, busy_timeout: float, synchronous: str) -> None:
    if synchronous.upper() not in {"NORMAL", "FULL"}:
        raise ValueError(
            f"Invalid SQLite synchronous mode {synchronous!r}; use 'NORMAL' or 'FULL'."
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself, so that writes can use IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        # A connection opened while the file was not writable stays read-only
        # after it is writable again; as a disconnect, the pool replaces it.
        name = getattr(context.original_exception, "sqlite_errorname", "")
        if name.startswith("SQLITE_READONLY"):
            context.is_disconnect = True

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        is_write = connection.get_execution_options().get("taskmill_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if is_write else "BEGIN")
