"""`bench serve`'s figures from what each program did: attainment, rates, latency, tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from dynasorctl.bench.serve.arms import Outcome

TARGET = 0.9  # the attainment the paper reads rates and SLO scales at


def attainment(outcomes: Sequence[Outcome], base: Mapping[str, float], slo_scale: float) -> float:
    """Share of programs done by their deadline (SLO scale x difficulty x type's base)."""
    if not outcomes:
        return 0.0
    met = sum(1 for o in outcomes
              if o.latency is not None and o.latency <= slo_scale * o.difficulty * base[o.type])
    return met / len(outcomes)


def rate_at(rates: Sequence[float], attained: Sequence[float], target: float = TARGET
            ) -> tuple[float, str]:
    """The highest rate at which attainment is still `target`, interpolated linearly.

    Reads the curve from the lowest rate up to where it first falls below the target.
    Returns (rate, how): "" when the crossing is inside the rates, ">=" when attainment
    never fell below the target (the highest rate tried), "<" when it was below it even at
    the lowest rate (that rate).
    """
    points = sorted(zip(rates, attained))
    if points[0][1] < target:
        return points[0][0], "<"
    for (r0, a0), (r1, a1) in pairwise(points):
        if a1 < target:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1), ""
    return points[-1][0], ">="


def scale_at(scales: Sequence[float], attained: Sequence[float], target: float = TARGET
             ) -> tuple[float, str]:
    """The tightest SLO scale still meeting `target` (attainment grows with the scale)."""
    points = sorted(zip(scales, attained), reverse=True)
    if points[0][1] < target:
        return points[0][0], ">"
    for (s0, a0), (s1, a1) in pairwise(points):
        if a1 < target:
            return s0 - (s0 - s1) * (a0 - target) / (a0 - a1), ""
    return points[-1][0], "<="


@dataclass(frozen=True, slots=True)
class Summary:
    """One arm over a set of programs (all seeds of one rate, say)."""

    programs: int
    done: int
    p50: float | None  # program latency, seconds, of the programs done
    p99: float | None
    tokens: float  # generated per program, probes included
    probe_tokens: float
    stopped: float  # share of the programs done that the policy stopped
    accuracy: float  # share of the programs done whose replayed answer is right


def summarise(outcomes: Sequence[Outcome]) -> Summary:
    latencies = [o.latency for o in outcomes if o.latency is not None]
    p50, p99 = (float(x) for x in np.percentile(latencies, [50, 99])) if latencies else (None,
                                                                                         None)
    n = max(1, len(outcomes))
    done = [o for o in outcomes if o.finish is not None]
    return Summary(
        programs=len(outcomes), done=len(done), p50=p50, p99=p99,
        tokens=sum(o.tokens for o in outcomes) / n,
        probe_tokens=sum(o.probe_tokens for o in outcomes) / n,
        stopped=sum(o.stopped for o in done) / max(1, len(done)),
        accuracy=sum(o.correct for o in done) / max(1, len(done)))
