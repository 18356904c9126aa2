"""Task code and databases that misbehave: the manager records an outcome anyway."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import psycopg.errors
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from taskmill import (
    BaseTask,
    Database,
    InvalidParams,
    NoParams,
    TaskManager,
    TaskStatus,
    create_router,
)
from taskmill.database import is_transient
from tests.conftest import PostgresServer, eventually
from tests.tasks import NoOp, StepParams, StepTask, ledger_steps

S = TaskStatus
MakeManager = Callable[..., TaskManager]


class RaiseParams(BaseModel):
    error: str


def make_error(name: str) -> BaseException:
    errors: dict[str, BaseException] = {
        "StopIteration": StopIteration(),
        "GeneratorExit": GeneratorExit(),
        "CancelledError": asyncio.CancelledError(),
        "KeyboardInterrupt": KeyboardInterrupt(),
        "SystemExit": SystemExit(3),
    }
    return errors[name]


class RaiseInRun(BaseTask[RaiseParams]):
    name = "raise_in_run"
    params_model = RaiseParams

    def pre(self) -> None:
        pass

    def run(self) -> None:
        raise make_error(self.params.error)

    def post(self) -> None:
        pass


class RaiseInAsyncRun(BaseTask[RaiseParams]):
    name = "raise_in_async_run"
    params_model = RaiseParams

    async def pre(self) -> None:
        pass

    async def run(self) -> None:
        raise make_error(self.params.error)

    async def post(self) -> None:
        pass


ERRORS = [
    "StopIteration",
    "GeneratorExit",
    "CancelledError",
    "KeyboardInterrupt",
    "SystemExit",
]


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("task_name", ["raise_in_run", "raise_in_async_run"])
def test_unusual_exception_fails_task(
    make_manager: MakeManager, task_name: str, error: str
) -> None:
    manager = make_manager(RaiseInRun, RaiseInAsyncRun, NoOp, max_workers=1)
    failed = manager.wait(manager.create(task_name, {"error": error}).id, timeout=5)
    assert failed.status == S.FAILED
    assert failed.error is not None
    assert failed.error.phase == "run"
    # The slot is free again and the registry forgot the task.
    assert manager.wait(manager.create("noop").id, timeout=5).status == S.FINISHED
    eventually(lambda: not manager.live_task_ids())


class Report(BaseTask[NoParams]):
    name = "report"

    def pre(self) -> None:
        pass

    def run(self) -> str:
        self.set_progress(50, message="reading caf\udce9")
        self.checkpoint({"done": 1})
        return "ok"

    def post(self) -> None:
        pass


class ReturnSurrogate(BaseTask[NoParams]):
    name = "return_surrogate"

    def pre(self) -> None:
        pass

    def run(self) -> str:
        return "caf\udce9"

    def post(self) -> None:
        pass


class FailWithSurrogate(BaseTask[NoParams]):
    name = "fail_with_surrogate"

    def pre(self) -> None:
        pass

    def run(self) -> None:
        raise ValueError("cannot read caf\udce9")

    def post(self) -> None:
        pass


def test_surrogate_in_message_is_escaped(make_manager: MakeManager) -> None:
    manager = make_manager(Report)
    done = manager.wait(manager.create("report").id)
    assert done.status == S.FINISHED
    assert done.message == "reading caf\\udce9"


def test_surrogate_in_result_fails_clearly(make_manager: MakeManager) -> None:
    manager = make_manager(ReturnSurrogate)
    failed = manager.wait(manager.create("return_surrogate").id)
    assert failed.status == S.FAILED
    assert failed.error is not None
    assert "unpaired surrogate" in failed.error.message


def test_surrogate_in_error_is_escaped(make_manager: MakeManager) -> None:
    manager = make_manager(FailWithSurrogate)
    failed = manager.wait(manager.create("fail_with_surrogate").id)
    assert failed.error is not None
    assert failed.error.message == "cannot read caf\\udce9"


class AnyParams(BaseModel):
    text: str


class Echo(BaseTask[AnyParams]):
    name = "echo"
    params_model = AnyParams

    def pre(self) -> None:
        pass

    def run(self) -> str:
        return self.params.text

    def post(self) -> None:
        pass


def test_surrogate_in_params_rejected(make_manager: MakeManager) -> None:
    manager = make_manager(Echo)
    with pytest.raises(InvalidParams, match="unpaired surrogate"):
        manager.create("echo", {"text": "caf\udce9"})
    assert manager.list() == []


@pytest.fixture
def client(make_manager: MakeManager) -> Any:
    manager = make_manager(Echo)
    app = FastAPI()
    app.include_router(create_router(manager))
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": NaN}',
        b'{"name": "echo", "params": {"text": NaN}}',
        b'{"name": "\\ud800"}',
        b'{"name": "echo", "params": {"text": "\\ud800"}}',
    ],
)
def test_unencodable_body_is_4xx(client: TestClient, body: bytes) -> None:
    response = client.post(
        "/tasks", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code in (404, 422), response.text


def test_huge_offset_is_422(client: TestClient) -> None:
    response = client.get("/tasks", params={"offset": 10**20})
    assert response.status_code == 422


def disk_full_error(database: Database) -> Exception:
    """Return the error that the database's driver raises when the disk is full."""
    if database.dialect == "sqlite":
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorname = "SQLITE_FULL"
        return error
    return psycopg.errors.DiskFull("could not extend file: No space left on device")


