"""API-key protection for the task API, as the demo app applies it.

Clients send the key in the ``X-API-Key`` header. A browser's ``EventSource``
cannot send headers, so the two event streams (and only they) also accept it
as the ``api_key`` query parameter. That is simpler than a short-lived signed
token, which the dashboard would have to fetch and renew before each
reconnection, but a key in a URL can land in logs. ``StreamKeyMiddleware``
therefore removes the parameter from every request before the app sees it, so
the access log of uvicorn does not contain it. Proxies in front of the app
log URLs too: configure them not to log query strings.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from typing import Annotated
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException, Request, Security, status
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from fastapi.sse import EventSourceResponse
from starlette.types import ASGIApp, Receive, Scope, Send

API_KEY_VARIABLE = "TASKMILL_API_KEY"
API_KEY_HEADER = "X-API-Key"
#: The query parameter that the event streams accept in place of the header.
STREAM_KEY_PARAMETER = "api_key"
#: The ``WWW-Authenticate`` scheme of a 401, as FastAPI's ``APIKeyHeader`` sends
#: it. The dashboard asks for a key only after a 401 with this scheme.
AUTHENTICATE_SCHEME = "APIKey"

#: Where ``StreamKeyMiddleware`` leaves the key that it took from the URL.
_SCOPE_KEY = "taskmill.query_api_key"
#: Visible ASCII: header values lose surrounding spaces, and browsers send
#: header values in Latin-1 only.
_VALID_KEY = re.compile(r"[\x21-\x7e]+")

_header_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description=f"The key that the server reads from {API_KEY_VARIABLE}.",
)


def api_key_from_environment() -> str | None:
    """Return ``TASKMILL_API_KEY``, or None when it is unset.

    Raises ValueError, without the value in its message, if the key is empty
    or contains anything but visible ASCII characters.
    """
    key = os.environ.get(API_KEY_VARIABLE)
    if key is None:
        return None
    if not _VALID_KEY.fullmatch(key):
        raise ValueError(
            f"{API_KEY_VARIABLE} must be a non-empty key of visible ASCII "
            "characters (no spaces), such as the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`. "
            "Unset it to serve without a key."
        )
    return key


def api_key_dependency(api_key: str) -> Callable[..., None]:
    """Return a FastAPI dependency that rejects requests without ``api_key`` with 401.

    Pass it as ``Depends(...)`` in ``create_router(dependencies=...)``. The
    key in the ``api_key`` query parameter counts only on the event streams
    and only with ``StreamKeyMiddleware`` installed on the app.
    """
    if not _VALID_KEY.fullmatch(api_key):
        raise ValueError("The API key must be non-empty visible ASCII (no spaces).")
    expected = api_key.encode("ascii")

    def require_api_key(
        request: Request,
        header_key: Annotated[str | None, Security(_header_scheme)],
    ) -> None:
        if header_key is not None:
            # Starlette decodes header values as Latin-1, so this is lossless.
            given, source = header_key.encode("latin-1"), f"the {API_KEY_HEADER} header"
        else:
            query_key: bytes | None = request.scope.get(_SCOPE_KEY)
            stream = _is_event_stream(request)
            if not query_key or not stream:
                misplaced = query_key is not None and not stream
                raise _unauthorized(_missing_key_message(misplaced))
            given, source = query_key, f"the {STREAM_KEY_PARAMETER} query parameter"
        # Constant time, so the response time tells nothing about the key.
        if not secrets.compare_digest(given, expected):
            raise _unauthorized(f"Invalid API key in {source}.")

    return require_api_key


def _is_event_stream(request: Request) -> bool:
    """Return whether the request is for a server-sent event stream route."""
    route = request.scope.get("route")
    return (
        request.method == "GET"
        and isinstance(route, APIRoute)
        and route.response_class is EventSourceResponse
    )


def _missing_key_message(sent_in_query: bool) -> str:
    message = f"Missing API key: send it in the {API_KEY_HEADER} header."
    if sent_in_query:
        message += (
            f" The {STREAM_KEY_PARAMETER} query parameter is accepted only by the "
            "event streams (GET /tasks/stream and GET /tasks/{id}/stream)."
        )
    return message


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": AUTHENTICATE_SCHEME},
    )


class StreamKeyMiddleware:
    """ASGI middleware that moves the ``api_key`` query parameter out of the URL.

    The last value of the parameter goes to the request scope, where the
    dependency of ``api_key_dependency()`` finds it; the other parameters keep
    their bytes and order.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["query_string"]:
            # In place, not on a copy: uvicorn (0.55) writes its access log
            # line from the scope object that it passed to the app.
            _take_key_from_query(scope)
        await self.app(scope, receive, send)


def _take_key_from_query(scope: Scope) -> None:
    kept: list[bytes] = []
    key: bytes | None = None
    for part in scope["query_string"].split(b"&"):
        name, _, value = part.partition(b"=")
        if _unquote_plus(name) == STREAM_KEY_PARAMETER.encode("ascii"):
            key = _unquote_plus(value)
        else:
            kept.append(part)
    if key is not None:
        scope["query_string"] = b"&".join(kept)
        scope[_SCOPE_KEY] = key


def _unquote_plus(text: bytes) -> bytes:
    return unquote_to_bytes(text.replace(b"+", b" "))
