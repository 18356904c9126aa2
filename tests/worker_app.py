"""Targets for ``taskmill worker --app`` in the command-line tests.

The database URL comes from ``TASKMILL_DATABASE_URL``. ``manager``, ``app``
and ``create_manager`` are the three forms that ``--app`` accepts.
``create_memory_manager`` returns a manager that cannot start, and the other
attributes are targets that ``--app`` rejects.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from taskmill import TaskManager
from taskmill.examples import Countdown
from tests.tasks import BlockingTask, StepTask, create_ledger


def create_manager() -> TaskManager:
    manager = TaskManager(
        os.environ["TASKMILL_DATABASE_URL"],
        progress_interval=0.05,
        poll_interval=0.2,
        shutdown_grace=2.0,
    )
    for task_class in (Countdown, StepTask, BlockingTask):
        manager.register(task_class)
    manager.database.create_schema()
    create_ledger(manager.database)
    return manager


manager = create_manager()

app = FastAPI(lifespan=manager.lifespan)
app.state.manager = manager

app_without_manager = FastAPI()

not_a_manager = 42


def create_with_argument(url: str) -> TaskManager:
    return TaskManager(url)


def create_memory_manager() -> TaskManager:
    return TaskManager("sqlite://")


def create_nothing() -> None:
    return None
