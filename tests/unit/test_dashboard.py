"""The dashboard: its store source, and the app driven with a pilot on a temp store."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest
import typer
from sqlalchemy import insert, select, update
from typer.testing import CliRunner

from dynasorctl.bench import dashboard_bench
from dynasorctl.calibration.bounds import clopper_pearson_upper
from dynasorctl.calibration.damage import damage, problem_ranks
from dynasorctl.calibration.evaluate import evaluate_cot
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.store_source import load_runs
from dynasorctl.commands import dashboard as dashboard_command
from dynasorctl.dashboard.app import DashboardApp, create_app
from dynasorctl.dashboard.calibrate import CalibrationSettings
from dynasorctl.dashboard.panels import savings_text, timeline_text
from dynasorctl.dashboard.savings import Damage, Group, changed_damage
from dynasorctl.dashboard.source import Filters, SourceError, StoreSource
from proxy.control import rollout
from proxy.core.policy import parse_policy_file
from proxy.store.db import make_engine, open_store
from proxy.store.models import PolicyRow, RolloutAuditRow, RolloutScopeRow
from proxy.store.recorder import Record, write_records

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLICY = 'version = 1\nkind = "cot"\nmodel = "*"\n\n[cot]\ninterval = 64\nwindow = 2\n'


def _record(i: int) -> Record:
    """Request i, 10 s older than i - 1: models a/b alternate, r03 failed, r04 was enforced
    by policy 1 at token 256, which shadowed r06, r08 and r10 (r10 would have answered 7)."""
    rid = f"r{i:02d}"
    mode = "enforce" if i == 4 else "shadow" if i in (6, 8, 10) else "observe"
    decided = mode != "observe"
    request = {"id": rid, "created_at": NOW - timedelta(seconds=10 * i + 5),
               "model": "model-a" if i % 2 else "model-b", "kind": "chat", "upstream": "u",
               "mode": mode, "stream": True, "n": 1,
               "status_code": 500 if i == 3 else 200, "error": "upstream 500" if i == 3 else None,
               "probed": True, "probe_count": 4, "probe_tokens": 12,
               "completion_tokens": 256 if i == 4 else 300 + i,
               "finish_reason": None if i == 3 else "stop",
               "final_answer": "42", "enforced": i == 4, "policy": "policy 1" if decided else None,
               "decision_token": 256 if decided else None,
               "decision_answer": ("7" if i == 10 else "42") if decided else None}
    # Answers settle on 42 from the second probe: the paper's rule (3 agreeing) stops at 256.
    answers = ["7", "42", "42", "42"]
    probes = [{"request_id": rid, "choice_index": 0, "position": 64 * (k + 1), "answer": a,
               "hesitant": False, "output_tokens": 3, "latency_ms": 1.0, "status": "ok",
               "certaindex": (k + 1) / 4} for k, a in enumerate(answers)]
    return Record(request, probes)


@pytest.fixture
def engine(tmp_path):
    engine = open_store(f"sqlite:///{tmp_path}/store.db")
    write_records(engine, [_record(i) for i in range(12)])
    with engine.begin() as conn:
        conn.execute(insert(PolicyRow), [{"kind": "cot", "model": "*", "version": 1, "policy_toml": POLICY,
                                          "source": "test", "created_at": NOW}])
    rollout.set_scope(engine, "*", mode="enforce", percent=10, policy=1, reason="start", who="test")
    with engine.begin() as conn:  # what the snapshot shows must not depend on the wall clock
        conn.execute(update(RolloutAuditRow).values(at=NOW - timedelta(minutes=30)))
        conn.execute(update(RolloutScopeRow).values(updated_at=NOW - timedelta(minutes=30)))
    return engine


@pytest.fixture
def source(engine):
    return StoreSource(engine, clock=lambda: NOW)


def _app(source: StoreSource, **kwargs) -> DashboardApp:
    return create_app(source, refresh_s=3600, **kwargs)  # tests refresh explicitly


async def _settle(pilot) -> None:
    """Wait for the refresh, then for the timeline worker the refreshed table starts."""
    for _ in range(2):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def _errors(app: DashboardApp) -> list[str]:
    seen: list[str] = []
    original = app.notify

    def notify(message, *args, **kwargs):
        if kwargs.get("severity") == "error":
            seen.append(str(message))
        return original(message, *args, **kwargs)

    app.notify = notify  # type: ignore[method-assign]
    return seen


# --- the source -------------------------------------------------------------------------------


def test_traffic_counts_the_window(source):
    t = source.traffic(minutes=1, buckets=6)
    assert t.requests == 6  # r00..r05 are 5..55 s old
    assert t.errors == 1
    assert t.completion_tokens == sum(300 + i for i in range(6)) - 48  # r04 stopped at 256
    assert t.probe_share == pytest.approx(72 / (72 + t.completion_tokens))
    assert t.buckets == [1, 1, 1, 1, 1, 1]
    assert t.requests_per_s == pytest.approx(0.1)


def test_certaindex_histogram_bins_recent_probes(source):
    bins = source.certaindex_histogram(minutes=1)
    assert len(bins) == 10 and sum(bins) == 24
    assert bins[2] == bins[5] == bins[7] == bins[9] == 6  # 0.25, 0.5, 0.75, 1.0


def test_requests_filters_and_limit(source):
    assert len(source.requests()) == 12
    assert len(source.requests(limit=5)) == 5
    assert {r.model for r in source.requests(Filters(model="model-a"))} == {"model-a"}
    assert [r.id for r in source.requests(Filters(outcome="error"))] == ["r03"]
    assert [r.id for r in source.requests(Filters(mode="enforce"))] == ["r04"]
    assert [r.outcome for r in source.requests(Filters(outcome="enforced"))] == ["enforced"]


def test_filters_parse_words_and_keys():
    assert Filters.parse("model-a error shadow") == Filters("model-a", "shadow", "error")
    assert Filters.parse("model:ok outcome:ok") == Filters(model="ok", outcome="ok")
    assert Filters.parse("  ") == Filters()


def test_timeline_marks_where_the_paper_rule_stops(source):
    t = source.timeline("r01")
    assert [p.position for p in t.probes] == [64, 128, 192, 256]
    assert t.stop_index == 3 and t.stop_position == 256 and t.stop_answer == "42"
    assert source.timeline("nope") is None


def test_timeline_shows_trials_with_confidence_and_where_the_stop_came_from(engine, source):
    request = {**_record(20).request, "id": "sig", "mode": "enforce", "enforced": True,
               "decision_token": 150, "decision_answer": "12", "stop_source": "trial"}
    rows = [(64, "7", "periodic", 0.4, None), (100, "12", "trial", 0.93, 102),
            (128, "12", "statement", 0.97, 120), (150, "12", "trial", 0.9995, 151)]
    probes = [{"request_id": "sig", "choice_index": 0, "position": pos, "answer": a,
               "hesitant": False, "output_tokens": 3, "latency_ms": 1.0, "status": "ok",
               "certaindex": None if kind == "trial" else 0.5, "kind": kind, "confidence": c,
               "trigger_position": trig} for pos, a, kind, c, trig in rows]
    write_records(engine, [Record(request, probes)])
    t = source.timeline("sig")
    assert [(p.kind, p.confidence) for p in t.probes] == [(k, c) for _, _, k, c, _ in rows]
    assert t.stop_source == "trial" and t.stop_index is None  # the paper's rule takes no trial
    text = timeline_text(t).plain
    assert "    100    -   12  p 0.9300  trial at a transition word" in text
    assert "    128  0.50  12  p 0.9700  checks the answer stated at 120" in text
    assert "live policy decided at 150 (a trial): 12" in text


def test_broken_store_is_a_source_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SourceError, match="file is not a database"):
        StoreSource(make_engine(f"sqlite:///{bad}")).traffic()


def _store_policy(engine, version: int, toml: str = POLICY) -> None:
    with engine.begin() as conn:
        conn.execute(insert(PolicyRow), [{"kind": "cot", "model": "*", "version": version,
                                          "policy_toml": toml, "source": "test",
                                          "created_at": NOW}])


def test_savings_observed_from_the_decisions_and_projected_by_evaluate(source, engine):
    s = source.savings(1)
    assert s.recommended is s.active  # policy 1 is also the newest stored
    active = s.active
    assert active.policy.id == 1 and active.problem is None
    # shadowed r06, r08, r10: 306, 308, 310 tokens, each would stop at 256 having paid
    # 4 probes of 3 tokens (+8 prompt-side each); r10 would have answered 7, not 42
    # unhashed prompts: each request is a problem of its own, so the exact binomial bound
    assert active.shadow == Group(3, 3, (50 + 52 + 54 - 3 * 44) / 924,
                                  Damage(1, 3, clopper_pearson_upper(1, 3)))
    # enforced r04: 256 tokens and 44 of probes, against 308 per shadowed request
    assert active.enforced == Group(1, 1, pytest.approx(1 - 300 / 308), None)
    runs = load_runs(engine).runs  # what `dynasorctl calibrate --db` reads: all 11 finished
    with Grader() as grader:
        _, summary = evaluate_cot(runs, parse_policy_file(POLICY), grader)
    p = active.projected
    assert (p.runs, p.net_saved, p.damage.changed) == (11, summary.net_saved, summary.changed)
    assert p.damage.upper == clopper_pearson_upper(summary.changed, 11)


def test_answers_changed_are_bounded_per_problem_as_calibration_bounds_them():
    # Six requests of two prompts; the three of one prompt all changed: they fail together.
    problems, changed = ["a"] * 3 + ["b"] * 3, [True] * 3 + [False] * 3
    d = changed_damage(problems, changed)
    assert (d.changed, d.n, d.share) == (3, 6, 0.5)
    flags = np.array(changed)
    zeros = np.zeros(6, bool)
    assert d.upper == damage(problem_ranks(problems), flags, zeros, zeros, zeros).changed_upper
    assert d.upper > clopper_pearson_upper(3, 6)  # counting requests as independent is too tight
    assert changed_damage(["a", "b", "c"], [True, False, False]).upper == clopper_pearson_upper(1, 3)


def test_recommended_is_the_newest_stored_policy_and_unreplayable_ones_say_why(source, engine):
    _store_policy(engine, 2, POLICY.replace("interval = 64", "interval = 100"))
    s = source.savings(1)
    assert s.active.policy.id == 1 and s.recommended.policy.id == 2
    assert s.recommended.shadow is None and s.recommended.enforced is None  # never rolled out
    assert s.recommended.projected is None and "multiple of 64" in s.recommended.problem
    text = str(savings_text(s))
    assert "recommended: policy 2 (v2, model *)" in text and "multiple of 64" in text


# --- the app ----------------------------------------------------------------------------------


async def test_main_screen_shows_traffic_requests_and_rollout(source):
    app = _app(source)
    async with app.run_test() as pilot:
        await _settle(pilot)
        assert app.query_one("#requests").row_count == 12
        assert not app.query_one("#banner").has_class("shown")
        assert "paper's rule stops" in str(app.query_one("#timeline-text").render())
        assert app.timeline is not None and app.timeline.request.id == "r00"
        assert "enforce 10%" in str(app.query_one("#rollout-text").render())


async def test_filter_narrows_the_table(source):
    app = _app(source)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await pilot.press("slash", *"model-a")
        await _settle(pilot)
        assert app.query_one("#requests").row_count == 6
        await pilot.press(*" error")
        await _settle(pilot)
        assert app.query_one("#requests").row_count == 1


async def test_kill_with_reason_puts_scope_to_observe_and_audits(source, engine):
    app = _app(source)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await pilot.press("k")
        await pilot.pause()
        await pilot.press(*"bad answers", "enter")
        await _settle(pilot)
        assert "observe" in str(app.query_one("#rollout-text").render())
    state = rollout.load_state(engine).scopes["*"]
    assert (state.mode, state.percent) == ("observe", 0.0)
    changes = {e.field: e for e in rollout.history(engine, limit=2)}
    assert (changes["mode"].previous, changes["mode"].new) == ("enforce", "observe")
    assert {(e.reason, e.who) for e in changes.values()} == {("bad answers", rollout.current_user())}


async def test_cancelled_kill_changes_nothing(source, engine):
    before = rollout.history(engine)
    app = _app(source)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await pilot.press("k")
        await pilot.pause()
        await pilot.press(*"oops", "escape")
        await _settle(pilot)
    assert rollout.load_state(engine).scopes["*"].mode == "enforce"
    assert rollout.history(engine) == before


async def test_kill_without_reason_is_refused_with_an_error(source, engine):
    app = _app(source)
    errors = _errors(app)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await pilot.press("k", "enter")
        await _settle(pilot)
    assert errors and "reason is required" in errors[0]
    assert rollout.load_state(engine).scopes["*"].mode == "enforce"


async def test_promote_steps_the_ladder(source, engine):
    app = _app(source)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await pilot.press("p")
        await pilot.pause()
        await pilot.press(*"looks good", "enter")
        await _settle(pilot)
    assert rollout.load_state(engine).scopes["*"].percent == 25.0
    assert rollout.history(engine, limit=1)[0].reason == "looks good"


async def _answer(pilot, key: str, value: str | None, reason: str) -> None:
    """Open a change's dialog with `key`, replace the proposed value, give the reason, confirm."""
    await pilot.press(key)
    await pilot.pause()
    if value is not None:
        proposed = pilot.app.screen.query_one("#value").value
        await pilot.press(*["backspace"] * len(proposed), *value, "enter")
    await pilot.press(*reason, "enter")
    await _settle(pilot)


