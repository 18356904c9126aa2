"""SQLAlchemy models: the ``tasks`` table and its ``task_events`` history."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    bindparam,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.functions import FunctionElement

from taskmill.status import ControlRequest, TaskStatus


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite keeps no offset, so values are stored as naive UTC and read back
    with ``tzinfo=UTC``; naive values are rejected on the way in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"Naive datetime {value!r}; pass an aware UTC datetime.")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def _without_nul(value: str | None, dialect: Dialect) -> str | None:
    if value is not None and dialect.name == "postgresql" and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


class PlainText(TypeDecorator[str]):
    """Text that every backend stores: NUL characters become U+FFFD on PostgreSQL.

    PostgreSQL rejects NUL in text, so a progress message with one would
    fail its statement. As a query parameter, an id with NUL matches no row.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return _without_nul(value, dialect)


class PlainString(TypeDecorator[str]):
    """A ``String(length)`` with the NUL handling of ``PlainText``."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return _without_nul(value, dialect)


class database_now(FunctionElement[dt.datetime]):
    """The database's clock, ``seconds`` ahead, as a SQL expression.

    Leases are set and compared with it, so runners on hosts whose clocks
    disagree still agree on when a lease ends. Claims also compare the end
    of a retry backoff with it. SQLite runs
    inside each process of one host, so there the host clock is the
    database's.
    """

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float | BindParameter[float] = 0.0) -> None:
        if not isinstance(seconds, BindParameter):
            seconds = bindparam(None, float(seconds), type_=Float())
        super().__init__(seconds)


@compiles(database_now, "postgresql")
def _postgresql_now(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    # statement_timestamp(), not now(): a transaction may be open for a while.
    return (
        "(statement_timestamp() + make_interval(secs => "
        f"{compiler.process(seconds, **kw)}))"
    )


@compiles(database_now, "sqlite")
def _sqlite_now(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    # The text format that SQLAlchemy stores SQLite datetimes in, so that
    # stored values and this one compare as strings.
    return (
        "strftime('%Y-%m-%d %H:%M:%f000', 'now', "
        f"({compiler.process(seconds, **kw)}) || ' seconds')"
    )


def _enum(cls: type[TaskStatus] | type[ControlRequest]) -> Enum:
    return Enum(
        cls,
        native_enum=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads it as a class attribute
        dt.datetime: UTCDateTime,
        dict[str, Any]: JSON(none_as_null=True),
        Any: JSON(none_as_null=True),
    }


class BackgroundTaskModel(Base):
    """One task: what to run, where it is, and what it produced."""

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(PlainString(36), primary_key=True)
    #: The registered task type.
    name: Mapped[str] = mapped_column(PlainString(200))
    status: Mapped[TaskStatus] = mapped_column(_enum(TaskStatus))
    params: Mapped[dict[str, Any]]
    result: Mapped[Any | None]
    #: ``{"type", "message", "traceback", "phase"}`` of the failure.
    error: Mapped[dict[str, Any] | None]
    #: Percent done, 0 to 100.
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(PlainText)
    #: The JSON state the task saved to resume from.
    checkpoint: Mapped[Any | None]
    #: How many runs have started (claims, resumes and restarts included).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: How many times a run was taken back from a process that died.
    recoveries: Mapped[int] = mapped_column(Integer, default=0)
    #: Runs that raised or died since the task was created or restarted;
    #: the task type's retry policy bounds them.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: A pause or stop that the running task has not honoured yet.
    control: Mapped[ControlRequest | None] = mapped_column(_enum(ControlRequest))
    #: Id of the runner that owns the current run.
    owner: Mapped[str | None] = mapped_column(PlainString(64))
    #: Expiry of the owner's claim. After it, another runner may take the run back.
    lease_expires_at: Mapped[dt.datetime | None]
    #: When the run last showed life (claim, progress report or checkpoint).
    #: A run stuck in one step keeps an old value while its lease is renewed.
    heartbeat_at: Mapped[dt.datetime | None]
    #: A PENDING task is not claimed before this time (the backoff of a retry).
    run_after: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime]

    # Lists are ordered by (created_at, id); these indexes let a filtered page
    # stop after `limit` rows instead of sorting every match. The change feed
    # reads (updated_at, id) of recently changed rows from the index alone.
    __table_args__ = (
        Index(None, "status", "created_at", "id"),
        Index(None, "name", "created_at", "id"),
        Index(None, "created_at", "id"),
        Index(None, "updated_at", "id"),
    )


class TaskEventModel(Base):
    """One entry of a task's history: a status transition, or a warning about the run.

    A transition is written with the status change itself. A warning
    (``kind="warning"``) records trouble that changes no status; its from and
    to status are both the status at the time.
    """

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    )
    task_id: Mapped[str] = mapped_column(
        PlainString(36), ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    #: None for the event that creates the task.
    from_status: Mapped[TaskStatus | None] = mapped_column(_enum(TaskStatus))
    to_status: Mapped[TaskStatus] = mapped_column(_enum(TaskStatus))
    at: Mapped[dt.datetime]
    reason: Mapped[str] = mapped_column(PlainText)
    #: ``transition`` or ``warning``.
    kind: Mapped[str] = mapped_column(
        String(16), default="transition", server_default="transition"
    )
