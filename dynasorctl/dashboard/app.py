"""The dashboard app: live traffic, requests with their probe timelines, rollout control.

Built by `create_app` for both `dynasorctl dashboard` and the tests; everything it
reads comes from the `StoreSource` (and, optionally, the proxy's `/health`) handed in.
Reads run in thread workers every `refresh_s` seconds, so the UI never waits on the
store; a store or proxy that fails shows in a banner and the dashboard keeps running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Sparkline, Static

from dynasorctl.dashboard.calibrate import CalibrationResult, CalibrationSettings
from dynasorctl.dashboard.panels import (
    calibration_text,
    histogram_text,
    rollout_text,
    savings_text,
    timeline_text,
    traffic_text,
)
from dynasorctl.dashboard.savings import Savings
from dynasorctl.dashboard.screens import Ask, Confirmation, ConfirmScreen
from dynasorctl.dashboard.source import (
    Filters,
    RequestSummary,
    Rollout,
    SourceError,
    StoreSource,
    Timeline,
    Traffic,
)
from dynasorctl.errors import UserError
from proxy.control.rollout import NEEDS_POLICY, RolloutError, ScopeState

PROXY_TIMEOUT_S = 1.0


@dataclass
class Snapshot:
    """One refresh's reads; a part that failed is None and its reason is in `problems`."""

    traffic: Traffic | None = None
    certaindex: list[int] | None = None
    requests: list[RequestSummary] | None = None
    rollout: Rollout | None = None
    newest_policy: int | None = None  # the newest stored policy's id
    proxy: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


