"""`bench serve`'s workload: programs from recorded traces, their replayed signal, deadlines.

"Real compute, replayed signal": each request generates its recorded length (times
`scale`, so it fits the engine) whatever the model writes, and the certaindex and the
policy's stop come from the recording. Everything a policy decides on a recording is
decided here, once, independent of timing: how many answers a self-consistency program
reads before it stops, where a chain of thought stops, and whether the answer it ends
with is right. The runners (simulator, real engine) only replay it in time.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from proxy.core.certaindex import (
    entropy_certaindex,
    group_by_normalized,
    group_sizes,
    majority,
    normalize_answer,
    probe_certaindex,
)
from proxy.core.policy import CotPolicy, ScPolicy, decide_sc, first_stop, probes_used

ProgramType = Literal["sc", "cot"]
# A probe as the proxy takes it: the paper's suffix (about 24 tokens) after the text so far,
# then about 6 answer tokens (the recordings' median), every policy interval. Scaled, a
# probe keeps its share of the work: at 1/32, no suffix (the engine recomputes the last
# cached token) and one answer token, every 8 tokens.
PROBE_SUFFIX_TOKENS = 24
PROBE_ANSWER_TOKENS = 6
Same = Callable[[str | None, str], bool]  # is this answer the gold one (math-aware)


@dataclass(frozen=True, slots=True)
class ProbePoint:
    position: int  # scaled main tokens generated when the probe is taken
    certaindex: float  # the recording's certaindex there (the policy's probes so far)


@dataclass(frozen=True, slots=True)
class Template:
    """One recorded program, scaled, with what the policy decides on it."""

    source: str
    type: ProgramType
    difficulty: int  # 1: always right, 2: sometimes, 3: never (over the recorded answers)
    prompt_tokens: int
    lengths: tuple[int, ...]  # scaled tokens of each request (sc: in start order)
    correct_full: bool  # the answer without stopping (sc: majority of all samples)
    correct_stopped: bool  # the answer where the policy stops
    wave: int = 1  # sc: samples started at once under the policy
    stop_after: int = 0  # sc: answers read when the policy stops
    certaindex: tuple[float, ...] = ()  # sc: after each answer read
    probes: tuple[ProbePoint, ...] = ()  # cot: where the benchmark's probes are taken
    stop_at: int | None = None  # cot: scaled position of the policy's stop (None: never)
    probe_suffix: int = 1  # cot: tokens each probe prefills after the text so far
    probe_tokens: int = 1  # cot: tokens each probe decodes


@dataclass(frozen=True, slots=True)
class Program:
    program_id: str
    template: Template
    arrival: float  # seconds after the run starts


def scaled(tokens: int, scale: float, cap: int) -> int:
    return max(1, min(cap, round(tokens * scale)))


def _difficulty(correct: Sequence[bool | None]) -> int:
    right = [bool(c) for c in correct]
    return 1 if all(right) else 3 if not any(right) else 2


def _majority_correct(answers: Sequence[str | None], correct: Sequence[bool | None]) -> bool:
    """Whether the majority answer is right: graded like the sample that gave it."""
    chosen = normalize_answer(majority(answers, group_by_normalized(answers)))
    return chosen is not None and any(
        normalize_answer(a) == chosen and bool(c) for a, c in zip(answers, correct))


def sc_template(program, policy: ScPolicy, scale: float, cap: int) -> Template:
    """A self-consistency program under `policy`, answers read in start order (as enforce does)."""
    samples = program.samples[: policy.max_samples]
    answers = [s.final_answer for s in samples]
    correct = [s.final_correct for s in samples]
    read = len(samples)
    for k in range(1, len(samples) + 1):
        if decide_sc(policy, answers[:k]).stop:
            read = k
            break
    certaindex = tuple(entropy_certaindex(group_sizes(group_by_normalized(answers[:k])))
                       for k in range(1, len(samples) + 1))
    words = len(program.problem.split())
    return Template(
        source=program.program_id, type="sc",
        difficulty=_difficulty([s.final_correct for s in program.samples]),
        prompt_tokens=max(16, round(words * 1.4) + 20),  # not recorded: about 1.4 tokens a word
        lengths=tuple(scaled(s.completion_tokens, scale, cap) for s in samples),
        correct_full=_majority_correct(answers, correct),
        correct_stopped=_majority_correct(answers[:read], correct[:read]),
        wave=max(1, policy.min_samples), stop_after=read, certaindex=certaindex)


def cot_templates(traces, policy: CotPolicy, scale: float, cap: int, same: Same
                  ) -> list[Template]:
    """Chain-of-thought traces under `policy`; difficulty over the seeds of each problem.

    Probes are taken every policy interval (scaled), each one scaled like the text.
    """
    probe_every = scaled(policy.interval, scale, cap)
    suffix = int(PROBE_SUFFIX_TOKENS * scale)  # may be 0: the engine recomputes a cached token
    answer = scaled(PROBE_ANSWER_TOKENS, scale, cap)
    seeds: dict[tuple[str, str, str], list[bool | None]] = defaultdict(list)
    for t in traces:
        seeds[(t.model, t.dataset, t.problem_id)].append(t.final_correct)
    out = []
    for t in traces:
        length = scaled(t.completion_tokens, scale, cap)
        index, decision = first_stop(policy, t.probes)
        stop_at = None
        correct_stopped = bool(t.final_correct)
        if index is not None:
            stop_at = min(length, max(1, math.ceil(t.probes[index].position * scale)))
            if normalize_answer(decision.answer) != normalize_answer(t.final_answer):
                correct_stopped = same(decision.answer, t.gold)
        used = probes_used(policy, t.probes)
        points = []
        for position in range(probe_every, length, probe_every):
            seen = [p for p in used if p.position <= position / scale]
            points.append(ProbePoint(position, probe_certaindex(
                [p.answer for p in seen], [p.hesitant for p in seen], policy.window)))
        out.append(Template(
            source=t.trace_id, type="cot", difficulty=_difficulty(seeds[(t.model, t.dataset,
                                                                         t.problem_id)]),
            prompt_tokens=t.prompt_tokens or 128, lengths=(length,),
            correct_full=bool(t.final_correct), correct_stopped=correct_stopped,
            probes=tuple(points), stop_at=stop_at, probe_suffix=suffix, probe_tokens=answer))
    return out


def draw(templates: dict[ProgramType, Sequence[Template]], mix: dict[ProgramType, float],
         count: int, rate: float, seed: int) -> list[Program]:
    """`count` programs arriving as a Poisson process of `rate` programs a second.

    The same seed gives the same programs in the same order at every rate (only the gaps
    scale), so arms and rates see one arrival trace.
    """
    rng = random.Random(seed)
    kinds = [k for k in mix if mix[k] > 0 and templates.get(k)]
    weights = [mix[k] for k in kinds]
    now = 0.0
    out = []
    for i in range(count):
        now += rng.expovariate(1.0) / rate
        kind = rng.choices(kinds, weights)[0]
        out.append(Program(f"s{seed}-{i}", rng.choice(templates[kind]), now))
    return out


def deadline(program: Program, base: dict[str, float], slo_scale: float) -> float:
    """The paper's deadline: SLO scale x difficulty x the type's unloaded latency."""
    return slo_scale * program.template.difficulty * base[program.template.type]


def program_to_json(program: Program) -> dict:
    return {"program_id": program.program_id, "arrival": program.arrival,
            "template": asdict(program.template)}


def program_from_json(data: dict) -> Program:
    t = dict(data["template"])
    t["lengths"] = tuple(t["lengths"])
    t["certaindex"] = tuple(t["certaindex"])
    t["probes"] = tuple(ProbePoint(**p) for p in t["probes"])
    return Program(data["program_id"], Template(**t), float(data["arrival"]))
