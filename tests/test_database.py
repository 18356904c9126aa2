"""Database: write turns between the threads of one process on SQLite."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.exc import OperationalError

from taskmill import Database, crud
from taskmill.database import is_transient


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
        # The API answers 503 for it, as for a lock held by another process.
        assert is_transient(caught.value)
    finally:
        release.set()
        holder.join(5)
        database.dispose()
    # The turn is free again once the holder commits.
    with database.write() as session:
        crud.create_task(session, name="after", params={})
    database.dispose()
