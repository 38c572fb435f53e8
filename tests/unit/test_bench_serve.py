"""`bench serve`'s pure parts: programs, workload, simulator, figures; and the command, small."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import typer
from typer.testing import CliRunner

from dynasorctl.bench.serve.arms import ARMS, Outcome
from dynasorctl.bench.serve.metrics import attainment, rate_at, scale_at
from dynasorctl.bench.serve.programs import CotRun, ScRun
from dynasorctl.bench.serve.sim import Simulator, StepCost
from dynasorctl.bench.serve.workload import (
    ProbePoint,
    Program,
    Template,
    cot_templates,
    draw,
    program_from_json,
    program_to_json,
    sc_template,
)
from dynasorctl.commands import bench as bench_command
from dynasorctl.errors import UserError
from dynasorctl.traces import PACKAGED_SAMPLE, PACKAGED_SC_SAMPLE, CotTrace, ScProgram, ScSample
from proxy.core.policy import CotPolicy, ProbeObservation, ScPolicy

SC = Template("sc-a", "sc", 1, 10, (10, 20, 30, 40), correct_full=True, correct_stopped=False,
              wave=2, stop_after=3, certaindex=(0.0, 0.0, 0.6, 0.7))
COT = Template("cot-a", "cot", 2, 10, (20,), correct_full=False, correct_stopped=True,
               probes=(ProbePoint(4, 0.1), ProbePoint(8, 0.5), ProbePoint(12, 0.9)), stop_at=8)
UNIT = StepCost(fixed=1.0, per_seq=0.0, per_prefill=0.1, per_context=0.01)


def ids(requests) -> list[str]:
    return [r.request_id.split("/")[-1] for r in requests]


# --- programs ----------------------------------------------------------------------------


def test_sc_runs_in_waves_reads_answers_in_start_order_and_stops_where_recorded():
    run = ScRun(Program("p", SC, 0.0), stopping=True)
    assert ids(run.start().submit) == ["s0", "s1"]
    a = run.finished("p/s1", 20)  # s0 not read yet: nothing to read in order
    assert a.signal is None and not a.submit
    a = run.finished("p/s0", 10)
    assert a.signal == 0.0 and ids(a.submit) == ["s2", "s3"]  # both read: the next wave
    a = run.finished("p/s2", 30)  # the third answer: the policy stops
    assert a.done and a.signal == 0.6 and a.abort == ["p/s3"]
    assert run.stopped and run.correct is False  # graded at the stop


def test_sc_without_stopping_starts_every_sample_and_waits_for_all():
    run = ScRun(Program("p", SC, 0.0), stopping=False)
    assert ids(run.start().submit) == ["s0", "s1", "s2", "s3"]
    for i in range(3):
        assert not run.finished(f"p/s{i}", 10).done
    a = run.finished("p/s3", 40)
    assert a.done and not a.abort and not run.stopped and run.correct is True


def test_cot_probes_one_at_a_time_the_latest_point_passed_and_stops_at_the_policys_point():
    run = CotRun(Program("c", COT, 0.0), stopping=True)
    assert ids(run.start().submit) == ["main"]
    assert run.watch("c/main") == 4
    (probe,) = run.tokens("c/main", 5).submit
    assert probe.kind == "probe" and probe.position == 4 and probe.parent == "c/main"
    assert probe.prompt_tokens == 10 + 4 + COT.probe_suffix and probe.cached == 14
    assert run.watch("c/main") is None  # one probe in flight
    assert not run.tokens("c/main", 9).submit
    a = run.finished(probe.request_id, 1)
    assert a.signal == 0.1 and not a.done
    (probe,) = a.submit  # 9 tokens in: the point at 8, not the one at 4 again
    assert probe.position == 8
    a = run.finished(probe.request_id, 1)
    assert a.done and a.signal == 0.5 and a.abort == ["c/main"]
    assert run.stopped and run.correct is True


def test_cot_ending_by_itself_aborts_its_probe_and_keeps_its_final_answer():
    run = CotRun(Program("c", COT, 0.0), stopping=True)
    run.start()
    (probe,) = run.tokens("c/main", 4).submit
    a = run.finished("c/main", 20)
    assert a.done and a.abort == [probe.request_id] and not run.stopped and run.correct is False


def test_cot_without_stopping_never_probes():
    run = CotRun(Program("c", COT, 0.0), stopping=False)
    run.start()
    assert run.watch("c/main") is None and not run.tokens("c/main", 15).submit


# --- workload ----------------------------------------------------------------------------


def _sample(answer: str, correct: bool, tokens: int = 320) -> ScSample:
    return ScSample("", tokens, True, answer, correct)


def test_sc_template_replays_the_policy_in_start_order():
    program = ScProgram("x", "m", "d", "1", "What is one plus one?", "2", [
        _sample("2", True), _sample("3", False), _sample("2", True), _sample("2", True),
        _sample("5", False, 640)])
    t = sc_template(program, ScPolicy(threshold=0.5, min_samples=2, max_samples=8), 1 / 32, 1024)
    assert t.stop_after == 4  # 2,3: 0; 2,3,2: 0.42; 2,3,2,2: 0.59 >= 0.5
    assert t.certaindex[1] == 0.0 and t.certaindex[3] == pytest.approx(0.594, abs=1e-3)
    assert t.lengths == (10, 10, 10, 10, 20) and t.wave == 2
    assert t.difficulty == 2 and t.correct_stopped and t.correct_full


def test_cot_templates_scale_probes_stops_and_grade_by_problem():
    probes = [ProbeObservation(p, "7" if p >= 512 else "1", False, 6) for p in range(64, 2049, 64)]
    traces = [CotTrace(f"t{seed}", "m", "d", "1", seed, "Q", "7", "", 2048, 100, "stop", "7",
                       seed == 42, probes) for seed in (42, 43)]
    policy = CotPolicy(interval=256, window=3)
    seen: list[tuple[str | None, str]] = []
    (t, _) = cot_templates(traces, policy, 1 / 32, 1024, lambda a, g: seen.append((a, g)) or True)
    assert t.lengths == (64,) and t.difficulty == 2  # right under one seed, wrong under the other
    assert [p.position for p in t.probes] == list(range(8, 64, 8))  # every 256 tokens, scaled
    assert t.stop_at == 32  # three agreeing probes at 512, 768, 1024 (unscaled)
    assert t.probes[3].certaindex == 1.0 and t.probes[1].certaindex == pytest.approx(1 / 3)
    assert seen == [] and t.correct_stopped  # the stop's answer is the final one: no grading


def test_draw_is_one_arrival_trace_per_seed_at_every_rate():
    templates = {"sc": [SC], "cot": [COT]}
    slow = draw(templates, {"sc": 0.5, "cot": 0.5}, 50, 1.0, seed=3)
    fast = draw(templates, {"sc": 0.5, "cot": 0.5}, 50, 2.0, seed=3)
    assert [p.template.source for p in slow] == [p.template.source for p in fast]
    assert [p.arrival for p in fast] == pytest.approx([p.arrival / 2 for p in slow])
    assert draw(templates, {"sc": 0.5, "cot": 0.5}, 50, 1.0, seed=4) != slow
    assert {p.template.type for p in slow} == {"sc", "cot"}


def test_programs_survive_json():
    for program in (Program("a", SC, 1.5), Program("b", COT, 2.0)):
        assert program_from_json(json.loads(json.dumps(program_to_json(program)))) == program


# --- simulator ---------------------------------------------------------------------------


def _alone(template: Template, stopping: bool = False, cost: StepCost = UNIT) -> Outcome:
    sim = Simulator(cost, 4, ARMS["fcfs"].scheduler(), stopping)
    return sim.run([Program("x", template, 0.0)]).outcomes[0]


def test_a_lone_request_costs_its_steps_in_closed_form():
    t = replace(COT, lengths=(5,))
    # 5 steps, context 10..14, the 10-token prompt prefilled in the first
    expected = 5 * 1.0 + 0.01 * sum(range(10, 15)) + 0.1 * 10
    assert _alone(t).latency == pytest.approx(expected)


def test_requests_in_one_batch_share_the_steps():
    # four samples, lengths 10..40; sample 0 prefills the prompt, the others hit the cache
    # (which still recomputes its last token)
    o = _alone(SC)
    steps = 40.0
    context = sum(10 + i for n in (10, 20, 30, 40) for i in range(n))
    assert o.latency == pytest.approx(steps + 0.01 * context + 0.1 * (10 + 3))
    assert o.tokens == 100 and not o.stopped


def test_stopping_in_the_simulator_ends_the_program_where_the_recording_does():
    o = _alone(COT, stopping=True)
    # probes taken at 4 and 8 tokens each take a step; the one at 8 stops the main request
    # one token later: 9 of its 20 tokens, and a token a probe
    assert o.stopped and o.correct and o.probe_tokens == 2 and o.tokens == 9 + 2


def test_the_prefix_cache_holds_whole_blocks_so_a_probe_recomputes_past_the_last_one():
    def alone(block: int) -> Outcome:
        sim = Simulator(UNIT, 4, ARMS["fcfs"].scheduler(), True, cache_block=block)
        return sim.run([Program("x", COT, 0.0)]).outcomes[0]

    exact, blocks = alone(1), alone(8)
    # probes on 14 and 18 cached tokens (+1 suffix each): 1 token each with an exact cache;
    # with 8-token blocks the cache holds 8 and 16, so 7 and 3 are prefilled
    assert blocks.latency - exact.latency == pytest.approx(0.1 * ((7 - 1) + (3 - 1)))
    assert blocks.tokens == exact.tokens


def test_simulator_is_deterministic_by_seed():
    templates = {"sc": [SC, replace(SC, source="b", lengths=(50, 5, 5, 60))], "cot": [COT]}
    cost = StepCost(0.03, 0.002, 0.001, 1e-6)

    def run(seed: int) -> list[Outcome]:
        programs = draw(templates, {"sc": 0.5, "cot": 0.5}, 40, 3.0, seed)
        return Simulator(cost, 4, ARMS["dynasor"].scheduler(), True).run(programs).outcomes

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_on_a_saturated_engine_a_later_short_program_finishes_before_an_earlier_long_one():
    long = replace(SC, source="long", lengths=(30,) * 8, certaindex=(0.0,) * 8)  # 8 at once
    short = replace(COT, source="short", lengths=(30,))
    # A first chain of thought shows the scheduler what one costs; then a long program
    # fills the engine, and a short one arrives behind it.
    programs = [Program("first", short, 0.0), Program("long", long, 0.01),
                Program("short", short, 0.02)]

    def finish(arm: str) -> dict[str, float | None]:
        sim = Simulator(UNIT, 2, ARMS[arm].scheduler(), stopping=False)
        return {o.program_id: o.finish for o in sim.run(programs).outcomes}

    fcfs, dynasor = finish("fcfs"), finish("dynasor-no-stop")
    assert fcfs["short"] > fcfs["long"]  # behind all of the long program's samples
    assert dynasor["short"] < dynasor["long"]


def test_a_program_not_done_by_the_horizon_counts_as_not_done():
    sim = Simulator(UNIT, 1, ARMS["fcfs"].scheduler(), False, horizon=5.0)
    (o,) = sim.run([Program("x", SC, 0.0)]).outcomes
    assert o.finish is None and o.latency is None


# --- figures -----------------------------------------------------------------------------


def test_rate_at_interpolates_the_first_crossing():
    assert rate_at([1, 2, 3], [0.95, 0.85, 0.5]) == (pytest.approx(1.5), "")
    assert rate_at([1, 2], [0.95, 0.92]) == (2, ">=")
    assert rate_at([1, 2], [0.8, 0.5]) == (1, "<")
    assert rate_at([3, 1, 2], [0.5, 0.95, 0.85])[0] == pytest.approx(1.5)  # any order


def test_the_simulator_beside_a_real_run_is_read_like_the_real_curve():
    from dynasorctl.bench.serve.metrics import summarise
    from dynasorctl.bench.serve.report import ArmFigures

    f = ArmFigures("dynasor", "", {0.5: [1.0, 0.9], 1.0: [0.6, 0.8]}, 0.0, "", {}, 0.0, "",
                   summarise([]), 0.0, 0, simulated={0.5: 0.9, 1.0: 0.5})
    assert f.simulated_gap() == pytest.approx(0.2)  # 0.7 real against 0.5 at 1.0
    assert f.simulated_rate_at_90() == (0.5, "")
    assert replace(f, simulated=None).simulated_gap() is None


def test_scale_at_finds_the_tightest_slo_meeting_the_target():
    assert scale_at([1, 2, 4], [0.5, 0.8, 1.0]) == (pytest.approx(3.0), "")
    assert scale_at([1, 2], [0.95, 1.0]) == (1, "<=")
    assert scale_at([1, 2], [0.5, 0.6]) == (2, ">")


def test_attainment_counts_deadlines_by_difficulty_and_unfinished_programs_as_missed():
    outcomes = [Outcome("a", "sc", 1, 0.0, 9.0, 0, 0, False, True),
                Outcome("b", "sc", 2, 1.0, 19.0, 0, 0, False, True),
                Outcome("c", "cot", 1, 0.0, None, 0, 0, False, True)]
    assert attainment(outcomes, {"sc": 10.0, "cot": 1.0}, 1.0) == pytest.approx(2 / 3)
    assert attainment(outcomes, {"sc": 5.0, "cot": 1.0}, 1.0) == pytest.approx(0.0)


# --- the command -------------------------------------------------------------------------


class Result:
    def __init__(self, code: int, stdout: str, output: str) -> None:
        self.exit_code, self.stdout, self.output = code, stdout, output


def invoke(args: list[str]) -> Result:
    """Run as `cli.main` does: a UserError is the command's one-line error (exit 2)."""
    app = typer.Typer()
    bench_command.register(app)
    result = CliRunner().invoke(app, args, standalone_mode=False)
    if isinstance(result.exception, UserError):
        return Result(2, result.stdout, str(result.exception))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.output)


