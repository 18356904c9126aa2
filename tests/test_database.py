"""Database: write turns on SQLite, errors that count as transient, URLs in messages."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from taskmill import Database, crud
from taskmill.database import display_url, is_transient


def test_sqlite_writers_of_one_process_take_turns(sqlite_url: str) -> None:
    database = Database(sqlite_url)
    database.upgrade()
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with database.write() as session:
            crud.create_task(session, name="first", params={})
            order.append("first in")
            inside.set()
            release.wait(5)
            order.append("first out")

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(5)
        threading.Timer(0.2, release.set).start()
        started = time.monotonic()
        with database.write() as session:
            order.append("second in")
            crud.create_task(session, name="second", params={})
        waited = time.monotonic() - started
    finally:
        release.set()
        holder.join(5)
        database.dispose()
    assert order == ["first in", "first out", "second in"]
    assert waited >= 0.15


def test_sqlite_write_turn_times_out_as_locked(sqlite_url: str) -> None:
    database = Database(sqlite_url, busy_timeout=0.2)
    database.upgrade()
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with database.write():
            inside.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(5)
        with pytest.raises(OperationalError, match="database is locked") as caught:
            with database.write():
                pass
        # The API returns 503 for it, as for a lock held by another process.
        assert is_transient(caught.value)
    finally:
        release.set()
        holder.join(5)
        database.dispose()
    # The turn is free again once the holder commits.
    with database.write() as session:
        crud.create_task(session, name="after", params={})
    database.dispose()


def test_pool_timeout_is_transient() -> None:
    assert is_transient(PoolTimeout("QueuePool limit of size 5 overflow 10 reached"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://app:secret@db/tasks",
            "postgresql+psycopg://app:***@db/tasks",
        ),
        (
            "postgresql+psycopg://db/tasks?user=app&password=secret",
            "postgresql+psycopg://db/tasks?password=%2A%2A%2A&user=app",
        ),
        ("sqlite:///./taskmill.db", "sqlite:///./taskmill.db"),
        ("not a url", "not a url"),
    ],
)
def test_display_url_masks_passwords(url: str, shown: str) -> None:
    assert display_url(url) == shown
