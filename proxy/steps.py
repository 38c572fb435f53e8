"""How a multi-step program (tree search, rebase) reports its steps to `serve`'s scheduler.

    POST /v1/programs/{program_id}/steps
    {"rewards": [0.8, 0.35], "done": false}

`program_id` is the program's `X-Dynasor-Program` (the header its requests carry);
`rewards` are the reward model's scores in [0, 1] of what the step produced (MCTS: the
rollouts that reached an answer; rebase: the step's candidates); `done: true` says the
program will send nothing more (its queued requests are dropped, as after an enforced
stop). The scheduler turns the rewards into the program's reward certaindex (the mean
for `mcts`, the max for `rebase`, by the program's `X-Dynasor-Program-Type`), which
shrinks its predicted remaining work. The answer is 200 with what was taken; bad input
is an OpenAI-shaped 400 and changes nothing.

The parsing is pure (`parse_step`); `ServeApp` routes the request and hands the report on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

STEPS_PATH = re.compile(r"^/v1/programs/(?P<program>[^/]+)/steps$")
MAX_PROGRAM_ID = 256  # characters: a program id is a client's label, not a payload
MAX_REWARDS = 4096  # scores in one step report


# A score in [0, 1]: a number, not a string or a boolean; NaN and infinities refused.
Reward = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)]


class StepBody(BaseModel):
    """The body of a step report."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field must not pass as no rewards

    rewards: list[Reward] = Field(min_length=1, max_length=MAX_REWARDS)
    done: bool = Field(False, strict=True)


@dataclass(frozen=True, slots=True)
class StepReport:
    program_id: str
    rewards: tuple[float, ...]
    done: bool


class StepError(ValueError):
    """A step report that cannot be taken; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def program_of(path: str) -> str | None:
    """The program id of a step-report path, or None if `path` is not one."""
    found = STEPS_PATH.match(path)
    return unquote(found["program"]) if found else None


def parse_step(program_id: str, raw: bytes) -> StepReport:
    """A step report from its program id (from the path) and its JSON body; StepError if bad."""
    if not program_id or len(program_id) > MAX_PROGRAM_ID:
        raise StepError(f"the program id must be 1 to {MAX_PROGRAM_ID} characters", "program_id")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StepError(f"the body is not valid JSON: {exc}") from None
    try:
        body = StepBody.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise StepError(f"{where}: {first['msg']}", first["loc"][0] if first["loc"] else None) from None
    return StepReport(program_id, tuple(body.rewards), body.done)
