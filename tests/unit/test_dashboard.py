"""The dashboard: its store source, and the app driven with a pilot on a temp store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
import typer
from sqlalchemy import insert, update
from typer.testing import CliRunner

from dynasorctl.commands import dashboard as dashboard_command
from dynasorctl.dashboard.app import DashboardApp, create_app
from dynasorctl.dashboard.source import Filters, SourceError, StoreSource
from proxy import rollout
from proxy.recorder import Record, write_records
from proxy.store.db import make_engine, open_store
from proxy.store.models import PolicyRow, RolloutAuditRow, RolloutScopeRow

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLICY = 'version = 1\nkind = "cot"\nmodel = "*"\n\n[cot]\ninterval = 64\nwindow = 2\n'


def _record(i: int) -> Record:
    """Request i, 10 s older than i - 1: models a/b alternate, r03 failed, r04 was enforced."""
    rid = f"r{i:02d}"
    request = {"id": rid, "created_at": NOW - timedelta(seconds=10 * i + 5),
               "model": "model-a" if i % 2 else "model-b", "kind": "chat", "upstream": "u",
               "mode": "enforce" if i == 4 else "observe", "stream": True, "n": 1,
               "status_code": 500 if i == 3 else 200, "error": "upstream 500" if i == 3 else None,
               "probed": True, "probe_count": 4, "probe_tokens": 12, "completion_tokens": 300 + i,
               "final_answer": "42", "enforced": i == 4}
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
    assert t.completion_tokens == sum(300 + i for i in range(6))
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


def test_broken_store_is_a_source_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SourceError, match="file is not a database"):
        StoreSource(make_engine(f"sqlite:///{bad}")).traffic()


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


def test_main_screen_snapshot(source, snap_compare):
    async def settle(pilot) -> None:
        await _settle(pilot)

    assert snap_compare(_app(source), terminal_size=(150, 40), run_before=settle)


def test_command_is_registered_with_its_options():
    app = typer.Typer()
    dashboard_command.register(app)
    app.command("noop")(lambda: None)  # two commands, so `dashboard` is a subcommand
    result = CliRunner().invoke(app, ["dashboard", "--help"])
    assert result.exit_code == 0
    assert "--db" in result.output and "--proxy" in result.output
