"""Tests for the directory_digest example task, checked against the shell pipeline
that it reproduces (GNU find, sort, xargs and sha256sum)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from taskmill import TaskManager, create_router
from taskmill.examples import digest
from taskmill.examples.digest import (
    ROOTS_VARIABLE,
    DigestParams,
    DirectoryDigest,
    ManifestDigest,
    PathNotAllowed,
    check_root,
    format_manifest_line,
    hash_file,
    list_files,
)
from taskmill.exceptions import PauseRequested
from tests.conftest import eventually, run_pipeline

# -r keeps xargs from running sha256sum on its empty stdin when there are no files.
PIPELINE = "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum"
BIG_FILE_SIZE = digest.CHUNK_SIZE + 17  # so hashing it takes two reads


@pytest.fixture(autouse=True)
def digest_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the task read the test's temporary directory, outside the current one."""
    monkeypatch.setenv(ROOTS_VARIABLE, str(tmp_path))


class FakeRuntime:
    """Records what a task reports, standing in for the task manager."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.progress: list[tuple[float, str | None]] = []
        self.checkpoints: list[Any] = []
        self.interrupt_after = interrupt_after

    def report_progress(self, percent: float, message: str | None) -> None:
        self.progress.append((percent, message))

    def save_checkpoint(self, state: Any, effects: Any) -> None:
        # A JSON round trip, as a database column would do.
        self.checkpoints.append(json.loads(json.dumps(state)))
        if len(self.checkpoints) == self.interrupt_after:
            raise PauseRequested

    @property
    def database(self) -> Any:
        raise AssertionError("directory_digest does not use the database")

    def sleep(self, seconds: float) -> None:
        raise AssertionError("directory_digest does not sleep")

    def act(self, action: str) -> Any:
        raise AssertionError("directory_digest does not act on itself")


def pipeline_digest(directory: Path) -> str:
    return hashlib.sha256(run_pipeline(directory, PIPELINE)).hexdigest()


def pipeline_file_count(directory: Path) -> int:
    output = run_pipeline(directory, "find . -type f -print0 | tr -dc '\\0' | wc -c")
    return int(output)


def pipeline_byte_count(directory: Path) -> int:
    output = run_pipeline(directory, "find . -type f -print0 | xargs -0 -r cat | wc -c")
    return int(output)


def write(root: Path, name: str | bytes, content: bytes = b"x") -> bytes:
    """Create root/name with content and return its path as listed, ./name."""
    raw = os.fsencode(name)
    full_path = os.path.join(os.fsencode(root), raw)
    os.makedirs(os.path.dirname(full_path), exist_ok=True)
    with open(full_path, "wb") as file:
        file.write(content)
    return b"./" + raw


def make_tree(root: Path) -> Path:
    """Build a tree with every kind of name and file the digest must handle."""
    write(root, "nested/deep/file.txt", b"deep\n")
    write(root, "nested/other.txt", b"other\n")
    write(root, "empty", b"")
    (root / "hollow" / "inner").mkdir(parents=True)
    pattern = bytes(range(256)) * (BIG_FILE_SIZE // 256 + 1)
    write(root, "big.bin", pattern[:BIG_FILE_SIZE])
    write(root, "with space.txt", b"space")
    write(root, "back\\slash", b"backslash")
    write(root, "new\nline", b"newline")
    write(root, "cr\rname", b"carriage return")
    write(root, b"latin1-caf\xe9", b"not UTF-8")
    for name in ("B", "a-b", "a.txt", "a/b", "a/c"):
        write(root, name, name.encode())
    (root / "link-to-file").symlink_to("a.txt")
    (root / "link-to-dir").symlink_to("nested")
    return root


def make_task(root: Path, runtime: FakeRuntime, state: Any = None) -> DirectoryDigest:
    return DirectoryDigest(
        task_id="t-1", params=DigestParams(path=str(root)), state=state, runtime=runtime
    )


def run_task(task: DirectoryDigest) -> Any:
    task.pre()
    task.result = task.run()
    task.post()
    return task.result


def digest_with_helpers(root: Path) -> dict[str, Any]:
    raw_root = os.fsencode(root)
    manifest = ManifestDigest()
    for path in list_files(raw_root):
        manifest.add_file(raw_root, path)
    return manifest.result()


# list_files


def test_list_files_matches_find_and_sort(tmp_path: Path) -> None:
    make_tree(tmp_path)
    listed = run_pipeline(tmp_path, "find . -type f -print0 | LC_ALL=C sort -z")
    expected = listed.split(b"\0")[:-1]
    assert list_files(os.fsencode(tmp_path)) == expected


def test_list_files_sorts_by_bytes(tmp_path: Path) -> None:
    for name in ("a/b", "a-b", "a.txt", "B", "_"):
        write(tmp_path, name)
    # C order: "-" (0x2d) < "." (0x2e) < "/" (0x2f), and "B" < "_" < "a".
    expected = [b"./B", b"./_", b"./a-b", b"./a.txt", b"./a/b"]
    assert list_files(os.fsencode(tmp_path)) == expected


def test_list_files_skips_symlinks(tmp_path: Path) -> None:
    write(tmp_path, "dir/file")
    (tmp_path / "file-link").symlink_to("dir/file")
    (tmp_path / "dir-link").symlink_to("dir")
    (tmp_path / "dangling").symlink_to("missing")
    assert list_files(os.fsencode(tmp_path)) == [b"./dir/file"]


def test_list_files_skips_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    assert list_files(os.fsencode(tmp_path)) == []


def test_list_files_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "sub" / "subsub").mkdir(parents=True)
    assert list_files(os.fsencode(tmp_path)) == []


def test_list_files_skips_vanished_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, "gone/file")
    write(tmp_path, "kept/file")
    real_scandir = os.scandir
    vanished_directory = os.path.join(os.fsencode(tmp_path), b"gone")

    def scandir_losing_gone(path: bytes) -> Any:
        if path == vanished_directory:
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_losing_gone)
    with caplog.at_level(logging.WARNING, logger=digest.__name__):
        files = list_files(os.fsencode(tmp_path))
    assert files == [b"./kept/file"]
    assert "gone" in caplog.text


def test_list_files_missing_root_fails(tmp_path: Path) -> None:
    missing = os.fsencode(tmp_path / "missing")
    with pytest.raises(
        OSError, match=r"Cannot list directory '.*/missing': No such file"
    ):
        list_files(missing)


# format_manifest_line

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"./plain", f"{HEX}  ./plain\n".encode()),
        (b"./with space", f"{HEX}  ./with space\n".encode()),
        (b"./caf\xe9", HEX.encode() + b"  ./caf\xe9\n"),
        (b"./back\\slash", f"\\{HEX}  ./back\\\\slash\n".encode()),
        (b"./new\nline", f"\\{HEX}  ./new\\nline\n".encode()),
        (b"./cr\rname", f"\\{HEX}  ./cr\\rname\n".encode()),
        (b"./all\\\n\r", f"\\{HEX}  ./all\\\\\\n\\r\n".encode()),
    ],
)
def test_format_manifest_line(path: bytes, expected: bytes) -> None:
    assert format_manifest_line(HEX, path) == expected


@pytest.mark.parametrize("name", ["back\\slash", "new\nline", "cr\rname", "plain"])
def test_format_manifest_line_matches_sha256sum(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, b"content")
    expected = run_pipeline(tmp_path, PIPELINE)
    hex_digest = hashlib.sha256(b"content").hexdigest()
    assert format_manifest_line(hex_digest, path) == expected


# hash_file


def test_hash_file_spans_chunks(tmp_path: Path) -> None:
    content = bytes(range(256)) * 14 + b"end"
    path = tmp_path / "file"
    path.write_bytes(content)
    hex_digest, size = hash_file(os.fsencode(path), chunk_size=1000)
    assert hex_digest == hashlib.sha256(content).hexdigest()
    assert size == len(content)


def test_hash_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert hash_file(os.fsencode(path)) == (hashlib.sha256(b"").hexdigest(), 0)


def test_hash_file_rejects_fifo(tmp_path: Path) -> None:
    # Opening a FIFO without O_NONBLOCK would block this test until the timeout.
    path = tmp_path / "pipe"
    os.mkfifo(path)
    with pytest.raises(FileNotFoundError, match="No longer a regular file"):
        hash_file(os.fsencode(path))


def test_hash_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        hash_file(os.fsencode(tmp_path / "missing"))


# check_root


def test_check_root_accepts_directory(tmp_path: Path) -> None:
    check_root(os.fsencode(tmp_path))


def test_check_root_missing(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as caught:
        check_root(os.fsencode(missing))
    assert str(missing) in str(caught.value)
    assert "not found" in str(caught.value)


def test_check_root_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    with pytest.raises(NotADirectoryError) as caught:
        check_root(os.fsencode(path))
    assert str(path) in str(caught.value)
    assert "not a directory" in str(caught.value)


# ManifestDigest


def test_helpers_match_pipeline(tmp_path: Path) -> None:
    make_tree(tmp_path)
    result = digest_with_helpers(tmp_path)
    assert result["digest"] == pipeline_digest(tmp_path)
    assert result["files"] == pipeline_file_count(tmp_path)
    assert result["bytes"] == pipeline_byte_count(tmp_path)
    assert "vanished" not in result


def test_vanished_file_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_tree(tmp_path)
    raw_root = os.fsencode(tmp_path)
    paths = list_files(raw_root)
    (tmp_path / "nested" / "other.txt").unlink()
    manifest = ManifestDigest()
    with caplog.at_level(logging.WARNING, logger=digest.__name__):
        for path in paths:
            manifest.add_file(raw_root, path)
    result = manifest.result()
    assert result["vanished"] == ["./nested/other.txt"]
    assert result["digest"] == pipeline_digest(tmp_path)
    assert result["files"] == pipeline_file_count(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nested/other.txt" in warnings[0]


def test_vanished_non_utf8_name(tmp_path: Path) -> None:
    path = write(tmp_path, b"caf\xe9")
    os.unlink(os.path.join(os.fsencode(tmp_path), path))
    manifest = ManifestDigest()
    manifest.add_file(os.fsencode(tmp_path), path)
    vanished = manifest.result()["vanished"]
    assert vanished == ["./caf\\xe9"]


def test_unreadable_file_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "secret")

    def deny(full_path: bytes) -> tuple[str, int]:
        raise PermissionError(13, "Permission denied", full_path)

    monkeypatch.setattr(digest, "hash_file", deny)
    manifest = ManifestDigest()
    with pytest.raises(
        PermissionError, match=r"Cannot read '.*/secret': Permission denied"
    ):
        manifest.add_file(os.fsencode(tmp_path), path)


def test_checkpoint_resumes_same_digest(tmp_path: Path) -> None:
    make_tree(tmp_path)
    raw_root = os.fsencode(tmp_path)
    paths = list_files(raw_root)
    first = ManifestDigest()
    for path in paths[:7]:
        first.add_file(raw_root, path)
    state = json.loads(json.dumps(first.to_checkpoint()))
    resumed = ManifestDigest.from_checkpoint(state)
    start = resumed.next_index(paths)
    for path in paths[start:]:
        resumed.add_file(raw_root, path)
    assert start == 7
    assert resumed.result() == digest_with_helpers(tmp_path)


def test_checkpoint_keeps_vanished(tmp_path: Path) -> None:
    first_path = write(tmp_path, "first")
    manifest = ManifestDigest()
    os.unlink(tmp_path / "first")
    manifest.add_file(os.fsencode(tmp_path), first_path)
    resumed = ManifestDigest.from_checkpoint(manifest.to_checkpoint())
    assert resumed.result()["vanished"] == ["./first"]
    assert resumed.next_index([b"./first", b"./second"]) == 1


def test_checkpoint_can_be_taken_twice(tmp_path: Path) -> None:
    make_tree(tmp_path)
    raw_root = os.fsencode(tmp_path)
    paths = list_files(raw_root)
    manifest = ManifestDigest()
    for path in paths[:3]:
        manifest.add_file(raw_root, path)
    manifest.to_checkpoint()
    for path in paths[3:]:
        manifest.add_file(raw_root, path)
    resumed = ManifestDigest.from_checkpoint(manifest.to_checkpoint())
    assert resumed.result() == digest_with_helpers(tmp_path)


def test_checkpoint_is_compressed(tmp_path: Path) -> None:
    for index in range(200):
        write(tmp_path, f"directory/file-{index:04}.txt", b"same")
    raw_root = os.fsencode(tmp_path)
    manifest = ManifestDigest()
    for path in list_files(raw_root):
        manifest.add_file(raw_root, path)
    manifest_size = len(run_pipeline(tmp_path, PIPELINE))
    assert len(json.dumps(manifest.to_checkpoint())) < manifest_size / 4


def test_checkpoint_with_wrong_count_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "file")
    manifest = ManifestDigest()
    manifest.add_file(os.fsencode(tmp_path), path)
    state = manifest.to_checkpoint()
    state["files"] = 2
    with pytest.raises(ValueError, match="counts 2 files but its manifest has 1"):
        ManifestDigest.from_checkpoint(state)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"manifest": "not base64!"}, "bad base64"),
        ({"manifest": "bm90IHpsaWI="}, "bad zlib manifest"),
        ({"files": "many"}, "valid integer"),
    ],
)
def test_invalid_checkpoint_rejected(state: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ManifestDigest.from_checkpoint(state)


# DirectoryDigest


def test_task_matches_pipeline(tmp_path: Path) -> None:
    make_tree(tmp_path)
    result = run_task(make_task(tmp_path, FakeRuntime()))
    assert result == {
        "files": pipeline_file_count(tmp_path),
        "bytes": pipeline_byte_count(tmp_path),
        "digest": pipeline_digest(tmp_path),
    }


def test_task_result_is_json(tmp_path: Path) -> None:
    make_tree(tmp_path)
    result = run_task(make_task(tmp_path, FakeRuntime()))
    assert json.loads(json.dumps(result)) == result


def test_task_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    result = run_task(make_task(Path("tree"), FakeRuntime()))
    assert result["digest"] == pipeline_digest(tmp_path / "tree")


def test_task_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    runtime = FakeRuntime()
    result = run_task(make_task(tmp_path, runtime))
    assert result == {"files": 0, "bytes": 0, "digest": pipeline_digest(tmp_path)}
    assert result["digest"] == hashlib.sha256(b"").hexdigest()
    assert runtime.progress == [(100.0, "No files to hash")]


def test_task_missing_root_fails_in_pre(tmp_path: Path) -> None:
    task = make_task(tmp_path / "missing", FakeRuntime())
    with pytest.raises(FileNotFoundError, match="missing' not found"):
        task.pre()


def test_task_file_root_fails_in_pre(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    task = make_task(tmp_path / "file", FakeRuntime())
    with pytest.raises(NotADirectoryError, match="file' is not a directory"):
        task.pre()


def test_task_rejects_empty_path() -> None:
    with pytest.raises(ValueError, match="at least 1 character"):
        DigestParams(path="")


def test_task_reports_progress_per_file(tmp_path: Path) -> None:
    for index in range(1200):
        write(tmp_path, f"file-{index:04}", b"")
    runtime = FakeRuntime()
    run_task(make_task(tmp_path, runtime))
    assert len(runtime.progress) == 1200
    assert runtime.progress[0] == (100 / 1200, "Hashed 1 of 1,200 files")
    assert runtime.progress[-1] == (100.0, "Hashed 1,200 of 1,200 files")


def test_task_checkpoints_after_last_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    runtime = FakeRuntime()
    monkeypatch.setattr(DirectoryDigest, "checkpoint_interval", 3600.0)
    result = run_task(make_task(tmp_path, runtime))
    assert len(runtime.checkpoints) == 1
    resumed = ManifestDigest.from_checkpoint(runtime.checkpoints[0])
    assert resumed.result() == result


def test_task_checkpoint_interval_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    runtime = FakeRuntime()
    monkeypatch.setattr(DirectoryDigest, "checkpoint_interval", 0.0)
    run_task(make_task(tmp_path, runtime))
    # One per file plus the one after the loop.
    assert len(runtime.checkpoints) == pipeline_file_count(tmp_path) + 1


def test_task_resume_skips_hashed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    expected = pipeline_digest(tmp_path)
    paths = list_files(os.fsencode(tmp_path))
    interrupted = FakeRuntime(interrupt_after=5)
    monkeypatch.setattr(DirectoryDigest, "checkpoint_interval", 0.0)
    first = make_task(tmp_path, interrupted)
    with pytest.raises(PauseRequested):
        run_task(first)

    # Change every file hashed before the checkpoint. The resumed run must keep
    # their old hashes, which it can only do if it does not read them again.
    for path in paths[:5]:
        write(tmp_path, os.fsdecode(path[2:]), b"changed after checkpoint")
    assert pipeline_digest(tmp_path) != expected
    hashed: list[bytes] = []
    real_hash_file = digest.hash_file

    def recording_hash_file(full_path: bytes) -> tuple[str, int]:
        hashed.append(full_path)
        return real_hash_file(full_path)

    monkeypatch.setattr(digest, "hash_file", recording_hash_file)
    resumed = make_task(tmp_path, FakeRuntime(), state=interrupted.checkpoints[-1])
    result = run_task(resumed)
    assert result["digest"] == expected
    assert len(hashed) == len(paths) - 5
    assert hashed[0] == os.path.join(os.fsencode(tmp_path), paths[5][2:])
    assert result["files"] == len(paths)


def test_task_resume_progress_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    total = len(list_files(os.fsencode(tmp_path)))
    interrupted = FakeRuntime(interrupt_after=3)
    monkeypatch.setattr(DirectoryDigest, "checkpoint_interval", 0.0)
    first = make_task(tmp_path, interrupted)
    with pytest.raises(PauseRequested):
        run_task(first)
    runtime = FakeRuntime()
    run_task(make_task(tmp_path, runtime, state=interrupted.checkpoints[-1]))
    assert runtime.progress[0][1] == f"Hashed 4 of {total} files"


# allowed roots


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    manager = TaskManager(database_url, progress_interval=0.05, shutdown_grace=1)
    manager.register(DirectoryDigest)
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager))
    with TestClient(app) as client:
        yield client


@pytest.fixture
def allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An allowed root with one file in it; tmp_path itself is outside it."""
    root = tmp_path / "allowed"
    write(root, "data/file.txt", b"inside\n")
    write(tmp_path, "outside/secret.txt", b"outside\n")
    monkeypatch.setenv(ROOTS_VARIABLE, str(root))
    return root


