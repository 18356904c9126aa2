"""Task statuses, the allowed transitions between them, and the user actions.

``TRANSITIONS`` is the one table that every status change is checked against:

- created as PENDING, or as PAUSED when it is held until a user starts it;
- PENDING -> RUNNING when a runner claims it, -> PAUSED or STOPPED on request;
- RUNNING -> FINISHED, FAILED or STOPPED when the run ends, -> PAUSED at a
  checkpoint after a pause request, -> PENDING when it is suspended at
  shutdown or recovered after its process died;
- PAUSED -> PENDING on resume, -> STOPPED on request;
- FINISHED, FAILED or STOPPED -> PENDING on restart.

``ACTIONS`` lists the statuses in which each user action is accepted.
"""

from __future__ import annotations

import enum


class TaskStatus(enum.StrEnum):
    """The lifecycle status of a task; the value is what the database stores."""

    #: Waiting for a worker slot.
    PENDING = "PENDING"
    #: A runner executes its hooks.
    RUNNING = "RUNNING"
    #: Held by a user; it does not run until resumed.
    PAUSED = "PAUSED"
    #: ``run()`` and ``post()`` returned; the result is stored.
    FINISHED = "FINISHED"
    #: A hook raised, or the run was lost; the error is stored.
    FAILED = "FAILED"
    #: Ended on a user's request. Not a failure.
    STOPPED = "STOPPED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


class ControlRequest(enum.StrEnum):
    """A request that a running task honours at its next checkpoint."""

    PAUSE = "PAUSE"
    STOP = "STOP"


class Action(enum.StrEnum):
    """A user action on a task."""

    START = "start"
    RESUME = "resume"
    PAUSE = "pause"
    STOP = "stop"
    RESTART = "restart"


TERMINAL = frozenset({TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.STOPPED})

#: Status -> the statuses it may change to.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset(
        {TaskStatus.RUNNING, TaskStatus.PAUSED, TaskStatus.STOPPED}
    ),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.FINISHED,
            TaskStatus.FAILED,
            TaskStatus.STOPPED,
            TaskStatus.PAUSED,
            # Suspended at shutdown or recovered after a crash: queued again.
            TaskStatus.PENDING,
        }
    ),
    TaskStatus.PAUSED: frozenset({TaskStatus.PENDING, TaskStatus.STOPPED}),
    TaskStatus.FINISHED: frozenset({TaskStatus.PENDING}),
    TaskStatus.FAILED: frozenset({TaskStatus.PENDING}),
    TaskStatus.STOPPED: frozenset({TaskStatus.PENDING}),
}

#: The statuses a new task may be created in.
INITIAL = frozenset({TaskStatus.PENDING, TaskStatus.PAUSED})

#: Action -> the statuses in which a user may take it. A RUNNING task takes
#: pause and stop as a request that it honours at its next checkpoint.
ACTIONS: dict[Action, frozenset[TaskStatus]] = {
    Action.START: frozenset({TaskStatus.PAUSED}),
    Action.RESUME: frozenset({TaskStatus.PAUSED}),
    Action.PAUSE: frozenset({TaskStatus.PENDING, TaskStatus.RUNNING}),
    Action.STOP: frozenset({TaskStatus.PENDING, TaskStatus.PAUSED, TaskStatus.RUNNING}),
    Action.RESTART: TERMINAL,
}


def is_allowed(current: TaskStatus, target: TaskStatus) -> bool:
    return target in TRANSITIONS[current]


def allowed_actions(
    status: TaskStatus, pending: ControlRequest | None = None
) -> list[Action]:
    """Return the actions a user may take on a task, in a stable order.

    A RUNNING task with a stop pending accepts only stop again: a pause can no
    longer take effect.
    """
    if status == TaskStatus.RUNNING and pending == ControlRequest.STOP:
        return [Action.STOP]
    return [action for action, accepted in ACTIONS.items() if status in accepted]
