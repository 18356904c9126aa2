from __future__ import annotations

import pytest

from taskmill import ControlRequest, InvalidTransition, TaskStatus
from taskmill.status import ACTIONS, TRANSITIONS, Action, allowed_actions, is_allowed

S = TaskStatus


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(TaskStatus)


def test_values_are_upper_case_names() -> None:
    for status in TaskStatus:
        assert status.value == status.name


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.PENDING, S.RUNNING),
        (S.PENDING, S.PAUSED),
        (S.PENDING, S.STOPPED),
        (S.RUNNING, S.FINISHED),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.STOPPED),
        (S.RUNNING, S.PAUSED),
        (S.RUNNING, S.PENDING),
        (S.PAUSED, S.PENDING),
        (S.PAUSED, S.STOPPED),
        (S.FINISHED, S.PENDING),
        (S.FAILED, S.PENDING),
        (S.STOPPED, S.PENDING),
    ],
)
def test_allowed_transitions(current: TaskStatus, target: TaskStatus) -> None:
    assert is_allowed(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.PENDING, S.FINISHED),
        (S.PENDING, S.FAILED),
        (S.PAUSED, S.RUNNING),
        (S.PAUSED, S.FINISHED),
        (S.FINISHED, S.RUNNING),
        (S.FINISHED, S.FAILED),
        (S.FAILED, S.FINISHED),
        (S.STOPPED, S.RUNNING),
        (S.STOPPED, S.PAUSED),
    ],
)
def test_rejected_transitions(current: TaskStatus, target: TaskStatus) -> None:
    assert not is_allowed(current, target)


def test_no_status_moves_to_itself() -> None:
    for status in TaskStatus:
        assert not is_allowed(status, status)


def test_terminal_statuses_only_restart() -> None:
    for status in (S.FINISHED, S.FAILED, S.STOPPED):
        assert status.is_terminal
        assert TRANSITIONS[status] == {S.PENDING}
        assert allowed_actions(status) == [Action.RESTART]


def test_stopped_is_not_a_failure() -> None:
    assert S.STOPPED is not S.FAILED
    assert S.STOPPED.is_terminal


def test_actions_follow_transitions() -> None:
    # Every action that is accepted in a status that is not RUNNING moves it
    # along a transition that the table allows.
    targets = {
        Action.START: S.PENDING,
        Action.RESUME: S.PENDING,
        Action.PAUSE: S.PAUSED,
        Action.STOP: S.STOPPED,
        Action.RESTART: S.PENDING,
    }
    for action, statuses in ACTIONS.items():
        for status in statuses - {S.RUNNING}:
            assert is_allowed(status, targets[action]), (action, status)


def test_allowed_actions_of_running() -> None:
    assert allowed_actions(S.RUNNING) == [Action.PAUSE, Action.STOP]


def test_allowed_actions_of_paused() -> None:
    assert allowed_actions(S.PAUSED) == [Action.START, Action.RESUME, Action.STOP]


def test_invalid_transition_message_names_status_and_actions() -> None:
    error = InvalidTransition("t-1", S.FINISHED, Action.PAUSE)
    assert "'t-1'" in str(error)
    assert "FINISHED" in str(error)
    assert "restart" in str(error)
    assert error.allowed == [Action.RESTART]


def test_stop_pending_allows_only_stop() -> None:
    assert allowed_actions(S.RUNNING, ControlRequest.STOP) == [Action.STOP]
    assert allowed_actions(S.RUNNING, ControlRequest.PAUSE) == [
        Action.PAUSE,
        Action.STOP,
    ]


def test_invalid_transition_with_stop_pending() -> None:
    error = InvalidTransition("t-1", S.RUNNING, Action.PAUSE, ControlRequest.STOP)
    assert "stop request pending" in str(error)
    assert "Actions allowed now: stop." in str(error)
