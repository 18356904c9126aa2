"""Checks of task classes at registration, and of params at creation."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from taskmill._json import to_json_value
from taskmill.exceptions import InvalidParams, ParamsTooLarge
from taskmill.retry import Retry
from taskmill.task import BaseTask


def check_task_class(task_class: Any) -> None:
    label = getattr(task_class, "__qualname__", repr(task_class))
    if not (isinstance(task_class, type) and issubclass(task_class, BaseTask)):
        raise TypeError(f"Cannot register {label}: task types must subclass BaseTask.")
    name = getattr(task_class, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"Cannot register task class {label}: set a class attribute "
            "`name` (a non-empty str)."
        )
    missing = sorted(getattr(task_class, "__abstractmethods__", ()))
    if missing:
        raise TypeError(
            f"Cannot register task class {label}: it does not define "
            f"{', '.join(m + '()' for m in missing)}. A task defines pre(), run() "
            "and post(); a hook with nothing to do can just `pass`."
        )
    if not isinstance(task_class.retry, Retry):
        raise TypeError(
            f"Cannot register task class {label}: `retry` must be a Retry "
            f"instance, got {task_class.retry!r}."
        )
    timeout = task_class.timeout
    valid_number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if timeout is not None and not (
        valid_number and math.isfinite(timeout) and timeout > 0
    ):
        raise TypeError(
            f"Cannot register task class {label}: `timeout` must be None or a "
            f"positive number of seconds, got {timeout!r}."
        )


def validate_params(
    task_class: type[BaseTask[Any]],
    params: Mapping[str, Any] | BaseModel | None,
    max_bytes: int,
) -> dict[str, Any]:
    """Validate params and return them as stored; raise ``InvalidParams``.

    The stored JSON is validated again in JSON mode, as a run reads it, so
    params that would not load back are rejected now rather than at run time.
    Params whose JSON is longer than ``max_bytes`` are rejected too.
    """
    model = task_class.params_model
    try:
        if isinstance(params, model):
            validated = params
        elif isinstance(params, BaseModel):
            validated = model.model_validate(params.model_dump())
        else:
            validated = model.model_validate(dict(params or {}))
        stored: dict[str, Any] = to_json_value(
            validated.model_dump(mode="json"),
            "The params object",
            max_bytes=max_bytes,
            too_large=ParamsTooLarge,
        )
        model.model_validate_json(json.dumps(stored))
    except ValidationError as exc:
        raise InvalidParams(task_class.name, exc.errors(include_url=False)) from exc
    except ParamsTooLarge as exc:
        # InvalidParams ends its message with a period of its own.
        error = {"loc": (), "msg": str(exc).removesuffix("."), "type": "too_large"}
        raise InvalidParams(task_class.name, [error]) from exc
    except (PydanticSerializationError, TypeError, ValueError, RecursionError) as exc:
        # ValueError: pydantic's serializer gives up on params nested too deep.
        error = {"loc": (), "msg": f"params must be JSON-serializable ({exc})"}
        raise InvalidParams(task_class.name, [error]) from exc
    return stored
