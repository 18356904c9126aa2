"""Task types that the tests run, and the ledger they record their steps in.

A step writes its ledger row in the transaction of its checkpoint, so a step
that runs twice breaks the ledger's unique constraint on (task_id, step).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    insert,
    select,
)
from sqlalchemy.orm import Session

from taskmill import BaseTask, Database, NoParams
from taskmill.examples import DirectoryDigest
from taskmill.retry import Retry

logger = logging.getLogger(__name__)

ledger_metadata = MetaData()
ledger = Table(
    "ledger",
    ledger_metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", String(36), nullable=False),
    Column("step", Integer, nullable=False),
    UniqueConstraint("task_id", "step"),
)


def create_ledger(database: Database) -> None:
    # A write transaction from the start: processes that start together on a
    # new file would otherwise fail to upgrade a read to a write.
    with database.engine.execution_options(taskmill_write=True).begin() as connection:
        ledger_metadata.create_all(connection)


def ledger_steps(database: Database, task_id: str) -> list[int]:
    with database.read() as session:
        rows = session.execute(
            select(ledger.c.step)
            .where(ledger.c.task_id == task_id)
            .order_by(ledger.c.step)
        )
        return [row.step for row in rows]


class StepParams(BaseModel):
    n: int = Field(default=10, ge=1)
    step_s: float = Field(default=0.05, ge=0)
    #: Step that waits for this file to exist before it runs (0: none).
    gate_step: int = 0
    gate_file: str = ""
    #: Step that raises ValueError (0: none).
    fail_step: int = 0


class StepTask(BaseTask[StepParams]):
    """Run n steps; each sleeps, then records itself with its checkpoint."""

    name = "step"
    params_model = StepParams

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, int]:
        done = self.state["step"] if self.state else 0
        for step in range(done + 1, self.params.n + 1):
            if step == self.params.gate_step:
                self._wait_for_gate()
            self.sleep(self.params.step_s)
            if step == self.params.fail_step:
                raise ValueError(f"boom at {step}")
            self.set_progress(step, self.params.n)
            self.checkpoint({"step": step}, effects=self._record(step))
        return {"sum": self.params.n * (self.params.n + 1) // 2}

    def post(self) -> None:
        pass

    def _wait_for_gate(self) -> None:
        deadline = time.monotonic() + 60
        while not Path(self.params.gate_file).exists() and time.monotonic() < deadline:
            self.sleep(0.05)

    def _record(self, step: int) -> Any:
        task_id = self.task_id

        def write(session: Session) -> None:
            session.execute(insert(ledger).values(task_id=task_id, step=step))

        return write


class BlockingParams(BaseModel):
    seconds: float = 1.0


class BlockingTask(BaseTask[BlockingParams]):
    """One blocking call with no checkpoint inside."""

    name = "blocking"
    params_model = BlockingParams

    def pre(self) -> None:
        pass

    def run(self) -> str:
        time.sleep(self.params.seconds)
        return "done"

    def post(self) -> None:
        pass


class AsyncSleepTask(BaseTask[BlockingParams]):
    """An async task that awaits one long sleep."""

    name = "async_sleep"
    params_model = BlockingParams

    async def pre(self) -> None:
        pass

    async def run(self) -> str:
        await asyncio.sleep(self.params.seconds)
        return "done"

    async def post(self) -> None:
        pass


class SlowDigest(DirectoryDigest):
    """directory_digest, slowed per file so that a test can pause it mid-way."""

    delay = float(os.environ.get("TASKMILL_TEST_DIGEST_DELAY", "0.01"))
    #: Set once this run has logged the number of the first file it hashed.
    logged_first_file = False

    def set_progress(
        self, value: float, total: float | None = None, message: str | None = None
    ) -> None:
        time.sleep(self.delay)
        if total is not None and not self.logged_first_file:
            # A run that resumes from a checkpoint starts past file 1; tests read
            # this line from the server log to count the files a run hashed.
            self.logged_first_file = True
            logger.info(
                "Task %s run hashed file %d of %d first",
                self.task_id,
                int(value),
                int(total),
            )
        super().set_progress(value, total, message)


class NoOp(BaseTask[NoParams]):
    name = "noop"

    def pre(self) -> None:
        pass

    def run(self) -> None:
        return None

    def post(self) -> None:
        pass


class NonResumableStepTask(StepTask):
    """StepTask whose run must not resume after a crash: it ends FAILED instead."""

    name = "step_not_resumable"
    resumable = False


class FlakyParams(BaseModel):
    #: Runs that raise ConnectionError before a run succeeds.
    failing_runs: int = Field(default=3, ge=0)
    #: The first run waits for this file to exist before it raises ("": no wait).
    gate_file: str = ""


class FlakyTask(BaseTask[FlakyParams]):
    """Raise ConnectionError in the first failing_runs runs, then succeed.

    Each run first commits a ledger row whose step is its run number, so the
    runs are counted in the database, whichever process ran them.
    """

    name = "flaky"
    params_model = FlakyParams
    retry = Retry(
        max_attempts=5,
        retry_on=(ConnectionError,),
        backoff=1.0,
        factor=2.0,
        jitter=0.2,
    )

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, int]:
        run_number = self._record_run()
        if run_number == 1 and self.params.gate_file:
            deadline = time.monotonic() + 30
            gate = Path(self.params.gate_file)
            while not gate.exists() and time.monotonic() < deadline:
                self.sleep(0.005)
        if run_number <= self.params.failing_runs:
            raise ConnectionError(f"connection refused in run {run_number}")
        return {"runs": run_number}

    def post(self) -> None:
        pass

    def _record_run(self) -> int:
        with self.database.write() as session:
            earlier = session.execute(
                select(ledger.c.step).where(ledger.c.task_id == self.task_id)
            ).all()
            run_number = len(earlier) + 1
            session.execute(
                insert(ledger).values(task_id=self.task_id, step=run_number)
            )
        return run_number


class QuickFlakyTask(FlakyTask):
    """FlakyTask with three attempts and a short backoff."""

    name = "flaky_quick"
    retry = Retry(max_attempts=3, retry_on=(ConnectionError,), backoff=0.2)


class TimedStepTask(StepTask):
    """StepTask with a time limit of 0.3 s."""

    name = "step_timed"
    timeout = 0.3


class TimedAsyncSleepTask(AsyncSleepTask):
    """AsyncSleepTask with a time limit of 0.3 s."""

    name = "async_sleep_timed"
    timeout = 0.3


class TimedBlockingTask(BaseTask[BlockingParams]):
    """One blocking call, then a checkpoint, with a time limit of 0.5 s."""

    name = "blocking_timed"
    params_model = BlockingParams
    timeout = 0.5

    def pre(self) -> None:
        pass

    def run(self) -> str:
        time.sleep(self.params.seconds)
        self.checkpoint({"slept": self.params.seconds})
        return "done"

    def post(self) -> None:
        pass


class TimedAsyncPostTask(BaseTask[BlockingParams]):
    """An async task whose post() awaits a long sleep, with a time limit of 0.3 s."""

    name = "async_post_timed"
    params_model = BlockingParams
    timeout = 0.3

    async def pre(self) -> None:
        pass

    async def run(self) -> str:
        return "done"

    async def post(self) -> None:
        await asyncio.sleep(self.params.seconds)


class CrashParams(StepParams):
    #: The step in which every run ends its process with exit status 137.
    crash_step: int = Field(default=2, ge=1)


class CrashTask(StepTask):
    """StepTask whose process exits in crash_step, as if killed, on every run."""

    name = "crash"
    params_model = CrashParams
    retry = Retry(max_attempts=3, backoff=0.5)

    def run(self) -> dict[str, int]:
        params = self.params
        assert isinstance(params, CrashParams)
        done = self.state["step"] if self.state else 0
        for step in range(done + 1, params.n + 1):
            self.sleep(params.step_s)
            if step == params.crash_step:
                os._exit(137)
            self.set_progress(step, params.n)
            self.checkpoint({"step": step}, effects=self._record(step))
        return {"sum": params.n * (params.n + 1) // 2}


class LoopBlockingTask(BaseTask[BlockingParams]):
    """An async task that blocks its event loop with a plain sleep, by mistake."""

    name = "async_blocking"
    params_model = BlockingParams

    async def pre(self) -> None:
        pass

    async def run(self) -> str:
        time.sleep(self.params.seconds)
        return "done"

    async def post(self) -> None:
        pass