# They fit the request table in half of a 150-column terminal; the detail pane shows it all.
MODEL_WIDTH = 10
ANSWER_WIDTH = 8
COLUMNS = (("created (UTC)", 14), ("model", MODEL_WIDTH), ("mode", 7), ("outcome", 8), ("tokens", 6),
           ("probes", 6), ("answer", ANSWER_WIDTH))


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class DashboardApp(App[None]):
    CSS = """
    #banner { background: $error; color: $text; padding: 0 1; display: none; }
    #banner.shown { display: block; }
    #top { height: 5; }
    #traffic { width: 1fr; }
    #spark { width: 40; height: 3; margin: 0 1; }
    #main { height: 1fr; }
    #left { width: 1fr; }
    #right { width: 1fr; border-left: solid $primary; }
    #timeline { height: 1fr; padding: 0 1; }
    #savings { height: 1fr; padding: 0 1; border-top: solid $primary; }
    #requests { height: 1fr; }
    #calibration { height: auto; max-height: 16; padding: 0 1; border-top: solid $primary; }
    #rollout { height: 1fr; padding: 0 1; border-top: solid $primary; }
    ConfirmScreen { align: center middle; }
    #dialog { width: 64; height: auto; border: thick $error; background: $surface; padding: 1 2; }
    #buttons { height: auto; margin-top: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "promote", "Promote"),
        Binding("e", "set_percent", "Enforce %"),
        Binding("s", "switch_policy", "Policy"),
        Binding("k", "kill", "Kill"),
        Binding("c", "calibrate", "Calibrate"),
        Binding("r", "reload", "Refresh"),
        Binding("slash", "focus_filter", "Filter"),
        Binding("q", "quit", "Quit"),
    ]
    TITLE = "dynasor"

    def __init__(self, source: StoreSource, proxy_url: str | None = None, *,
                 transport: httpx.BaseTransport | None = None, refresh_s: float = 2.0,
                 savings_s: float = 60.0,
                 calibration: CalibrationSettings | None = None) -> None:
        super().__init__()
        self.source = source
        self.proxy_url = proxy_url.rstrip("/") if proxy_url else None
        self._transport = transport
        self.refresh_s = refresh_s
        self.filters = Filters()
        self.snapshot = Snapshot()
        self.timeline: Timeline | None = None
        self._shown_rows: list[RequestSummary] | None = None
        self.savings_s = savings_s
        self.savings: Savings | None = None
        self._savings_for: tuple[int | None, int | None] | None = None  # (active, newest) ids
        self.calibration_settings = calibration or CalibrationSettings()
        self.calibration: CalibrationResult | None = None
        self.calibrating: str | None = None  # what the running calibration is doing

    def compose(self) -> ComposeResult:
        yield Static(id="banner")
        with Horizontal(id="top"):
            with Vertical(id="traffic"):
                yield Static(id="numbers")
                yield Static(id="histogram")
            yield Sparkline([], id="spark")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield Input(placeholder="filter: model, mode (observe shadow enforce ...), "
                            "outcome (ok error enforced)", id="filter")
                yield DataTable(id="requests", cursor_type="row", zebra_stripes=True)
                with VerticalScroll(id="calibration"):
                    yield Static(calibration_text(None, None), id="calibration-text")
            with Vertical(id="right"):
                with VerticalScroll(id="timeline"):
                    yield Static(timeline_text(None), id="timeline-text")
                with VerticalScroll(id="savings"):
                    yield Static(savings_text(None), id="savings-text")
                with VerticalScroll(id="rollout"):
                    yield Static(rollout_text(None), id="rollout-text")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#requests", DataTable)
        # Fixed widths: sized from the content, the layout depended on when a render came.
        for col, width in COLUMNS:
            table.add_column(col, key=col, width=width)
        table.focus()
        self.action_refresh()
        self.set_interval(self.refresh_s, self.action_refresh)
        self.set_interval(self.savings_s, self._expire_savings)

    # --- reading ------------------------------------------------------------------------------

    def _to_ui(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """From a worker thread: run `callback` on the UI, unless the dashboard is closing.

        A read still under way when the dashboard closes comes back to widgets that are going
        or gone; its answer is dropped (it once ended the app with `NoMatches`).
        """
        def deliver() -> None:
            if self.is_running:
                callback(*args, **kwargs)

        try:
            self.call_from_thread(deliver)
        except RuntimeError:  # the app stopped running while the read was under way
            pass

    def action_refresh(self) -> None:
        self._refresh(self.filters)

    def action_reload(self) -> None:
        """Refresh now, savings included."""
        self._expire_savings()
        self.action_refresh()

    def _expire_savings(self) -> None:
        self._savings_for = None  # the next refresh recomputes them

    @work(thread=True, exclusive=True, group="refresh")
    def _refresh(self, filters: Filters) -> None:
        snap = Snapshot()
        try:
            snap.traffic = self.source.traffic()
            snap.certaindex = self.source.certaindex_histogram()
            snap.requests = self.source.requests(filters)
            snap.rollout = self.source.rollout()
            newest = self.source.newest_policy()
            snap.newest_policy = newest.id if newest is not None else None
        except SourceError as exc:
            snap.problems.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a dashboard must outlive any store surprise
            snap.problems.append(f"store error: {type(exc).__name__}: {exc}")
        if self.proxy_url is not None:
            snap.proxy = self._health(snap.problems)
        self._to_ui(self._show, snap, filters)

    def _health(self, problems: list[str]) -> dict[str, Any] | None:
        try:
            with httpx.Client(transport=self._transport, timeout=PROXY_TIMEOUT_S) as client:
                response = client.get(f"{self.proxy_url}/health")
                response.raise_for_status()
                body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            problems.append(f"proxy unreachable ({self.proxy_url}): {type(exc).__name__}")
            return None
        if not isinstance(body, dict):
            problems.append(f"proxy unreachable ({self.proxy_url}): /health is not a JSON object")
            return None
        return body

    def _show(self, snap: Snapshot, filters: Filters) -> None:
        self.snapshot = snap
        banner = self.query_one("#banner", Static)
        banner.update("\n".join(snap.problems))
        banner.set_class(bool(snap.problems), "shown")
        self.query_one("#numbers", Static).update(traffic_text(snap.traffic, snap.proxy))
        self.query_one("#histogram", Static).update(histogram_text(snap.certaindex))
        self.query_one("#spark", Sparkline).data = snap.traffic.buckets if snap.traffic else []
        self.query_one("#rollout-text", Static).update(rollout_text(snap.rollout))
        if snap.requests is not None and filters == self.filters:
            self._fill_table(snap.requests)
        if snap.rollout is not None:
            wanted = (snap.rollout.active_policy, snap.newest_policy)
            if wanted != self._savings_for:
                self._savings_for = wanted
                self._compute_savings(wanted[0])

    # --- savings and calibration --------------------------------------------------------------

    @work(thread=True, exclusive=True, group="savings")
    def _compute_savings(self, active_policy: int | None) -> None:
        try:
            found = self.source.savings(active_policy)
        except SourceError as exc:
            self._to_ui(self._show_savings, None, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a replay surprise must not end the dashboard
            self._to_ui(self._show_savings, None,
                                  f"savings failed: {type(exc).__name__}: {exc}")
            return
        self._to_ui(self._show_savings, found, None)

    def _show_savings(self, found: Savings | None, problem: str | None) -> None:
        self.savings = found
        self.query_one("#savings-text", Static).update(savings_text(found, problem))

    def action_calibrate(self) -> None:
        if self.calibrating is not None:
            self.notify("calibration is already running", title="calibrate")
            return
        self._calibration_status("starting: reading the newest probed requests")
        self._calibrate(self.calibration_settings)

    def _calibration_status(self, status: str | None) -> None:
        self.calibrating = status
        self.query_one("#calibration-text", Static).update(
            calibration_text(self.calibration, None if status is None else f"running: {status}"))

    @work(thread=True, exclusive=True, group="calibrate")
    def _calibrate(self, settings: CalibrationSettings) -> None:
        shown: list[str] = []

        def progress(what: str, done: int, total: int) -> None:
            line = f"{what} {done}/{total}"
            # A step at a time, not a message per candidate: the UI thread stays free.
            if not shown or shown[-1].split(" ")[0] != line.split(" ")[0] or done == total:
                shown.append(line)
                self._to_ui(self._calibration_status, line)

        try:
            result = self.source.calibrate(settings, progress)
        except (UserError, SourceError) as exc:
            self._to_ui(self._calibrated, None, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a calibration bug must not end the dashboard
            self._to_ui(self._calibrated, None, f"{type(exc).__name__}: {exc}")
            return
        self._to_ui(self._calibrated, result, None)

    def _calibrated(self, result: CalibrationResult | None, error: str | None) -> None:
        if error is not None:
            self.notify(error, title="calibration failed", severity="error")
        else:
            self.calibration = result
            self._expire_savings()  # a stored policy is the new recommendation
            self.action_refresh()
        self._calibration_status(None)

    def _fill_table(self, rows: list[RequestSummary]) -> None:
        if rows == self._shown_rows:
            return
        table = self.query_one("#requests", DataTable)
        keep = self._cursor_id()
        table.clear()
        for r in rows:
            tokens = "-" if r.completion_tokens is None else f"{r.completion_tokens:,}"
            table.add_row(f"{r.created_at:%m-%d %H:%M:%S}", _fit(r.model or "-", MODEL_WIDTH), r.mode,
                          r.outcome, tokens, str(r.probe_count), _fit(r.final_answer or "-", ANSWER_WIDTH), key=r.id)
        self._shown_rows = rows
        ids = [r.id for r in rows]
        if keep in ids:
            table.move_cursor(row=ids.index(keep))

    def _cursor_id(self) -> str | None:
        table = self.query_one("#requests", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filters = Filters.parse(event.value)
        self.action_refresh()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.query_one("#requests", DataTable).focus()

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    @on(DataTable.RowHighlighted, "#requests")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self._load_timeline(event.row_key.value)

    @work(thread=True, exclusive=True, group="timeline")
    def _load_timeline(self, request_id: str) -> None:
        try:
            timeline = self.source.timeline(request_id)
        except SourceError as exc:
            self._to_ui(self.notify, str(exc), severity="error")
            return
        self._to_ui(self._show_timeline, timeline)

    def _show_timeline(self, timeline: Timeline | None) -> None:
        self.timeline = timeline
        self.query_one("#timeline-text", Static).update(timeline_text(timeline))

    # --- changing the rollout -----------------------------------------------------------------

    def _default_scope(self) -> str:
        r = self.snapshot.rollout
        live = [s.scope for s in r.scopes if s.mode in NEEDS_POLICY] if r else []
        return live[0] if live else "*"

    def _current(self, scope: str) -> ScopeState | None:
        r = self.snapshot.rollout
        return next((s for s in r.scopes if s.scope == scope), None) if r else None

    def _ask(self, what: str, title: str, ask: Ask | None = None, scoped: bool = True) -> None:
        """Confirmation and a reason first; then the change, in a worker."""
        def done(answer: Confirmation | None) -> None:
            if answer is not None:
                self._change(what, answer)

        self.push_screen(ConfirmScreen(title, self._default_scope() if scoped else None, ask),
                         done)

    def action_promote(self) -> None:
        self._ask("promote", "Promote: the next step of the enforce ladder (1, 5, 10, 25, 50, 100%)")

    def action_set_percent(self) -> None:
        current = self._current(self._default_scope())
        shown = f"{current.percent:g}" if current is not None else ""
        self._ask("set percent", "Enforce at a percentage: the scope enforces this share of its "
                  "requests and shadows the rest", Ask("percentage enforced, 0-100", shown))

    def action_switch_policy(self) -> None:
        newest = self.savings.recommended if self.savings is not None else None
        self._ask("switch policy", "Switch policy: the scope's shadow and enforce decisions use "
                  "this stored policy from now on",
                  Ask('policy id, or "latest"', str(newest.policy.id) if newest else "latest"))

    def action_kill(self) -> None:
        self._ask("kill", "Kill: every shadowed or enforced scope back to observe", scoped=False)

    @work(thread=True, exclusive=True, group="change")
    def _change(self, what: str, answer: Confirmation) -> None:
        scope = answer.scope or "*"
        try:
            if what == "kill":
                changed = self.source.kill(answer.reason)
                message = f"killed: {', '.join(s.scope for s in changed) or 'nothing to change'}"
            else:
                if what == "promote":
                    s = self.source.promote(scope, answer.reason)
                elif what == "set percent":
                    s = self.source.set_percent(scope, parse_percent(answer.value or ""),
                                                answer.reason)
                else:
                    s = self.source.switch_policy(scope, answer.value or "", answer.reason)
                policy = "none" if s.policy_id is None else f"{s.policy_id} (v{s.policy_version})"
                message = f"scope {s.scope!r}: {s.mode} {s.percent:g}%, policy {policy}"
        except (RolloutError, SourceError) as exc:
            self._to_ui(self.notify, str(exc), title=f"{what} refused",
                                  severity="error")
            return
        self._to_ui(self.notify, message, title=what)
        self._to_ui(self.action_refresh)


def parse_percent(text: str) -> float:
    """The percentage typed in the dialog; RolloutError (as the rules say it) if it is none."""
    try:
        return float(text)
    except ValueError:
        raise RolloutError(f"percent must be a number from 0 to 100, not {text!r}") from None


def create_app(source: StoreSource, proxy_url: str | None = None, *,
               transport: httpx.BaseTransport | None = None, refresh_s: float = 2.0,
               savings_s: float = 60.0,
               calibration: CalibrationSettings | None = None) -> DashboardApp:
    """The dashboard over `source`; with `proxy_url`, its `/health` is read too."""
    return DashboardApp(source, proxy_url, transport=transport, refresh_s=refresh_s,
                        savings_s=savings_s, calibration=calibration)
