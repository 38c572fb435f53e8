"""`dynasorctl bench serve`: the arms on one arrival trace per rate and seed, then figures.

Builds the programs once from the recorded traces and policies, the deadlines' base (each
program type's mean unloaded latency, from the simulator with the run's step cost), and
one cell per (arm, rate, seed); runs the cells on the simulator or on the real engine (a
worker process in the engine's environment), and returns every outcome.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynasorctl.bench.serve.arms import ARMS, CellResult, Outcome
from dynasorctl.bench.serve.sim import Simulator, StepCost
from dynasorctl.bench.serve.workload import (
    Program,
    ProgramType,
    Template,
    cot_templates,
    draw,
    program_to_json,
    sc_template,
)
from proxy.core.policy import CotPolicy, ScPolicy

ROOT = Path(__file__).resolve().parents[3]
# Default rates, as multiples of the rate that saturates the plain engine: fewer on the real
# engine, where a cell takes minutes (and its few programs let the stopping arms hold their
# deadlines to higher rates than a long run does).
SIMULATED_RATES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5)
ENGINE_RATES = (0.5, 1.0, 2.0, 3.0)


class BenchError(Exception):
    """The benchmark cannot run (bad settings, no engine, the engine failed)."""


@dataclass(frozen=True)
class Settings:
    arms: tuple[str, ...]
    rates: tuple[float, ...]  # programs a second; empty: chosen from the engine's capacity
    seeds: int
    programs: int  # per cell
    slo_scale: float  # for attainment against rate
    slo_scales: tuple[float, ...]  # for attainment against SLO scale
    sc_share: float  # of programs that are self-consistency (the rest chain of thought)
    length_scale: float
    max_tokens: int  # a request's scaled length is capped here
    capacity: int
    cost: StepCost
    cache_block: int  # tokens: the engine's KV block, the prefix cache's unit
    sc_policy: ScPolicy
    cot_policy: CotPolicy
    simulate: bool = True
    model: Path | None = None
    engine_python: Path | None = None
    max_model_len: int = 2048


@dataclass(frozen=True)
class Cell:
    arm: str
    rate: float
    seed: int
    programs: list[Program]
    horizon: float


@dataclass
class Run:
    settings: Settings  # in a real run, with the step cost measured in it
    base: dict[str, float]
    rates: tuple[float, ...]
    cells: list[Cell]
    results: list[CellResult] = field(default_factory=list)
    simulated: list[CellResult] = field(default_factory=list)  # the same cells, real mode


def build_templates(settings: Settings, sc_records: Sequence[Any], cot_records: Sequence[Any],
                    same: Callable[[str | None, str], bool]) -> dict[ProgramType, list[Template]]:
    s = settings
    return {
        "sc": [sc_template(p, s.sc_policy, s.length_scale, s.max_tokens) for p in sc_records],
        "cot": cot_templates(cot_records, s.cot_policy, s.length_scale, s.max_tokens, same),
    }


def unloaded(template: Template, s: Settings) -> float:
    """A program's latency alone on the engine, served plainly (FCFS, no stopping)."""
    result = Simulator(s.cost, s.capacity, ARMS["fcfs"].scheduler(), stopping=False,
                       cache_block=s.cache_block).run([Program("alone", template, 0.0)])
    latency = result.outcomes[0].latency
    assert latency is not None
    return latency


def bases(templates: dict[ProgramType, list[Template]], settings: Settings) -> dict[str, float]:
    return {kind: statistics.mean(unloaded(t, settings) for t in ts)
            for kind, ts in templates.items() if ts}


def auto_rates(templates: dict[ProgramType, list[Template]], settings: Settings) -> tuple[float, ...]:
    """Rates around where the plain engine saturates: its throughput at full batch over a
    program's mean tokens without stopping."""
    mix = {"sc": settings.sc_share, "cot": 1 - settings.sc_share}
    tokens = sum(share * statistics.mean(sum(t.lengths) for t in templates[kind])
                 for kind, share in mix.items() if share > 0)
    context = statistics.mean(t.prompt_tokens + t.lengths[0] / 2
                              for ts in templates.values() for t in ts)
    n = settings.capacity
    per_second = n / settings.cost.step(n, 0, round(n * context))
    saturation = per_second / tokens
    factors = SIMULATED_RATES if settings.simulate else ENGINE_RATES
    return tuple(float(f"{saturation * f:.2g}") for f in factors)