def create_digest(client: TestClient, path: str | Path, **body: object) -> Any:
    return client.post(
        "/tasks",
        json={"name": "directory_digest", "params": {"path": str(path)}, **body},
    )


def rejection(response: Any) -> str:
    """Return the message of a 422 for the path param."""
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "params", "path"]
    message: str = error["msg"]
    return message


def test_roots_accept_path_inside(client: TestClient, allowed: Path) -> None:
    response = create_digest(client, allowed / "data")
    assert response.status_code == 201, response.text


def test_roots_accept_root_itself(client: TestClient, allowed: Path) -> None:
    response = create_digest(client, allowed)
    assert response.status_code == 201, response.text


def test_roots_reject_path_outside(
    client: TestClient, allowed: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    message = rejection(create_digest(client, outside))
    assert f"Path {str(outside)!r} is outside" in message
    assert repr(str(allowed)) in message
    assert ROOTS_VARIABLE in message
    assert client.get("/tasks").json() == []


def test_roots_reject_sibling_with_same_prefix(
    client: TestClient, allowed: Path, tmp_path: Path
) -> None:
    sibling = tmp_path / "allowed-not"
    sibling.mkdir()
    assert "is outside" in rejection(create_digest(client, sibling))


def test_roots_reject_dotdot_escape(client: TestClient, allowed: Path) -> None:
    escape = f"{allowed}/data/../../outside"
    message = rejection(create_digest(client, escape))
    assert repr(escape) in message
    assert "outside the directories" in message


def test_roots_reject_symlink_escape(
    client: TestClient, allowed: Path, tmp_path: Path
) -> None:
    link = allowed / "link"
    link.symlink_to(tmp_path / "outside")
    message = rejection(create_digest(client, link))
    assert f"resolves to {str(tmp_path / 'outside')!r}" in message


def test_roots_reject_symlink_in_parent(
    client: TestClient, allowed: Path, tmp_path: Path
) -> None:
    (allowed / "up").symlink_to(tmp_path)
    assert "resolves to" in rejection(create_digest(client, allowed / "up/outside"))


def test_roots_accept_symlink_inside(client: TestClient, allowed: Path) -> None:
    (allowed / "link").symlink_to(allowed / "data")
    assert create_digest(client, allowed / "link").status_code == 201


def test_roots_multiple(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    for root in (first, second, third):
        root.mkdir()
    monkeypatch.setenv(ROOTS_VARIABLE, f"{first}{os.pathsep}{os.pathsep}{second}")
    assert create_digest(client, first).status_code == 201
    assert create_digest(client, second).status_code == 201
    message = rejection(create_digest(client, third))
    assert repr(str(first)) in message
    assert repr(str(second)) in message


def test_roots_default_to_current_directory(
    client: TestClient, allowed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ROOTS_VARIABLE)
    monkeypatch.chdir(allowed)
    assert create_digest(client, "data").status_code == 201
    assert create_digest(client, ".").status_code == 201
    message = rejection(create_digest(client, tmp_path / "outside"))
    assert repr(str(allowed)) in message


def test_roots_reject_nul_byte(client: TestClient, allowed: Path) -> None:
    message = rejection(create_digest(client, f"{allowed}/a\x00b"))
    assert "Invalid path" in message


def test_roots_checked_again_at_run_time(
    client: TestClient, allowed: Path, tmp_path: Path
) -> None:
    created = create_digest(client, allowed / "data", start=False)
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    shutil.rmtree(allowed / "data")
    (allowed / "data").symlink_to(tmp_path / "outside")
    assert client.post(f"/tasks/{task_id}/start").status_code == 202

    def ended() -> Any:
        task = client.get(f"/tasks/{task_id}").json()
        return task if task["status"] in ("FINISHED", "FAILED") else None

    task = eventually(ended)
    assert task["status"] == "FAILED"
    assert task["result"] is None
    assert f"resolves to {str(tmp_path / 'outside')!r}" in task["error"]["message"]


def test_task_checks_roots_in_pre(allowed: Path, tmp_path: Path) -> None:
    # model_construct skips validation, as stored params cannot.
    params = DigestParams.model_construct(path=str(tmp_path / "outside"))
    task = DirectoryDigest(
        task_id="t-1", params=params, state=None, runtime=FakeRuntime()
    )
    with pytest.raises(PathNotAllowed, match="outside the directories"):
        task.pre()


def test_task_reads_resolved_root(allowed: Path) -> None:
    (allowed / "link").symlink_to(allowed / "data")
    result = run_task(make_task(allowed / "link", FakeRuntime()))
    assert result["digest"] == pipeline_digest(allowed / "data")


def test_file_swapped_for_symlink_is_not_followed(
    allowed: Path, tmp_path: Path
) -> None:
    root = os.fsencode(allowed)
    paths = list_files(root)
    assert paths == [b"./data/file.txt"]
    os.remove(allowed / "data/file.txt")
    (allowed / "data/file.txt").symlink_to(tmp_path / "outside/secret.txt")
    manifest = ManifestDigest()
    manifest.add_file(root, paths[0])
    assert manifest.result()["vanished"] == ["./data/file.txt"]
    assert manifest.files == 0
