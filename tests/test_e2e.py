"""End-to-end tests: a real server process is killed, stopped and restarted while
it digests a directory tree, and each task must end with the digest of the shell
pipeline that directory_digest reproduces.

The server's ``directory_digest`` is SlowDigest, which sleeps DIGEST_DELAY
seconds per file, so that a run lasts a few seconds and can be caught mid-way.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taskmill import Database
from tests.conftest import (
    ServerProcess,
    read_event_reasons,
    read_row,
    run_pipeline,
)

pytestmark = pytest.mark.e2e

PIPELINE = "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum"
DIGEST_DELAY = 0.01
"""Seconds that SlowDigest sleeps per file: about 4 s for the whole tree."""
GRACE = 2.0
"""Shutdown grace of the server in the SIGTERM test, in seconds."""

MakeServer = Callable[..., ServerProcess]


@dataclass(frozen=True)
class Tree:
    path: Path
    files: int
    digest: str


def build_tree(root: Path) -> int:
    """Write a nested tree of small files with awkward names; return the file count.

    The names include spaces, a backslash, a newline and bytes that are not UTF-8.
    Two symlinks (to a file and to a directory) must be neither counted nor followed.
    """
    base = os.fsencode(root)
    count = 0
    for top in range(4):
        for sub in range(5):
            directory = os.path.join(base, b"d%d" % top, b"sub %d" % sub)
            os.makedirs(directory)
            for index in range(20):
                with open(os.path.join(directory, b"f%03d.txt" % index), "wb") as file:
                    file.write(b"%d/%d/%d\n" % (top, sub, index) * (index + 1))
                count += 1
    odd_names = [
        b"with space.txt",
        b"back\\slash.txt",
        b"new\nline.txt",
        b"latin1-caf\xe9.txt",
        b"\xff\xfe raw bytes",
        b"d0/sub 0/nested \\ both\xe9",
    ]
    for name in odd_names:
        with open(os.path.join(base, name), "wb") as file:
            file.write(name)
        count += 1
    os.symlink(b"with space.txt", os.path.join(base, b"link to file"))
    os.symlink(b"d1", os.path.join(base, b"link to dir"))
    return count


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    path = tmp_path_factory.mktemp("tree")
    created = build_tree(path)
    listed = run_pipeline(path, "find . -type f -print0").count(b"\0")
    assert listed == created, "find sees a different number of files than were made"
    digest = hashlib.sha256(run_pipeline(path, PIPELINE)).hexdigest()
    return Tree(path=path, files=created, digest=digest)


# -- helpers --


def get_task(server: ServerProcess, task_id: str) -> dict[str, Any]:
    response = server.client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


def get_events(server: ServerProcess, task_id: str) -> list[dict[str, Any]]:
    response = server.client.get(f"/tasks/{task_id}/events")
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    return events


def post_action(server: ServerProcess, task_id: str, action: str) -> dict[str, Any]:
    response = server.client.post(f"/tasks/{task_id}/{action}")
    assert response.status_code == 202, f"{action}: {response.text}"
    task: dict[str, Any] = response.json()
    return task


def create_digest(server: ServerProcess, tree: Tree) -> str:
    body = {"name": "directory_digest", "params": {"path": str(tree.path)}}
    response = server.client.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


def wait_for_status(
    server: ServerProcess, task_id: str, status: str, timeout: float = 20.0
) -> dict[str, Any]:
    """Poll the task over HTTP until it has status; fail with the server log."""
    deadline = time.monotonic() + timeout
    task = get_task(server, task_id)
    while task["status"] != status:
        if time.monotonic() > deadline:
            pytest.fail(
                f"Task {task_id} did not become {status} within {timeout} s; last "
                f"seen {task['status']} at {task['progress']:.1f}%.\n{log_tail(server)}"
            )
        time.sleep(0.05)
        task = get_task(server, task_id)
    return task


def log_tail(server: ServerProcess, lines: int = 40) -> str:
    tail = "\n".join(server.log().splitlines()[-lines:])
    return f"Server log (last {lines} lines):\n{tail}"


def wait_for_checkpoint_mid_way(
    server: ServerProcess, database: Database, task_id: str, timeout: float = 20.0
) -> dict[str, Any]:
    """Poll the database until the task has saved a checkpoint and is 20-80% done."""
    deadline = time.monotonic() + timeout
    row = read_row(database, task_id)
    while row["checkpoint"] is None or not 20 <= row["progress"] < 80:
        if time.monotonic() > deadline:
            pytest.fail(
                f"Task {task_id} saved no checkpoint between 20% and 80% within "
                f"{timeout} s; last seen {row['status']} at {row['progress']:.1f}%."
                f"\n{log_tail(server)}"
            )
        time.sleep(0.05)
        row = read_row(database, task_id)
    return row


def checkpoint_files(checkpoint: Any) -> int:
    """Return how many files a saved digest checkpoint covers, or 0 without one."""
    if checkpoint is None:
        return 0
    # The checkpoint is dumped with exclude_defaults, so a count of 0 is left out.
    files: int = checkpoint.get("files", 0)
    return files


def first_files_hashed(server: ServerProcess, task_id: str) -> list[int]:
    """Return the number of the first file that each run hashed, from the server log."""
    pattern = re.compile(
        rf"Task {re.escape(task_id)} run hashed file (\d+) of \d+ first"
    )
    return [int(number) for number in pattern.findall(server.log())]


def transitions(events: list[dict[str, Any]]) -> list[tuple[str | None, str]]:
    return [(event["from_status"], event["to_status"]) for event in events]


def assert_digest_matches(
    task: dict[str, Any], tree: Tree, server: ServerProcess
) -> None:
    result = task["result"]
    assert task["status"] == "FINISHED", f"{task}\n{log_tail(server)}"
    assert result["digest"] == tree.digest, f"result {result}, pipeline {tree.digest}"
    assert result["files"] == tree.files, f"result {result}"
    assert "vanished" not in result, f"result {result}"
    assert task["progress"] == 100.0


# -- tests --


def test_paused_task_survives_kill9(
    make_server: MakeServer, tree: Tree, database: Database
) -> None:
    server = make_server(
        TASKMILL_TEST_DIGEST_DELAY=str(DIGEST_DELAY),
        TASKMILL_DIGEST_ROOTS=str(tree.path),
    )
    task_id = create_digest(server, tree)
    # Waiting for a checkpoint lets the resumed run prove that it skips files.
    wait_for_checkpoint_mid_way(server, database, task_id)
    post_action(server, task_id, "pause")
    paused = wait_for_status(server, task_id, "PAUSED")
    assert 0 < paused["progress"] < 100, paused
    assert paused["owner"] is None, paused
    assert paused["pending_request"] is None, paused
    assert paused["attempts"] == 1, paused
    saved_files = checkpoint_files(read_row(database, task_id)["checkpoint"])
    assert 0 < saved_files < tree.files, saved_files

    server.kill9()
    server.restart()

    restored = get_task(server, task_id)
    assert restored["status"] == "PAUSED", f"{restored}\n{log_tail(server)}"
    assert restored["progress"] == paused["progress"]
    assert restored["message"] == paused["message"]
    assert restored["recoveries"] == 0, restored
    time.sleep(1.5)
    later = get_task(server, task_id)
    assert later["status"] == "PAUSED", (
        f"started by itself: {later}\n{log_tail(server)}"
    )
    assert later["attempts"] == 1, later
    assert later["progress"] == paused["progress"]

    post_action(server, task_id, "resume")
    finished = wait_for_status(server, task_id, "FINISHED")
    assert_digest_matches(finished, tree, server)
    assert finished["attempts"] == 2, finished
    assert finished["recoveries"] == 0, finished
    # The resumed run lists the tree again and skips what the checkpoint holds.
    assert first_files_hashed(server, task_id) == [1, saved_files + 1], log_tail(server)

    events = get_events(server, task_id)
    assert transitions(events) == [
        (None, "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "PAUSED"),
        ("PAUSED", "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "FINISHED"),
    ], events
    reasons = [event["reason"] for event in events]
    assert reasons[2].startswith("paused at a "), reasons
    assert reasons[3] == "resumed by request", reasons
    assert reasons[1] != reasons[4], f"one runner claimed both runs: {reasons}"


def test_running_task_resumes_after_kill9(
    make_server: MakeServer, tree: Tree, database: Database
) -> None:
    server = make_server(
        TASKMILL_TEST_DIGEST_DELAY=str(DIGEST_DELAY),
        TASKMILL_DIGEST_ROOTS=str(tree.path),
    )
    task_id = create_digest(server, tree)
    wait_for_checkpoint_mid_way(server, database, task_id)
    server.kill9()
    killed = read_row(database, task_id)
    assert killed["status"] == "RUNNING", killed
    old_owner = killed["owner"]
    assert old_owner, killed
    saved_files = checkpoint_files(killed["checkpoint"])
    assert 0 < saved_files < tree.files, killed["checkpoint"]
    # A checkpoint is saved with the progress of the file before its last one.
    # The restarted run redoes the files hashed after the checkpoint, so its
    # progress may go back as far as that value, but no further.
    floor = 100.0 * (saved_files - 1) / tree.files
    assert killed["progress"] >= floor, killed

    server.restart()
    observed: list[float] = []
    task = get_task(server, task_id)
    deadline = time.monotonic() + 20
    while task["status"] != "FINISHED":
        assert task["status"] in ("PENDING", "RUNNING"), f"{task}\n{log_tail(server)}"
        assert time.monotonic() < deadline, f"not FINISHED: {task}\n{log_tail(server)}"
        observed.append(task["progress"])
        time.sleep(0.1)
        task = get_task(server, task_id)
    assert len(observed) >= 3, f"too few samples of the second run: {observed}"
    assert min(observed) >= floor, (
        f"progress fell to {min(observed)}% below the checkpoint's {floor:.1f}% "
        f"(it was {killed['progress']}% at the kill): {observed}"
    )
    assert_digest_matches(task, tree, server)
    assert task["recoveries"] == 1, task
    assert task["attempts"] == 2, task
    runs = first_files_hashed(server, task_id)
    assert runs == [1, saved_files + 1], (
        f"expected the second run to start after the {saved_files} files of the "
        f"checkpoint, so that it hashes {tree.files - saved_files} of {tree.files}; "
        f"runs started at {runs}"
    )

    events = get_events(server, task_id)
    assert transitions(events) == [
        (None, "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "FINISHED"),
    ], events
    recovery = events[2]["reason"]
    assert recovery.startswith("interrupted"), recovery
    assert old_owner in recovery, f"{old_owner} not named in {recovery!r}"
    assert "resumes from its last checkpoint" in recovery, recovery


def test_sigterm_suspends_then_resumes(
    make_server: MakeServer, tree: Tree, database: Database
) -> None:
    server = make_server(
        TASKMILL_TEST_DIGEST_DELAY=str(DIGEST_DELAY),
        TASKMILL_TEST_GRACE=str(GRACE),
        TASKMILL_DIGEST_ROOTS=str(tree.path),
    )
    task_id = create_digest(server, tree)
    running = wait_for_checkpoint_mid_way(server, database, task_id)

    elapsed = server.term(timeout=GRACE + 10)
    assert elapsed < GRACE + 3, f"exit took {elapsed:.1f} s\n{log_tail(server)}"
    stopped = read_row(database, task_id)
    assert stopped["status"] == "PENDING", f"{stopped}\n{log_tail(server)}"
    assert stopped["owner"] is None, stopped
    assert stopped["control"] is None, stopped
    assert stopped["progress"] > 0, stopped
    saved_files = checkpoint_files(stopped["checkpoint"])
    assert saved_files >= checkpoint_files(running["checkpoint"]), (
        f"checkpoint went back at shutdown: {running['checkpoint']!r} before, "
        f"{stopped['checkpoint']!r} after"
    )
    reasons = read_event_reasons(database, task_id)
    assert reasons[-1].startswith("suspended"), reasons

    server.restart()
    finished = wait_for_status(server, task_id, "FINISHED")
    assert_digest_matches(finished, tree, server)
    assert finished["recoveries"] == 0, finished
    assert finished["attempts"] == 2, finished
    assert first_files_hashed(server, task_id) == [1, saved_files + 1], log_tail(server)
    events = get_events(server, task_id)
    assert transitions(events) == [
        (None, "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "FINISHED"),
    ], events