async def test_set_percent_enforces_that_share_with_an_audited_reason(source, engine):
    app = _app(source)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await _answer(pilot, "e", "30", "more traffic")
        assert "enforce 30%" in str(app.query_one("#rollout-text").render())
    state = rollout.load_state(engine).scopes["*"]
    assert (state.mode, state.percent, state.policy_id) == ("enforce", 30.0, 1)
    (change,) = rollout.history(engine, limit=1)
    assert (change.field, change.previous, change.new, change.reason) == (
        "percent", "10", "30", "more traffic")


@pytest.mark.parametrize(("typed", "says"), [("150", "percent must be from 0 to 100, not 150"),
                                             ("-1", "percent must be from 0 to 100, not -1"),
                                             ("lots", "must be a number from 0 to 100, not 'lots'")])
async def test_set_percent_outside_0_to_100_is_refused(source, engine, typed, says):
    before = rollout.history(engine)
    app = _app(source)
    errors = _errors(app)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await _answer(pilot, "e", typed, "try it")
    assert len(errors) == 1 and says in errors[0]
    assert rollout.load_state(engine).scopes["*"].percent == 10.0
    assert rollout.history(engine) == before


async def test_switch_policy_to_another_stored_version(source, engine):
    with engine.begin() as conn:
        conn.execute(insert(PolicyRow), [{"kind": "cot", "model": "*", "version": 2,
                                          "policy_toml": POLICY, "source": "test",
                                          "created_at": NOW}])
    app = _app(source)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await _answer(pilot, "s", "2", "recalibrated")
        assert "policy 2 (v2)" in str(app.query_one("#rollout-text").render())
    state = rollout.load_state(engine).scopes["*"]
    assert (state.mode, state.percent, state.policy_id) == ("enforce", 10.0, 2)
    (change,) = rollout.history(engine, limit=1)
    assert (change.field, change.previous, change.new, change.reason) == (
        "policy", "1", "2", "recalibrated")


