"""taskmill: durable, object-oriented background tasks for FastAPI applications."""

from __future__ import annotations

from taskmill.api import create_router
from taskmill.database import Database
from taskmill.exceptions import (
    CheckpointTooLarge,
    InvalidParams,
    InvalidTransition,
    ManagerNotRunning,
    PayloadTooLarge,
    ResultTooLarge,
    SchemaOutOfDate,
    TaskmillError,
    TaskNotFound,
    TaskTypeAlreadyRegistered,
    UnknownTaskType,
)
from taskmill.manager import TaskManager
from taskmill.retry import Retry
from taskmill.schemas import TaskEventInfo, TaskInfo
from taskmill.status import Action, ControlRequest, TaskStatus
from taskmill.task import BaseTask, NoParams

__all__ = [
    "Action",
    "BaseTask",
    "CheckpointTooLarge",
    "ControlRequest",
    "Database",
    "InvalidParams",
    "InvalidTransition",
    "ManagerNotRunning",
    "NoParams",
    "PayloadTooLarge",
    "ResultTooLarge",
    "Retry",
    "SchemaOutOfDate",
    "TaskEventInfo",
    "TaskInfo",
    "TaskManager",
    "TaskNotFound",
    "TaskStatus",
    "TaskTypeAlreadyRegistered",
    "TaskmillError",
    "UnknownTaskType",
    "create_router",
]
