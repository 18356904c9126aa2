"""Schema migrations: new databases, databases of earlier versions, and concurrent upgrades."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from typer.testing import CliRunner

from taskmill import Database, SchemaOutOfDate, TaskManager, TaskStatus
from taskmill.cli import app
from taskmill.migrations import HEAD_REVISION
from taskmill.models import Base, TaskEventModel
from tests.conftest import ROOT, PostgresServer
from tests.tasks import StepTask, create_ledger, ledger_steps

LEGACY = Path(__file__).parent / "legacy"


def schema_differences(database: Database) -> list[object]:
    """Return what differs between the database's schema and the models."""
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        return list(compare_metadata(context, Base.metadata))


def test_head_revision_is_the_newest_migration() -> None:
    config = Config()
    config.set_main_option("script_location", "taskmill:migrations")
    assert ScriptDirectory.from_config(config).get_heads() == [HEAD_REVISION]


def test_upgrade_creates_the_schema_of_the_models(empty_database_url: str) -> None:
    database = Database(empty_database_url)
    try:
        assert database.revision() is None
        database.upgrade()
        assert database.revision() == HEAD_REVISION
        assert schema_differences(database) == []
        # A second upgrade finds nothing to do.
        database.upgrade()
        assert database.revision() == HEAD_REVISION
    finally:
        database.dispose()


def test_db_upgrade_command(empty_database_url: str) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["db", "current", "--db", empty_database_url])
    assert result.exit_code == 1
    assert "none (no taskmill tables)" in result.output
    assert "taskmill db upgrade" in result.output

    result = runner.invoke(app, ["db", "upgrade", "--db", empty_database_url])
    assert result.exit_code == 0, result.output
    assert f"from an empty database to revision {HEAD_REVISION}" in result.output

    result = runner.invoke(app, ["db", "upgrade", "--db", empty_database_url])
    assert result.exit_code == 0, result.output
    assert "already at revision" in result.output
    result = runner.invoke(app, ["db", "current", "--db", empty_database_url])
    assert result.exit_code == 0, result.output


def test_concurrent_upgrades_migrate_once(empty_database_url: str) -> None:
    """Machines that upgrade one database at once: one migrates, the others wait."""
    command = [
        sys.executable, "-m", "taskmill", "db", "upgrade", "--db", empty_database_url,
    ]  # fmt: skip
    processes = [
        subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=60)[0].decode() for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, outputs
    migrated = [output for output in outputs if "from an empty database" in output]
    assert len(migrated) == 1, outputs
    database = Database(empty_database_url)
    try:
        assert schema_differences(database) == []
    finally:
        database.dispose()


@pytest.mark.postgresql
def test_startup_on_postgresql_asks_for_an_upgrade(
    postgres_server: PostgresServer,
) -> None:
    name = postgres_server.create_database(migrated=False)
    empty_database_url = postgres_server.url_of(name)
    manager = TaskManager(empty_database_url)
    with pytest.raises(SchemaOutOfDate, match="taskmill db upgrade --db"):
        manager.startup()
    manager.database.dispose()
    # Nothing was created: the upgrade is the operator's step.
    assert not inspect(manager.database.engine).has_table("tasks")
    manager.database.dispose()

    result = CliRunner().invoke(app, ["serve", "--db", empty_database_url])
    assert result.exit_code == 2
    assert "taskmill db upgrade" in result.output
    postgres_server.drop_database(name)


def test_unstarted_manager_asks_for_an_upgrade(empty_database_url: str) -> None:
    manager = TaskManager(empty_database_url, max_workers=0)
    manager.register(StepTask)
    try:
        with pytest.raises(SchemaOutOfDate, match="taskmill db upgrade --db"):
            manager.list()
        with pytest.raises(SchemaOutOfDate, match="has no taskmill tables"):
            manager.create("step", {"n": 1})
        # Other tables that are missing keep the driver's own error.
        with (
            pytest.raises((OperationalError, ProgrammingError)) as raised,
            manager.database.read() as session,
        ):
            session.execute(text("SELECT * FROM items"))
        assert "items" in str(raised.value)
    finally:
        manager.database.dispose()


