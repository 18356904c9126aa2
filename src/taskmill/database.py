"""Engines and sessions, with SQLite set up for a web app.

SQLite runs in WAL mode (readers beside one writer) with a busy timeout.
Write transactions start with ``BEGIN IMMEDIATE``: one that began as a read
and later writes fails at once with "database is locked" when another
connection wrote meanwhile, whatever the busy timeout is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, make_url
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateColumn

from taskmill.models import Base

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
        echo: bool = False,
    ) -> None:
        self.url = url
        options: dict[str, Any] = {}
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (
            None,
            "",
            ":memory:",
        ):
            # Request threads, hook threads and the manager share the pool, and
            # SQLite connections are cheap: never make a caller wait for one.
            options["max_overflow"] = -1
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
        self._local = threading.local()
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(
            self.engine.execution_options(taskmill_write=True),
            expire_on_commit=False,
        )

    def create_schema(self) -> None:
        """Create the tables and indexes that do not exist yet."""
        # One write transaction (BEGIN IMMEDIATE on SQLite), so that processes
        # that start together do not both try to create the same table.
        with self.engine.execution_options(taskmill_write=True).begin() as connection:
            Base.metadata.create_all(connection)
            # create_all() adds indexes only with a new table; an older database
            # gets the indexes that were added since it was created.
            _add_missing_columns(connection)
            for table in Base.metadata.sorted_tables:
                for index in table.indexes:
                    index.create(connection, checkfirst=True)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with _transaction(self._reader) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """Open a write transaction; it commits when the block ends.

        Raises RuntimeError inside another write block on the same thread:
        the inner one would wait for the outer one's lock until it timed out.
        """
        if getattr(self._local, "writing", False):
            raise RuntimeError(
                "A write transaction is already open on this thread, and a second "
                "one would wait for it forever; write the rows in the first one "
                "(in a task: pass them as checkpoint(state, effects=...))."
            )
        self._local.writing = True
        try:
            with _transaction(self._writer) as session:
                yield session
        finally:
            self._local.writing = False

    def dispose(self) -> None:
        self.engine.dispose()


def _add_missing_columns(connection: Connection) -> None:
    """Add the columns that were added to the models since the database was created.

    NOTE: this covers added columns only (each nullable or with a server
    default); changes of any other kind need real migrations.
    """
    inspector = inspect(connection)
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            definition = CreateColumn(column).compile(dialect=connection.dialect)
            logger.info("Adding column %s.%s", table.name, column.name)
            connection.exec_driver_sql(
                f"ALTER TABLE {table.name} ADD COLUMN {definition}"
            )


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


def is_transient(exc: SQLAlchemyError) -> bool:
    """Tell a database that is unavailable for now from one that rejects the statement."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    name = getattr(exc.orig, "sqlite_errorname", None)
    return name is None or name.startswith(_TRANSIENT_SQLITE_ERRORS)


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