def fail_writes(
    manager: TaskManager, matches: Callable[[dict[str, Any]], bool], times: int
) -> list[str]:
    """Make the next ``times`` statements that ``matches`` fail, as a full disk does.

    ``matches`` gets the statement's parameters as Python values, before the
    driver's conversions, so the same test works on every backend.
    """
    failures: list[str] = []
    database = manager.database

    @event.listens_for(database.engine, "before_cursor_execute")
    def fail(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        # Statements run as plain SQL, such as BEGIN, have no such parameters.
        values = getattr(context, "compiled_parameters", None) or []
        if len(failures) < times and any(matches(each) for each in values):
            failures.append(statement)
            raise disk_full_error(database)

    return failures


def sets_status(status: TaskStatus) -> Callable[[dict[str, Any]], bool]:
    # Prebuilt statements name their parameters after the column with "p_".
    return lambda values: status in (values.get("status"), values.get("p_status"))


def test_outcome_written_after_database_recovers(make_manager: MakeManager) -> None:
    manager = make_manager(NoOp, progress_interval=0.05)
    failures = fail_writes(manager, sets_status(S.FINISHED), times=3)
    task = manager.create("noop")
    finished = manager.wait(task.id, timeout=5)
    assert finished.status == S.FINISHED
    assert len(failures) == 3
    eventually(lambda: not manager.live_task_ids())


def test_outcome_not_written_stays_for_recovery(database_url: str) -> None:
    manager = TaskManager(database_url, progress_interval=0.05)
    manager.register(NoOp)
    manager.startup()
    try:
        failures = fail_writes(manager, sets_status(S.FINISHED), times=10_000)
        task = manager.create("noop")
        eventually(lambda: len(failures) >= 2)
    finally:
        manager.shutdown(grace=0.5)
    # The run finished but could not say so: the next start runs it again.
    again = TaskManager(database_url)
    again.register(NoOp)
    again.startup()
    try:
        info = again.wait(task.id, timeout=5)
    finally:
        again.shutdown()
    assert info.status == S.FINISHED
    assert info.recoveries == 1


class Checkpointing(BaseTask[NoParams]):
    name = "checkpointing"

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, int]:
        done = self.state["step"] if self.state else 0
        for step in range(done + 1, 6):
            self.sleep(0.02)
            self.checkpoint({"step": step})
        return {"resumed_after": done}

    def post(self) -> None:
        pass


def test_checkpoint_database_fault_suspends_run(make_manager: MakeManager) -> None:
    manager = make_manager(Checkpointing, progress_interval=0.05, poll_interval=0.1)
    # The third checkpoint fails as a full disk does; the run must go back
    # to PENDING and resume after the second, not fail.
    failures = fail_writes(
        manager, lambda values: values.get("checkpoint") == {"step": 3}, times=1
    )
    finished = manager.wait(manager.create("checkpointing").id, timeout=10)
    assert failures
    assert finished.status == S.FINISHED
    assert finished.result == {"resumed_after": 2}
    reasons = [event.reason for event in manager.events(finished.id)]
    assert any("did not accept a checkpoint" in reason for reason in reasons)


class MutatesResult(BaseTask[NoParams]):
    name = "mutates_result"

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, Any]:
        return {"tags": ["a"]}

    def post(self) -> None:
        self.result["tags"] = {"not", "json"}


def test_post_cannot_change_stored_result(make_manager: MakeManager) -> None:
    manager = make_manager(MutatesResult)
    done = manager.wait(manager.create("mutates_result").id, timeout=5)
    assert done.status == S.FINISHED
    assert done.result == {"tags": ["a"]}


class SleepsOnLoop(BaseTask[NoParams]):
    name = "sleeps_on_loop"

    async def pre(self) -> None:
        pass

    async def run(self) -> None:
        self.sleep(1)

    async def post(self) -> None:
        pass


def test_blocking_sleep_in_async_hook_fails(make_manager: MakeManager) -> None:
    manager = make_manager(SleepsOnLoop)
    failed = manager.wait(manager.create("sleeps_on_loop").id, timeout=5)
    assert failed.status == S.FAILED
    assert failed.error is not None
    assert "asyncio.sleep" in failed.error.message


