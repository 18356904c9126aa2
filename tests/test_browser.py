"""End-to-end test of the dashboard in headless Chromium, driven by Playwright.

It uses Debian's Chromium at ``/usr/bin/chromium`` (``apt-get install
chromium``) rather than a browser that Playwright downloads. Without it the
test is skipped, except under CI (the ``CI`` variable is set), where it fails.
Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import ROOT, ServerProcess, eventually

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
#: Milliseconds that a step in the page may take before the test fails.
STEP_TIMEOUT = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = (
            f"{CHROMIUM} not found; install it with `apt-get install chromium` "
            "to run the browser tests."
        )
        if "CI" in os.environ:
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def page_errors() -> list[str]:
    """The errors that the page logs; a test removes those it expects."""
    return []


@pytest.fixture
def page(browser: Browser, page_errors: list[str]) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(STEP_TIMEOUT)
    errors = page_errors
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: (
            errors.append(message.text) if message.type == "error" else None
        ),
    )
    yield page
    page.close()
    assert not errors, f"The page logged errors: {errors}"


def progress_of(page: Page) -> float:
    bar = page.locator("#task-progress [role=progressbar]")
    return float(bar.get_attribute("aria-valuenow") or 0)


def wait_for_progress_above(page: Page, value: float) -> float:
    page.wait_for_function(
        """(value) => Number(document.querySelector(
            '#task-progress [role=progressbar]').getAttribute('aria-valuenow')) > value""",
        arg=value,
    )
    return progress_of(page)


def test_dashboard_starts_pauses_and_resumes_countdown(
    make_server: Callable[..., ServerProcess], page: Page
) -> None:
    server = make_server()
    page.goto(f"{server.url}/dashboard#/new")
    page.select_option("#new-type", "countdown")
    page.fill("#param-seconds", "4")
    page.fill("#param-steps", "40")
    page.click("#new-form button[type=submit]")

    page.wait_for_url(re.compile(r"#/tasks/"))
    status = page.locator("#task-status")
    expect(status).to_have_text("RUNNING")
    first = wait_for_progress_above(page, 0)
    wait_for_progress_above(page, first)

    page.click("#task-actions [data-action=pause]")
    expect(status).to_have_text("PAUSED")
    expect(page.locator("#task-actions [data-action=resume]")).to_be_visible()
    expect(page.locator("#task-actions [data-action=pause]")).to_have_count(0)
    paused_at = progress_of(page)
    assert 0 < paused_at < 100

    page.click("#task-actions [data-action=resume]")
    expect(status).to_have_text("FINISHED", timeout=20_000)
    assert progress_of(page) == 100
    expect(page.locator("#task-actions [data-action=restart]")).to_be_visible()
    history = page.locator("#task-history li")
    expect(history.last).to_contain_text("FINISHED")
    expect(history).to_contain_text(["PENDING", "RUNNING", "PAUSED"])
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "dashboard-task.png", full_page=True)

    page.click("text=All tasks")
    row = page.locator("#task-rows tr").first
    expect(row.locator(".status")).to_have_text("FINISHED")
    expect(page.locator("#counts [data-status=FINISHED] strong")).to_have_text("1")
    page.screenshot(path=ARTIFACTS / "dashboard-list.png")


class DemoServer(ServerProcess):
    """The demo app (``taskmill.demo:create_app``) in its own process group."""

    def start(self) -> None:
        env = {**os.environ, **self.env, "TASKMILL_DATABASE_URL": self.database_url}
        command = [
            sys.executable, "-m", "uvicorn", "taskmill.demo:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.log_path.parent,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        eventually(self._is_healthy, timeout=20, interval=0.05)


@pytest.fixture
def demo_with_key(database_url: str, tmp_path: Path) -> Iterator[DemoServer]:
    env = {"TASKMILL_API_KEY": API_KEY, "TASKMILL_DIGEST_ROOTS": str(tmp_path)}
    server = DemoServer(database_url, tmp_path / "demo.log", env)
    server.start()
    yield server
    server.stop()


API_KEY = "browser-test-key"


def test_dashboard_asks_for_api_key(
    demo_with_key: DemoServer, page: Page, page_errors: list[str]
) -> None:
    server = demo_with_key
    headers = {"X-API-Key": API_KEY}
    body = {"name": "countdown", "params": {"seconds": 0, "steps": 1}}
    created = server.client.post("/tasks", json=body, headers=headers)
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]

    page.goto(f"{server.url}/dashboard")
    form = page.locator("#key-form")
    expect(form).to_be_visible()
    expect(page.locator("#key-message")).to_contain_text("requires an API key")
    expect(page.locator("#task-rows tr")).to_have_count(0)

    page.fill("#key-input", "wrong-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-message")).to_contain_text("rejected")

    page.fill("#key-input", API_KEY)
    page.click("#key-form button[type=submit]")
    expect(form).to_be_hidden()
    row = page.locator(f"#task-rows tr[data-task-id='{task_id}']")
    expect(row.locator(".status")).to_have_text("FINISHED")
    expect(page.locator("#connection")).to_have_text("Live")
    expect(page.locator("#counts [data-status=FINISHED] strong")).to_have_text("1")
    stored = page.evaluate("sessionStorage.getItem('taskmill.apiKey')")
    assert stored == API_KEY

    # The stream sends the key in the URL; the access log must not show it.
    log = server.log()
    assert "GET /tasks/stream HTTP/1.1" in log
    assert API_KEY not in log

    # Chromium logs each 401 as an error: the page's first requests and the
    # request with the wrong key get one.
    unauthorized = [error for error in page_errors if "status of 401" in error]
    assert unauthorized
    page_errors[:] = [error for error in page_errors if error not in unauthorized]
