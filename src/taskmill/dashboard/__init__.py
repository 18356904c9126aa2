"""The dashboard: one HTML page, its script and its stylesheet.

The task router serves them at ``/dashboard`` and ``/dashboard/static/NAME``
under its own prefix and dependencies. The page calls the task API and its
streams by relative URLs, so it works under any prefix and behind a proxy
that strips one.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response

#: The assets that the page loads, with their media types.
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

#: Every script, style and connection comes from this origin: the page loads
#: nothing from the internet and runs no inline script.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def add_dashboard_routes(router: APIRouter) -> None:
    """Add the dashboard page and its assets to ``router``.

    The files are read now, so that a package installed without them fails
    when the router is built rather than at a browser's first request.
    """
    static = resources.files(__package__) / "static"
    page = (static / "index.html").read_bytes()
    assets = {name: (static / name).read_bytes() for name in ASSETS}

    @router.get("/dashboard", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers=_HEADERS)

    @router.get("/dashboard/static/{name}", include_in_schema=False)
    def dashboard_asset(name: str) -> Response:
        if name not in assets:
            detail = f"No dashboard asset {name!r}; the assets are {', '.join(ASSETS)}."
            return JSONResponse({"detail": detail}, status_code=404)
        return Response(assets[name], media_type=ASSETS[name], headers=_HEADERS)