class NestedWrite(BaseTask[NoParams]):
    name = "nested_write"

    def pre(self) -> None:
        pass

    def run(self) -> None:
        with self.database.write():
            self.checkpoint({"inside": True})

    def post(self) -> None:
        pass


def test_nested_write_fails_at_once(make_manager: MakeManager) -> None:
    manager = make_manager(NestedWrite)
    failed = manager.wait(manager.create("nested_write").id, timeout=5)
    assert failed.status == S.FAILED
    assert failed.error is not None
    assert "already open on this thread" in failed.error.message


class BadEffects(BaseTask[NoParams]):
    name = "bad_effects"

    def pre(self) -> None:
        pass

    def run(self) -> None:
        self.checkpoint(
            {"i": 1},
            effects=lambda s: s.execute(text("INSERT INTO nowhere VALUES (1)")),
        )

    def post(self) -> None:
        pass


#: How each backend's error names the table that BadEffects writes to.
MISSING_TABLE = {
    "sqlite": "no such table: nowhere",
    "postgresql": 'relation "nowhere" does not exist',
}


def test_bad_sql_in_effects_fails_task(make_manager: MakeManager, backend: str) -> None:
    manager = make_manager(BadEffects, poll_interval=0.05)
    failed = manager.wait(manager.create("bad_effects").id, timeout=5)
    assert failed.status == S.FAILED
    assert failed.attempts == 1
    assert failed.error is not None
    assert MISSING_TABLE[backend] in failed.error.message


def open_with_lock_wait(database_url: str, seconds: float) -> Database:
    """Open a database on which a statement waits at most ``seconds`` for a lock."""
    # On PostgreSQL, busy_timeout sets each connection's lock_timeout.
    return Database(database_url, busy_timeout=seconds)