def test_startup_migrates_a_new_sqlite_file(sqlite_url: str) -> None:
    manager = TaskManager(sqlite_url, max_workers=0)
    manager.startup()
    try:
        assert manager.database.revision() == HEAD_REVISION
        assert schema_differences(manager.database) == []
    finally:
        manager.shutdown()


LEGACY_TASKS = [
    # id, status, attempts, result
    ("a0000000-0000-4000-8000-000000000001", "FINISHED", 1, 7),
    ("a0000000-0000-4000-8000-000000000002", "PENDING", 0, None),
    ("a0000000-0000-4000-8000-000000000003", "PAUSED", 1, None),
    ("a0000000-0000-4000-8000-000000000004", "RUNNING", 1, None),
]


def write_legacy_database(path: Path, schema: str) -> None:
    """Create a database as an earlier version of taskmill left it, with tasks in it."""
    connection = sqlite3.connect(path)
    with connection:
        connection.executescript((LEGACY / schema).read_text())
        for index, (task_id, status, attempts, result) in enumerate(LEGACY_TASKS):
            at = f"2026-11-0{index + 1} 10:00:00.000000"
            connection.execute(
                "INSERT INTO tasks (id, name, status, params, result, progress, "
                "checkpoint, attempts, recoveries, owner, created_at, updated_at) "
                "VALUES (?, 'step', ?, ?, ?, 50.0, ?, ?, 0, ?, ?, ?)",
                (
                    task_id,
                    status,
                    json.dumps({"n": 3, "step_s": 0.0}),
                    json.dumps(result),
                    json.dumps({"step": 2}) if status == "RUNNING" else None,
                    attempts,
                    "old-host:1:abcdef" if status == "RUNNING" else None,
                    at,
                    at,
                ),
            )
            connection.execute(
                "INSERT INTO task_events (task_id, from_status, to_status, at, reason) "
                "VALUES (?, NULL, ?, ?, 'created')",
                (task_id, status, at),
            )
    connection.close()


@pytest.mark.parametrize("schema", ["first_version.sql", "before_migrations.sql"])
def test_databases_of_earlier_versions_upgrade_without_losing_tasks(
    tmp_path: Path, schema: str
) -> None:
    path = tmp_path / "old.db"
    write_legacy_database(path, schema)
    url = f"sqlite:///{path}"

    result = CliRunner().invoke(app, ["db", "upgrade", "--db", url])
    assert result.exit_code == 0, result.output
    database = Database(url)
    try:
        assert database.revision() == HEAD_REVISION
        assert schema_differences(database) == []
        with database.read() as session:
            events = session.scalars(select(TaskEventModel)).all()
        assert {event.kind for event in events} == {"transition"}
        create_ledger(database)
    finally:
        database.dispose()

    manager = TaskManager(url, max_workers=2, poll_interval=0.1)
    manager.register(StepTask)
    manager.startup()
    try:
        finished, pending, paused, running = (row[0] for row in LEGACY_TASKS)
        assert manager.get(finished).result == 7
        assert manager.get(paused).status == TaskStatus.PAUSED
        assert manager.wait(pending, timeout=20).status == TaskStatus.FINISHED
        # Its runner is gone (and held no lease): it resumes from its checkpoint.
        recovered = manager.wait(running, timeout=20)
        assert recovered.status == TaskStatus.FINISHED
        assert recovered.recoveries == 1
        assert ledger_steps(manager.database, running) == [3]
        assert len(manager.list(limit=10)) == 4
        task_id = manager.create("step", {"n": 1, "step_s": 0.0}).id
        assert manager.wait(task_id, timeout=20).status == TaskStatus.FINISHED
    finally:
        manager.shutdown()
