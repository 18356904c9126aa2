"""``countdown``: sleeps in steps, reporting progress and checkpointing after each."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from taskmill.task import BaseTask


class CountdownParams(BaseModel):
    seconds: float = Field(
        ge=0, le=86_400, description="Total time to sleep, in seconds."
    )
    steps: int = Field(ge=1, le=1_000_000, description="How many steps to sleep it in.")


class Countdown(BaseTask[CountdownParams]):
    """Sleep `seconds` in `steps` equal steps; small enough to pause and resume by hand."""

    name = "countdown"
    params_model = CountdownParams

    def pre(self) -> None:
        pass

    def run(self) -> dict[str, Any]:
        steps = self.params.steps
        done = self.state["step"] if self.state else 0
        for step in range(done + 1, steps + 1):
            self.sleep(self.params.seconds / steps)
            self.set_progress(step, steps, f"Step {step} of {steps}")
            self.checkpoint({"step": step})
        return {"steps": steps}

    def post(self) -> None:
        pass
