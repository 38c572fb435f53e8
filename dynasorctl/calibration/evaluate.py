"""`evaluate`: one policy over every record, through the proxy's own decision functions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from math import gcd

from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.observed import ObservedProgram, ObservedRun
from dynasorctl.calibration.sc import replay_program
from dynasorctl.calibration.table import PROBE_PROMPT_COST, build_table
from dynasorctl.errors import UserError
from dynasorctl.trials import TrialSetup
from proxy.core.policy import CotPolicy, PolicyFile, first_stop, taken


@dataclass(frozen=True, slots=True)
class Summary:
    runs: int
    in_scope: int  # runs of the model the policy applies to
    stopped: float
    net_saved: float
    labelled: int
    accuracy_full: float | None
    accuracy_policy: float | None
    lost: int
    gained: int
    changed: int
    sources: dict[str, int] = field(default_factory=dict)  # stops by where the answer came from


def probe_interval(runs: Sequence[ObservedRun]) -> int:
    """The interval the recordings were probed at (gcd of probe positions)."""
    g = 0
    for run in runs:
        for p in run.probes:
            g = gcd(g, p.position)
    return g


def check_schedule(policy: CotPolicy, recorded: int) -> None:
    """A policy can only be replayed on probes that were recorded."""
    checked = [("interval", policy.interval if policy.periodic else None),
               ("early_interval", policy.early_interval if policy.periodic else None),
               ("statement.align", policy.statement.align if policy.statement else None)]
    for name, value in checked:
        if value is not None and recorded and value % recorded:
            raise UserError(f"the policy's {name} is {value} tokens but the traces were probed "
                            f"every {recorded}: use a multiple of {recorded}")


def check_trials(policy: CotPolicy, trials: TrialSetup | None) -> None:
    """A policy that takes trials replays only on trials recorded the way it takes them."""
    if policy.transition is None:
        return
    if trials is None:
        raise UserError("the policy takes trials at transition words (DEER): give the trials "
                        "recorded with the traces (--trials FILE)")
    why = trials.mismatch(policy.transition)
    if why is not None:
        raise UserError(f"the recorded trials cannot stand for the policy's: {why}")


def evaluate_cot(runs: Sequence[ObservedRun], policy: PolicyFile, grader: Grader,
                 progress: Callable[[int, int], None] | None = None,
                 trials: TrialSetup | None = None) -> tuple[list[dict], Summary]:
    """A decision per run (as `decide_cot` takes it) and the summary over all runs.

    `trials`: how the runs' trials were recorded (None: no trials recorded).
    """
    assert policy.cot is not None
    check_schedule(policy.cot, probe_interval(runs))
    check_trials(policy.cot, trials)
    table = build_table(runs)
    decisions: list[dict] = []
    total = saved = cost = stopped = in_scope = 0
    answers: list[tuple[ObservedRun, str | None, bool]] = []
    for r, run in enumerate(runs):
        total += run.main_tokens
        record = {"trace_id": run.run_id, "stop_token": None, "answer": run.final_answer,
                  "probes": 0, "probe_tokens": 0, "source": None}
        if policy.applies_to(run.model):
            in_scope += 1
            seq = table.observations(r)
            index, decision = first_stop(policy.cot, seq)
            took = taken(policy.cot, seq if index is None else seq[: index + 1])
            record["probes"] = len(took)
            record["probe_tokens"] = sum(p.tokens for p in took)
            cost += record["probe_tokens"] + PROBE_PROMPT_COST * len(took)
            if index is not None:
                stopped += 1
                record["stop_token"] = seq[index].position
                record["answer"] = decision.answer
                record["source"] = decision.source
                saved += run.main_tokens - seq[index].position
        answers.append((run, record["answer"], record["stop_token"] is not None))
        decisions.append(record)
        if progress:
            progress(r + 1, len(runs))
    sources = Counter(d["source"] for d in decisions if d["source"] is not None)
    summary = _summary(answers, len(runs), in_scope, stopped,
                       (saved - cost) / total if total else 0.0, grader)
    return decisions, replace(summary, sources=dict(sources))


def evaluate_sc(programs: Sequence[ObservedProgram], policy: PolicyFile, grader: Grader,
                progress: Callable[[int, int], None] | None = None,
                ) -> tuple[list[dict], Summary]:
    """A decision per program (as `decide_sc` takes it) and the summary over all programs."""
    assert policy.sc is not None
    decisions: list[dict] = []
    total = spent = stopped = in_scope = 0
    answers: list[tuple[ObservedRun, str | None, bool]] = []
    for i, program in enumerate(programs):
        full = replay_program(program, None, grader)
        out = full
        if policy.applies_to(program.model):
            in_scope += 1
            out = replay_program(program, policy.sc, grader)
        total += full.tokens
        spent += out.tokens + out.probe_tokens + PROBE_PROMPT_COST * out.probes
        stopped += out.samples < full.samples
        decisions.append({"program_id": program.program_id, "samples": out.samples,
                          "answer": out.answer, "probe_tokens": out.probe_tokens})
        # Score the program as one run: its majority answers, unstopped and under the policy.
        as_run = ObservedRun(program.program_id, program.group, program.model, (), full.answer,
                             full.tokens, program.gold, None)
        answers.append((as_run, out.answer, out.samples < full.samples))
        if progress:
            progress(i + 1, len(programs))
    return decisions, _summary(answers, len(programs), in_scope, stopped,
                               (total - spent) / total if total else 0.0, grader)


def _summary(answers: list[tuple[ObservedRun, str | None, bool]], n: int, in_scope: int,
             stopped: int, net_saved: float, grader: Grader) -> Summary:
    """Accuracy unstopped and under the policy; an unchanged answer keeps its grading."""
    stops = [i for i, (_, _, s) in enumerate(answers) if s]
    same = dict(zip(stops, grader.same_many([(answers[i][0].final_answer, answers[i][1])
                                             for i in stops])))
    labelled = [i for i, (run, _, _) in enumerate(answers) if run.gold is not None]
    ungraded = [i for i in labelled if answers[i][0].final_correct is None]
    graded = dict(zip(ungraded, grader.same_many([(answers[i][0].gold, answers[i][0].final_answer)
                                                  for i in ungraded])))
    full = {i: bool(answers[i][0].final_correct) if i not in graded else graded[i]
            for i in labelled}
    moved = [i for i in labelled if i in same and not same[i]]
    policy = dict(full)
    policy.update(zip(moved, grader.same_many([(answers[i][0].gold, answers[i][1])
                                               for i in moved])))
    m = len(labelled)
    return Summary(
        runs=n, in_scope=in_scope, stopped=stopped / n if n else 0.0, net_saved=net_saved,
        labelled=m,
        accuracy_full=sum(full.values()) / m if m else None,
        accuracy_policy=sum(policy.values()) / m if m else None,
        lost=sum(full[i] and not policy[i] for i in labelled),
        gained=sum(policy[i] and not full[i] for i in labelled),
        changed=sum(not v for v in same.values()),
    )