async def test_switch_to_a_policy_that_does_not_exist_is_refused(source, engine):
    before = rollout.history(engine)
    app = _app(source)
    errors = _errors(app)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await _answer(pilot, "s", "99", "typo")
    assert len(errors) == 1 and "no policy 99 in the store" in errors[0]
    assert rollout.load_state(engine).scopes["*"].policy_id == 1
    assert rollout.history(engine) == before


async def test_broken_store_shows_banner_and_keeps_running(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    app = _app(StoreSource(make_engine(f"sqlite:///{bad}"), clock=lambda: NOW))
    errors = _errors(app)
    async with app.run_test() as pilot:
        await _settle(pilot)
        banner = app.query_one("#banner")
        assert banner.has_class("shown") and "file is not a database" in str(banner.render())
        await pilot.press("k", *"why", "enter")  # a change fails visibly, not fatally
        await _settle(pilot)
        assert errors and "file is not a database" in errors[0]
        await pilot.press("q")
    assert app.return_code == 0


async def test_proxy_health_and_unreachable_proxy(source):
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/health"
        return httpx.Response(200, json={"status": "ok", "rollout": {"source": "store"},
                                         "active_streams": 3})

    app = _app(source, proxy_url="http://proxy:8080/", transport=httpx.MockTransport(handler))
    async with app.run_test() as pilot:
        await _settle(pilot)
        assert "proxy ok" in str(app.query_one("#numbers").render())
        assert not app.query_one("#banner").has_class("shown")

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    app = _app(source, proxy_url="http://proxy:8080", transport=httpx.MockTransport(down))
    async with app.run_test() as pilot:
        await _settle(pilot)
        banner = app.query_one("#banner")
        assert banner.has_class("shown") and "proxy unreachable" in str(banner.render())
        assert app.query_one("#requests").row_count == 12  # the store still shows


def _settled_run(i: int) -> Record:
    """A probed run that wanders for two probes, then answers 42 until it ends at 2,000 tokens."""
    rid = f"c{i:03d}"
    request = {"id": rid, "created_at": NOW - timedelta(seconds=i + 1), "model": "m",
               "kind": "chat", "upstream": "u", "mode": "observe", "stream": True, "n": 1,
               "status_code": 200, "probed": True, "probe_count": 8, "probe_tokens": 24,
               "completion_tokens": 2000, "finish_reason": "stop", "final_answer": "42",
               "prompt_hash": f"{i:064d}"}
    answers = [str(i), str(i + 1000)] + ["42"] * 6
    probes = [{"request_id": rid, "choice_index": 0, "position": 64 * (k + 1), "answer": a,
               "hesitant": False, "output_tokens": 3, "latency_ms": 1.0, "status": "ok",
               "certaindex": None} for k, a in enumerate(answers)]
    return Record(request, probes)


LOOSE = CalibrationSettings(max_accuracy_drop=None, max_answer_change=5.0)  # 118 runs suffice


async def _until(pilot, condition, timeout_s: float = 60.0) -> None:
    """Let the app run until `condition()` holds (a bounded wait, not a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "the dashboard did not get there in time"
        await pilot.pause(0.05)


async def test_calibration_runs_in_a_worker_stores_and_shows_the_frontier(tmp_path):
    engine = open_store(f"sqlite:///{tmp_path}/calibrate.db")
    write_records(engine, [_settled_run(i) for i in range(160)])
    app = create_app(StoreSource(engine, clock=lambda: NOW), refresh_s=3600, calibration=LOOSE)
    errors = _errors(app)
    async with app.run_test() as pilot:
        await _settle(pilot)
        assert "no policy in the store yet" in str(app.query_one("#savings-text").render())
        await pilot.press("c")
        await _until(pilot, lambda: app.calibration is not None or errors)
        assert not errors
        result = app.calibration
        assert result.runs == 160 and result.frontier and result.recommended is not None
        assert result.stored is not None and result.stored.version == 1
        shown = str(app.query_one("#calibration-text").render())
        assert "frontier" in shown and f"stored as policy {result.stored.id} (v1)" in shown
        # the stored policy becomes the recommendation the savings panel replays
        await _until(pilot, lambda: app.savings is not None and app.savings.recommended is not None)
        assert app.savings.recommended.policy.id == result.stored.id
        assert app.savings.recommended.projected.net_saved > 0
    with engine.connect() as conn:
        note, active = conn.execute(select(PolicyRow.note, PolicyRow.active)).one()
    assert note == "calibrated from the dashboard" and active is False


async def test_ui_answers_keys_while_calibration_runs_then_its_error_is_notified(source):
    gate = threading.Event()
    calibrate = source.calibrate

    def held(settings, progress=None):
        progress("held by the test", 0, 1)
        assert gate.wait(60)
        return calibrate(settings, progress)

    source.calibrate = held
    app = _app(source)
    errors = _errors(app)
    async with app.run_test() as pilot:
        await _settle(pilot)
        await pilot.press("c")
        await _until(pilot, lambda: app.calibrating == "held by the test 0/1")
        await pilot.press("slash", *"model-a")  # the filter refreshes while calibration waits
        await _until(pilot, lambda: app.query_one("#requests").row_count == 6)
        assert "running: held by the test" in str(app.query_one("#calibration-text").render())
        assert app.calibrating is not None
        gate.set()
        await _until(pilot, lambda: app.calibrating is None)
    # the 12-request store is far too small for the default 0.5-point target
    assert len(errors) == 1 and "calibration needs at least" in errors[0]
    assert app.calibration is None


async def test_savings_panel_shows_the_active_and_the_recommended_policy(source, engine):
    _store_policy(engine, 2, POLICY.replace("window = 2", "window = 3"))
    app = _app(source)
    async with app.run_test() as pilot:
        await _settle(pilot)
        shown = str(app.query_one("#savings-text").render())
    assert "active: policy 1 (v1, model *)" in shown
    assert "recommended: policy 2 (v2, model *)" in shown
    assert "33.3% (≤86.5%)" in shown  # 1 of 3 shadowed answers changed
    assert shown.count("replayed") == 2


def test_main_screen_snapshot(source, snap_compare):
    async def settle(pilot) -> None:
        await _settle(pilot)

    assert snap_compare(_app(source), terminal_size=(150, 40), run_before=settle)


def test_calibration_screen_snapshot(tmp_path, snap_compare):
    engine = open_store(f"sqlite:///{tmp_path}/calibrate.db")
    write_records(engine, [_settled_run(i) for i in range(160)])
    app = create_app(StoreSource(engine, clock=lambda: NOW), refresh_s=3600, calibration=LOOSE)

    async def calibrate(pilot) -> None:
        await _settle(pilot)
        await pilot.press("c")
        await _until(pilot, lambda: app.calibration is not None)
        await _settle(pilot)

    assert snap_compare(app, terminal_size=(150, 40), run_before=calibrate)


def test_command_is_registered_with_its_options():
    app = typer.Typer()
    dashboard_command.register(app)
    app.command("noop")(lambda: None)  # two commands, so `dashboard` is a subcommand
    result = CliRunner().invoke(app, ["dashboard", "--help"])
    assert result.exit_code == 0
    assert "--db" in result.output and "--proxy" in result.output


def test_dashboard_bench_times_every_query_on_a_seeded_store(tmp_path):
    """The benchmark itself (figures are its output, not asserted): it runs, and reads data."""
    timings = dashboard_bench.run(tmp_path / "bench.db", n=500, repeats=1, calibrate=False,
                                  say=lambda line: None)
    by_query = {t.query: t for t in timings}
    assert by_query["requests, newest 100"].rows == 100
    assert by_query["timeline of one request"].rows == dashboard_bench.PROBES_PER_RUN
    # one request in five is probed: the finished ones, as `calibrate --db` reads them
    finished = load_runs(make_engine(f"sqlite:///{tmp_path}/bench.db")).runs
    assert 90 <= len(finished) <= 100
    assert by_query["savings: newest probed runs"].rows == len(finished)
    assert all(t.median_ms >= 0 for t in timings)
    with pytest.raises(FileExistsError):
        dashboard_bench.run(tmp_path / "bench.db", n=10, say=lambda line: None)


async def test_a_read_that_comes_back_while_the_dashboard_closes_is_dropped(source):
    """The dashboard closing while a timeline was still being read: the answer came back to a
    screen whose widgets were going (`NoMatches: '#timeline-text'`), and the worker's error
    ended the app with it. Under load the live test closed its dashboard just so."""
    release, returned = threading.Event(), threading.Event()
    original = source.timeline

    def slow(request_id):
        release.wait(30)
        try:
            return original(request_id)
        finally:
            returned.set()

    app = _app(source)
    close_all = app._close_all

    async def closing() -> None:  # the read comes back just as the widgets are gone
        await close_all()
        release.set()
        await asyncio.to_thread(returned.wait, 30)
        await asyncio.sleep(0.2)  # its answer reaches the UI loop

    app._close_all = closing  # type: ignore[method-assign]
    async with app.run_test() as pilot:
        await _settle(pilot)
        source.timeline = slow  # type: ignore[method-assign]
        app._load_timeline("r01")
        await pilot.pause()
    assert app.return_code in (0, None)  # leaving run_test closed it: no error re-raised either


def test_savings_replay_can_read_a_parquet_export_instead_of_the_store(engine, tmp_path):
    from sqlalchemy import delete

    from dynasorctl.export import export
    from proxy.store.models import RequestRow

    before = StoreSource(engine, clock=lambda: NOW).savings(1).active.projected
    export(engine, tmp_path / "export")
    with engine.begin() as conn:  # the live store pruned: the export still has the runs
        conn.execute(delete(RequestRow))
    from_parquet = StoreSource(engine, clock=lambda: NOW, parquet=tmp_path / "export")
    assert from_parquet.savings(1).active.projected == before and before.runs == 11
    assert StoreSource(engine, clock=lambda: NOW).savings(1).active.projected is None
    with pytest.raises(SourceError, match="holds no Parquet export"):
        StoreSource(engine, parquet=tmp_path / "none").savings(1)
