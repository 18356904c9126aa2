"""Create the tasks and task_events tables, or adopt those of an older taskmill.

Databases that taskmill created before it had migrations hold these tables
already, in one of their earlier shapes: this revision adds what they lack
and replaces their superseded indexes, and keeps every row.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _added_columns(table: str) -> list[sa.Column[object]]:
    """Return new copies of the columns that earlier versions of ``table`` lack."""
    if table == "task_events":
        return [
            sa.Column(
                "kind", sa.String(16), server_default="transition", nullable=False
            )
        ]
    return [
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("run_after", sa.DateTime(timezone=True)),
    ]


#: Every index: name, table and columns.
_INDEXES = (
    ("ix_tasks_status_created_at_id", "tasks", ("status", "created_at", "id")),
    ("ix_tasks_name_created_at_id", "tasks", ("name", "created_at", "id")),
    ("ix_tasks_created_at_id", "tasks", ("created_at", "id")),
    ("ix_tasks_updated_at_id", "tasks", ("updated_at", "id")),
    ("ix_task_events_task_id", "task_events", ("task_id",)),
)

#: Indexes of the first version, which the ones ending in ``id`` replace.
_SUPERSEDED_INDEXES = (
    "ix_tasks_status_created_at",
    "ix_tasks_name_created_at",
    "ix_tasks_created_at",
)


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("tasks"):
        _adopt_existing_tables()
        return
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON()),
        sa.Column("error", sa.JSON()),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text()),
        sa.Column("checkpoint", sa.JSON()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("recoveries", sa.Integer(), nullable=False),
        sa.Column("control", sa.String(16)),
        sa.Column("owner", sa.String(64)),
        *_added_columns("tasks"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
    )
    op.create_table(
        "task_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("task_id", sa.String(36), nullable=False),
        sa.Column("from_status", sa.String(16)),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        *_added_columns("task_events"),
        sa.PrimaryKeyConstraint("id", name="pk_task_events"),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
            name="fk_task_events_task_id_tasks",
            ondelete="CASCADE",
        ),
    )
    for name, table, columns in _INDEXES:
        op.create_index(name, table, list(columns))


def _adopt_existing_tables() -> None:
    inspector = sa.inspect(op.get_bind())
    tables = ("tasks", "task_events")
    for table in tables:
        present = {column["name"] for column in inspector.get_columns(table)}
        for column in _added_columns(table):
            if column.name not in present:
                op.add_column(table, column)
    indexes = {
        index["name"] for table in tables for index in inspector.get_indexes(table)
    }
    for name in _SUPERSEDED_INDEXES:
        if name in indexes:
            op.drop_index(name, table_name="tasks")
    for name, table, columns in _INDEXES:
        if name not in indexes:
            op.create_index(name, table, list(columns))


def downgrade() -> None:
    op.drop_table("task_events")
    op.drop_table("tasks")
