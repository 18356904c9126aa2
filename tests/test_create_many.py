"""Tasks created together: one transaction, all or none, queued in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from taskmill import Database, InvalidParams, TaskManager, TaskStatus, create_router
from taskmill.models import BackgroundTaskModel, TaskEventModel
from taskmill.schemas import MAX_BATCH, MAX_PARAMS_DEPTH
from tests.conftest import read_event_reasons, read_row
from tests.tasks import BlockingTask, NoOp, StepParams, StepTask
from tests.test_group_commit import record_transactions, skip_unless_sqlite

S = TaskStatus
MakeManager = Callable[..., TaskManager]


def count_tasks(database: Database) -> int:
    with database.read() as session:
        return session.scalar(select(func.count()).select_from(BackgroundTaskModel))


def test_tasks_stored_in_one_commit_in_order(
    make_manager: MakeManager, database: Database
) -> None:
    manager = make_manager(StepTask, poll_interval=60.0, lease_duration=300.0)
    transactions = record_transactions(manager.database)
    params = [{"n": n} for n in range(1, 51)]
    tasks = manager.create_many("step", params, start=False)
    inserts = [s for t in transactions for s in t if s.startswith("INSERT INTO tasks")]
    assert len(inserts) == 1
    assert [task.params["n"] for task in tasks] == list(range(1, 51))
    assert len({task.id for task in tasks}) == 50
    for task in tasks:
        assert task.status == S.PAUSED
        assert read_row(database, task.id)["status"] == S.PAUSED
        assert read_event_reasons(database, task.id) == ["created held until started"]


def test_tasks_start_in_order_of_params(
    make_manager: MakeManager, database: Database
) -> None:
    manager = make_manager(NoOp, max_workers=1)
    tasks = manager.create_many("noop", [{}] * 6)
    for task in tasks:
        manager.wait(task.id, {S.FINISHED})
    assert claim_order(database) == [task.id for task in tasks]


def claim_order(database: Database) -> list[str]:
    """Return the ids of the tasks in the order of their first claim."""
    with database.read() as session:
        claimed = session.scalars(
            select(TaskEventModel.task_id)
            .where(TaskEventModel.to_status == S.RUNNING)
            .order_by(TaskEventModel.id)
        ).all()
    return list(dict.fromkeys(claimed))


def test_other_runner_claims_batch_in_order(
    make_manager: MakeManager, database: Database
) -> None:
    # Stored by a process that runs no tasks, so the runner claims the
    # tasks from the database, ordered by their creation.
    web = make_manager(NoOp, max_workers=0)
    tasks = web.create_many("noop", [{}] * 30)
    runner = make_manager(NoOp, max_workers=1, poll_interval=0.05)
    for task in tasks:
        runner.wait(task.id, {S.FINISHED})
    assert claim_order(database) == [task.id for task in tasks]
    newest_first = [task.id for task in web.list(name="noop", limit=30)]
    assert newest_first == [task.id for task in reversed(tasks)]


def test_free_workers_claim_first_tasks_as_stored(
    make_manager: MakeManager, database: Database
) -> None:
    manager = make_manager(BlockingTask, max_workers=3, poll_interval=60.0)
    skip_unless_sqlite(manager)
    tasks = manager.create_many("blocking", [{"seconds": 0.5}] * 5)
    # The transaction that stored the tasks claimed one for each free worker;
    # the others wait in the queue for a worker.
    statuses = [read_row(database, task.id)["status"] for task in tasks]
    assert statuses == [S.RUNNING] * 3 + [S.PENDING] * 2
    for task in tasks:
        assert manager.wait(task.id, {S.FINISHED}, timeout=10).result == "done"


def test_invalid_params_store_nothing(
    make_manager: MakeManager, database: Database
) -> None:
    manager = make_manager(StepTask)
    with pytest.raises(InvalidParams) as raised:
        manager.create_many("step", [{"n": 1}, {"n": 2}, {"n": 0}, {"n": "x"}])
    # The first invalid params, by their position in the batch.
    assert raised.value.errors[0]["loc"] == (2, "n")
    assert "2.n:" in str(raised.value)
    assert count_tasks(database) == 0


def reject_params(database: Database, n: int) -> None:
    """Make the database reject any new task whose params have ``n``."""
    with database.write() as session:
        if database.dialect == "sqlite":
            session.execute(
                text(
                    "CREATE TRIGGER reject_params BEFORE INSERT ON tasks "
                    f"WHEN json_extract(NEW.params, '$.n') = {n} "
                    "BEGIN SELECT RAISE(ABORT, 'params rejected'); END"
                )
            )
            return
        session.execute(
            text(
                "CREATE FUNCTION reject_params() RETURNS trigger AS $$ BEGIN "
                f"IF (NEW.params->>'n')::int = {n} THEN "
                "RAISE EXCEPTION USING ERRCODE = '23514', MESSAGE = 'params rejected'; "
                "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        session.execute(
            text(
                "CREATE TRIGGER reject_params BEFORE INSERT ON tasks "
                "FOR EACH ROW EXECUTE FUNCTION reject_params()"
            )
        )


def test_batch_that_database_rejects_stores_nothing(
    make_manager: MakeManager, database: Database
) -> None:
    manager = make_manager(StepTask, poll_interval=60.0)
    reject_params(database, 3)
    with pytest.raises(IntegrityError, match="params rejected"):
        manager.create_many("step", [{"n": n, "step_s": 0} for n in range(1, 6)])
    assert count_tasks(database) == 0
    # The manager goes on: the next batch is stored and runs.
    tasks = manager.create_many("step", [{"n": 1, "step_s": 0}, {"n": 2, "step_s": 0}])
    for task in tasks:
        assert manager.wait(task.id, {S.FINISHED}).status == S.FINISHED


@pytest.mark.parametrize("params", [{"n": 1}, "n", StepParams(n=1)])
def test_single_params_rejected(
    make_manager: MakeManager, database: Database, params: object
) -> None:
    manager = make_manager(StepTask)
    with pytest.raises(TypeError, match="for one task, call create"):
        manager.create_many("step", params)  # type: ignore[arg-type]
    assert count_tasks(database) == 0


def test_nothing_to_create(make_manager: MakeManager, database: Database) -> None:
    manager = make_manager(NoOp)
    assert manager.create_many("noop", []) == []
    assert count_tasks(database) == 0


def test_created_before_startup_run_after_it(database_url: str) -> None:
    manager = TaskManager(database_url, progress_interval=0.05)
    manager.register(NoOp)
    manager.database.create_schema()
    tasks = manager.create_many("noop", [{}] * 3)
    assert [task.status for task in tasks] == [S.PENDING] * 3
    manager.startup()
    try:
        for task in tasks:
            assert manager.wait(task.id, {S.FINISHED}).status == S.FINISHED
    finally:
        manager.shutdown(grace=1.0)


# -- POST /tasks/batch --


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    manager = TaskManager(database_url, progress_interval=0.05, shutdown_grace=1)
    manager.register(StepTask)
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(create_router(manager), prefix="/api")
    with TestClient(app) as client:
        yield client


def test_batch_endpoint_returns_tasks_in_order(client: TestClient) -> None:
    params = [{"n": n, "step_s": 0} for n in (3, 1, 2)]
    response = client.post("/api/tasks/batch", json={"name": "step", "params": params})
    assert response.status_code == 201, response.text
    tasks = response.json()
    assert [task["params"]["n"] for task in tasks] == [3, 1, 2]
    listed = client.get("/api/tasks", params={"name": "step"}).json()
    assert {task["id"] for task in listed} == {task["id"] for task in tasks}


def test_batch_endpoint_holds_tasks(client: TestClient) -> None:
    body = {"name": "step", "params": [{"n": 1}, {"n": 2}], "start": False}
    response = client.post("/api/tasks/batch", json=body)
    assert response.status_code == 201
    assert [task["status"] for task in response.json()] == ["PAUSED", "PAUSED"]


def test_batch_endpoint_names_invalid_params_by_index(client: TestClient) -> None:
    body = {"name": "step", "params": [{"n": 1}, {"n": "many"}]}
    response = client.post("/api/tasks/batch", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "params", 1, "n"]
    assert client.get("/api/tasks").json() == []


@pytest.mark.parametrize("count", [0, MAX_BATCH + 1])
def test_batch_endpoint_bounds_the_batch(client: TestClient, count: int) -> None:
    body = {"name": "step", "params": [{"n": 1}] * count}
    response = client.post("/api/tasks/batch", json=body)
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "params"]
    # A long rejected list is not echoed back.
    assert len(response.content) < 1000
    assert client.get("/api/tasks").json() == []


def test_batch_endpoint_names_deep_params_by_index(client: TestClient) -> None:
    deep: dict[str, object] = {"n": 1}
    for _ in range(MAX_PARAMS_DEPTH):
        deep = {"inner": deep}
    body = {"name": "step", "params": [{"n": 1}, deep]}
    response = client.post("/api/tasks/batch", json=body)
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "params", 1]
    assert "levels deep" in error["msg"]
    assert client.get("/api/tasks").json() == []


def test_batch_endpoint_unknown_type_is_404(client: TestClient) -> None:
    response = client.post("/api/tasks/batch", json={"name": "nope", "params": [{}]})
    assert response.status_code == 404
    assert "'nope'" in response.json()["detail"]


def test_busy_runner_takes_notified_batch_when_free(
    make_postgres_manager: MakeManager,
) -> None:
    # A poll far in the future: only the notification can bring the tasks in.
    runner = make_postgres_manager(BlockingTask, NoOp, max_workers=1, poll_interval=60)
    busy = runner.create("blocking", {"seconds": 0.5})
    runner.wait(busy.id, {S.RUNNING})
    web = make_postgres_manager(NoOp, max_workers=0)
    # Notified while its only worker is busy, the runner claims the batch
    # as soon as that worker is free.
    tasks = web.create_many("noop", [{}] * 3)
    for task in tasks:
        assert runner.wait(task.id, {S.FINISHED}, timeout=10).status == S.FINISHED