@contextmanager
def hold_write_lock(database_url: str) -> Iterator[None]:
    """Hold, on a connection of its own, the lock that writes to the tasks table wait for.

    On SQLite it is the write lock of a BEGIN IMMEDIATE transaction, and on
    PostgreSQL it is LOCK TABLE tasks IN EXCLUSIVE MODE. Both let readers read.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        holder = sqlite3.connect(url.database, isolation_level=None, timeout=30)
        try:
            holder.execute("BEGIN IMMEDIATE")
            yield
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        return
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("LOCK TABLE tasks IN EXCLUSIVE MODE"))
            yield
            connection.rollback()
    finally:
        engine.dispose()


def test_locked_database_answers_503(database_url: str) -> None:
    database = open_with_lock_wait(database_url, 0.2)
    manager = TaskManager(database)
    manager.register(Echo)
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager))
    try:
        with TestClient(app) as client:
            with hold_write_lock(database_url):
                response = client.post(
                    "/tasks", json={"name": "echo", "params": {"text": "x"}}
                )
            assert response.status_code == 503
            assert "retry later" in response.json()["detail"]
            assert response.headers["retry-after"] == "1"
            after = client.post(
                "/tasks", json={"name": "echo", "params": {"text": "x"}}
            )
            assert after.status_code == 201
    finally:
        database.dispose()


def chattr(flag: str, *paths: str) -> bool:
    done = subprocess.run(["chattr", flag, *paths], capture_output=True, check=False)
    return done.returncode == 0


@contextmanager
def read_only_spell(database: Database) -> Iterator[None]:
    """Make the database read-only for the connections opened while the block runs.

    Both backends keep such a connection read-only after the block. SQLite
    does because the file was not writable when the connection opened it.
    PostgreSQL does because a session reads default_transaction_read_only
    when it starts; operators set it to make a database read-only for
    maintenance.
    """
    url = database.engine.url
    assert url.database is not None
    if database.dialect == "sqlite":
        files = [url.database, url.database + "-wal"]
        if not chattr("+i", *files):
            pytest.skip("chattr +i is not supported on this file system")
        try:
            yield
        finally:
            chattr("-i", *files)
        return
    engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    # One session, opened before the spell, so that it can also end it.
    with engine.connect() as admin:
        name = admin.dialect.identifier_preparer.quote(url.database)
        admin.execute(
            text(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        )
        try:
            yield
        finally:
            admin.execute(
                text(f"ALTER DATABASE {name} RESET default_transaction_read_only")
            )
    engine.dispose()


def test_connections_recover_after_read_only_spell(make_manager: MakeManager) -> None:
    manager = make_manager(Echo)
    manager.create("echo", {"text": "before"})
    with read_only_spell(manager.database):
        # Every connection opened now is read-only, and stays so.
        manager.database.engine.dispose()
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda _: manager.list(), range(12)))
    failures = 0
    for attempt in range(4):
        try:
            created = manager.create("echo", {"text": f"after {attempt}"})
        except SQLAlchemyError as exc:
            if not is_transient(exc):
                raise
            failures += 1
    # The first write may meet a read-only connection, which fails as an
    # unavailable database. The pool then replaces its connections, so the
    # writes after it succeed.
    assert failures <= 1
    assert manager.wait(created.id, timeout=5).status == S.FINISHED


def terminate_sessions(server: PostgresServer, database: str) -> int:
    """End every session on ``database``, as a server restart does, and count them."""
    with server.admin.connect() as connection:
        ended = connection.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": database},
        ).scalar_one()
    return int(ended)


@contextmanager
def connections_refused(server: PostgresServer, database: str) -> Iterator[None]:
    """Make PostgreSQL refuse connections to ``database`` while the block runs.

    The server ends the open sessions too, so the application's pooled
    connections break as in an outage.
    """
    quoted = server.admin.dialect.identifier_preparer.quote(database)
    with server.admin.connect() as connection:
        connection.execute(text(f"ALTER DATABASE {quoted} ALLOW_CONNECTIONS false"))
    try:
        terminate_sessions(server, database)
        yield
    finally:
        with server.admin.connect() as connection:
            connection.execute(text(f"ALTER DATABASE {quoted} ALLOW_CONNECTIONS true"))


@pytest.mark.postgresql
def test_refused_connections_answer_503(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    manager = TaskManager(postgres_url, progress_interval=0.05)
    manager.register(Echo)
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager))
    body = {"name": "echo", "params": {"text": "x"}}
    database = make_url(postgres_url).database
    assert database is not None
    with TestClient(app) as client:
        stored = [client.post("/tasks", json=body).json()["id"] for _ in range(3)]
        before = [manager.wait(task_id, timeout=5) for task_id in stored]
        with connections_refused(postgres_server, database):
            # Pooled connections are broken and new ones refused.
            created = client.post("/tasks", json=body)
            listed = client.get("/tasks")
        assert created.status_code == 503
        assert "retry later" in created.json()["detail"]
        assert created.headers["retry-after"] == "1"
        assert listed.status_code == 503
        assert "retry later" in listed.json()["detail"]
        assert listed.headers["retry-after"] == "1"
        after = client.post("/tasks", json=body)
        assert after.status_code == 201
        assert manager.wait(after.json()["id"], timeout=5).status == S.FINISHED
    # The outage lost and changed no stored task.
    assert [info.status for info in before] == [S.FINISHED] * 3
    assert [manager.get(task_id) for task_id in stored] == before


@pytest.mark.postgresql
def test_terminated_sessions_are_replaced(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    manager = TaskManager(postgres_url, progress_interval=0.05, poll_interval=0.1)
    manager.register(Echo)
    manager.register(StepTask)
    database = make_url(postgres_url).database
    assert database is not None
    manager.startup()
    try:
        task = manager.create("step", StepParams(n=30, step_s=0.05))
        eventually(lambda: manager.get(task.id).progress > 0, timeout=5)
        assert terminate_sessions(postgres_server, database) >= 1
        failures = 0
        for attempt in range(4):
            try:
                created = manager.create("echo", {"text": f"after {attempt}"})
            except OperationalError:
                failures += 1
        # The first write may meet a broken connection. The pool then
        # replaces its connections, so the writes after it succeed.
        assert failures <= 1
        assert manager.wait(created.id, timeout=5).status == S.FINISHED
        # The running task resumes from its last checkpoint if one failed,
        # and runs each step once.
        done = manager.wait(task.id, timeout=20)
        assert done.status == S.FINISHED
        assert ledger_steps(manager.database, task.id) == list(range(1, 31))
    finally:
        manager.shutdown(grace=1.0)


def test_failing_upkeep_backs_off(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskmill.manager")
    manager = make_manager(NoOp, progress_interval=0.05, poll_interval=0.05)
    tries: list[float] = []
    failing = True

    @event.listens_for(manager.database.engine, "before_cursor_execute")
    def fail(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        # The upkeep's look for lost runs, its first statement on each poll.
        if (
            failing
            and statement.startswith("SELECT")
            and "lease_expires_at" in statement
        ):
            tries.append(time.monotonic())
            raise disk_full_error(manager.database)

    time.sleep(2.5)
    failing = False

    # Without backoff, 2.5 s at 0.05 s per try would be about 50 tries.
    assert 4 <= len(tries) <= 10, tries
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    assert gaps[2] > 2 * gaps[0], gaps
    eventually(
        lambda: any("works again" in r.getMessage() for r in caplog.records),
        timeout=10,
    )
    assert manager.wait(manager.create("noop").id).status == S.FINISHED
