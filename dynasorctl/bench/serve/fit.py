"""The simulator's step cost, measured on the real engine and fitted by least squares.

`measure` (in the engine's environment) runs batches of B requests with P-token prompts
that generate G tokens each (ignore_eos) and times every step from one request's
stream: decode steps (B running, context B x (P + tokens so far)) and first tokens of a
lone request (its prompt prefilled). `fit` (pure) solves for the four constants of
`StepCost`, never below zero.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dynasorctl.bench.serve.sim import StepCost

Sample = tuple[float, int, int, int]  # seconds, running sequences, prefilled tokens, context

# Sized to the benchmark's engine (16 sequences, contexts of a few hundred tokens at scaled
# lengths) and kept light: it runs under the machine's engine lock before every real run.
BATCHES = (1, 4, 8, 16)
PROMPTS = (16, 256)
PREFILLS = (16, 64, 256)
GENERATE = 32


async def measure(engine: Any, vocab: int, repeats: int, emit: Callable[[Sample], None]) -> None:
    """Step timings of the engine (see the module docstring), each given to `emit` at once."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    counter = itertools.count()

    async def batch(size: int, prompt: int, generate: int) -> list[float]:
        stamps: list[float] = []
        params = SamplingParams(max_tokens=generate, ignore_eos=True, temperature=1.0,
                                detokenize=False, output_kind=RequestOutputKind.DELTA)

        async def one(i: int) -> None:
            ids = [(next(counter) * 7919 + j * 31) % (vocab - 200) + 100 for j in range(prompt)]
            async for _ in engine.generate({"prompt_token_ids": ids}, params,
                                           f"fit-{next(counter)}"):
                if i == 0:
                    stamps.append(time.perf_counter())

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(size)))
        return [start, *stamps]

    for _ in range(repeats):
        for size, prompt in itertools.product(BATCHES, PROMPTS):
            stamps = await batch(size, prompt, GENERATE)
            steps = [b - a for a, b in itertools.pairwise(stamps[2:])]  # decode steps only
            emit((statistics.median(steps), size, 0, size * (prompt + len(stamps) // 2)))
        for prompt in PREFILLS:
            stamps = await batch(1, prompt, 1)
            emit((stamps[1] - stamps[0], 1, prompt, prompt))


def fit(samples: Sequence[Sample], name: str) -> tuple[StepCost, float]:
    """Least-squares step cost (non-negative) and the fit's relative error (median).

    Relative errors, so a 30 ms step counts as much as a 1 s prefill; then once more without
    the measurements more than three times the median error off (a burst of other work on a
    shared machine), at most a third of them.
    """
    cost = _solve(samples, name)
    errors = [_error(cost, x) for x in samples]
    cut = max(3 * float(np.median(errors)), sorted(errors)[len(errors) - len(errors) // 3 - 1])
    kept = [x for x, e in zip(samples, errors) if e <= cut]
    if len(kept) >= 4 and len(kept) < len(samples):
        cost = _solve(kept, name)
    return cost, float(np.median([_error(cost, x) for x in samples]))


def _error(cost: StepCost, sample: Sample) -> float:
    t, seqs, prefill, context = sample
    return abs(cost.step(seqs, prefill, context) - t) / t


def _solve(samples: Sequence[Sample], name: str) -> StepCost:
    x = np.array([[1.0, s, p, c] for _, s, p, c in samples])
    y = np.array([t for t, *_ in samples])
    weights = 1.0 / y
    active = [0, 1, 2, 3]
    while True:  # drop a negative term and solve again (a small non-negative least squares)
        coef, *_ = np.linalg.lstsq(x[:, active] * weights[:, None], y * weights, rcond=None)
        if (coef >= 0).all():
            break
        active.pop(int(np.argmin(coef)))
    full = np.zeros(4)
    full[active] = coef
    return StepCost(*(float(v) for v in full), name=name)


def points(count: int) -> int:
    """How many measurements `measure` takes with `count` repeats (for a progress bar)."""
    return count * (len(BATCHES) * len(PROMPTS) + len(PREFILLS))