def plan(settings: Settings, templates: dict[ProgramType, list[Template]]) -> Run:
    base = bases(templates, settings)
    rates = settings.rates or auto_rates(templates, settings)
    mix: dict[ProgramType, float] = {"sc": settings.sc_share, "cot": 1 - settings.sc_share}
    slack = max(settings.slo_scales + (settings.slo_scale,)) * 3 * max(base.values())
    cells = []
    for rate in rates:
        for seed in range(settings.seeds):
            programs = draw(templates, mix, settings.programs, rate, seed)
            for arm in settings.arms:
                cells.append(Cell(arm, rate, seed, programs, programs[-1].arrival + slack))
    return Run(settings, base, rates, cells)


def simulate(run: Run, tick: Callable[[], None]) -> list[CellResult]:
    out = []
    for cell in run.cells:
        arm = ARMS[cell.arm]
        sim = Simulator(run.settings.cost, run.settings.capacity, arm.scheduler(), arm.stopping,
                        cell.horizon, run.settings.cache_block)
        out.append(sim.run(cell.programs))
        tick()
    return out


def engine_python(settings: Settings) -> Path:
    if settings.engine_python is not None:
        return settings.engine_python
    local = ROOT / ".venv-engine" / "bin" / "python"
    if local.exists():
        return local
    raise BenchError("no engine environment: run `make engine` (it builds .venv-engine), "
                     "or pass --engine-python, or use --simulate")


def on_engine(s: Settings, fit_repeats: int, plan_cells: Callable[[list[list[float]]], Run],
              tick: Callable[[], None],
              on_sample: Callable[[list[float]], None] = lambda sample: None,
              on_cell: Callable[[Cell, CellResult], None] = lambda cell, result: None,
              ) -> tuple[Run, list[list[float]]]:
    """Time the real engine's steps, plan the cells from that, run them on the same engine.

    A worker in the engine's environment starts the engine once; `plan_cells` gets the step
    timings (empty without `fit_repeats`) and returns the run to do (no cells: measure only).
    """
    model = s.model or ROOT / ".cache" / "models" / "smollm2-135m"
    if not (model / "config.json").exists():
        raise BenchError(f"no model at {model}: run `make engine`, or pass --model")
    job = {"model": str(model), "max_model_len": s.max_model_len, "capacity": s.capacity,
           "cache_block": s.cache_block, "fit": fit_repeats}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get(
        "PYTHONPATH")])), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cores = f"0-{(os.cpu_count() or 1) - 1}"  # every core, none kept back (ENGINE.md's recipe)
    for key, value in (("VLLM_CPU_KVCACHE_SPACE", "2"), ("VLLM_CPU_OMP_THREADS_BIND", cores),
                       ("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")):
        env.setdefault(key, value)
    results: dict[int, CellResult] = {}
    samples: list[list[float]] = []
    run: Run | None = None
    with tempfile.NamedTemporaryFile("w+", prefix="dynasor-bench-serve-", suffix=".log",
                                     delete=False) as log:
        proc = subprocess.Popen([str(engine_python(s)), "-m", "dynasorctl.bench.serve.engine"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                text=True, env=env, cwd=ROOT)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            for line in proc.stdout:
                message = json.loads(line)
                if "tick" in message:
                    tick()
                elif "sample" in message:
                    samples.append(message["sample"])
                    on_sample(message["sample"])
                    tick()
                elif "ready" in message:
                    run = plan_cells(samples)
                    proc.stdin.write(json.dumps({"cells": [
                        {"arm": c.arm, "horizon": c.horizon,
                         "programs": [program_to_json(p) for p in c.programs]}
                        for c in run.cells]}) + "\n")
                    proc.stdin.close()
                elif "cell" in message and run is not None:
                    result = results[message["cell"]] = cell_result(message["result"])
                    on_cell(run.cells[message["cell"]], result)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if code != 0 or run is None or len(results) != len(run.cells):
        tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"the engine worker failed (exit {code}); log {log.name}: "
                         + " | ".join(tail))
    os.unlink(log.name)
    run.results = [results[i] for i in range(len(run.cells))]
    return run, samples


def cell_result(data: dict[str, Any]) -> CellResult:
    return CellResult([Outcome(**o) for o in data["outcomes"]], data["scheduler_seconds"],
                      data["admitted"], data["peak_queued_programs"])