SMALL = ["bench", "serve", "--simulate", "--sc-traces", str(PACKAGED_SC_SAMPLE),
         "--cot-traces", str(PACKAGED_SAMPLE), "--programs", "12", "--seeds", "1",
         "--rates", "0.2,0.6"]


def test_bench_serve_simulated_reports_every_arm_as_json(tmp_path):
    plot = tmp_path / "serve.png"
    result = invoke([*SMALL, "--format", "json", "--plot", str(plot), "--ablations"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["arms"]) == set(ARMS)
    for arm in data["arms"].values():
        assert 0.0 < arm["max_rate_at_90"] <= 0.6
        assert set(arm["attainment"]) == {"0.2", "0.6"}
    assert data["overhead"]["queued_programs"] == 1000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_table():
    result = invoke([*SMALL, "--arms", "fcfs,dynasor"])
    assert result.exit_code == 0, result.output
    assert "Highest rate at 90%" in result.stdout and "dynasor" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--arms", "fcfs,nope"], "unknown arm nope"),
    (["--rates", "fast"], "--rates"),
    (["--rates", "0,1"], "positive"),
    (["--sc-share", "2"], "--sc-share"),
    (["--cost", "1,2"], "--cost"),
    (["--format", "yaml"], "--format"),
])
def test_bench_serve_bad_arguments_get_one_line(args, message):
    result = invoke([*SMALL, *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_the_step_cost_fit_recovers_the_constants_and_shrugs_off_a_burst():
    from dynasorctl.bench.serve.fit import fit

    true = StepCost(0.03, 0.002, 0.0015, 3e-6)
    samples = [(true.step(s, p, c), s, p, c) for s in (1, 4, 8, 16) for p, c in
               ((0, 16 * s), (0, 512 * s))] + [(true.step(1, p, p), 1, p, p) for p in (64, 512)]
    cost, error = fit(samples, "t")
    assert (cost.fixed, cost.per_seq, cost.per_prefill, cost.per_context) == pytest.approx(
        (0.03, 0.002, 0.0015, 3e-6), rel=1e-6)
    assert error == pytest.approx(0.0, abs=1e-9)
    burst = [(t * (5 if i == 3 else 1), *rest) for i, (t, *rest) in enumerate(samples)]
    cost, _ = fit(burst, "t")
    assert cost.fixed == pytest.approx(0.03, rel=1e-6)  # the burst was left out
