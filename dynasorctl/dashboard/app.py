"""The dashboard app: live traffic, requests with their probe timelines, rollout control.

Built by `create_app` for both `dynasorctl dashboard` and the tests; everything it
reads comes from the `StoreSource` (and, optionally, the proxy's `/health`) handed in.
Reads run in thread workers every `refresh_s` seconds, so the UI never waits on the
store; a store or proxy that fails shows in a banner and the dashboard keeps running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Sparkline, Static

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
from proxy.rollout import NEEDS_POLICY, RolloutError, ScopeState

BLOCKS = " ▁▂▃▄▅▆▇█"
PROXY_TIMEOUT_S = 1.0


@dataclass
class Snapshot:
    """One refresh's reads; a part that failed is None and its reason is in `problems`."""

    traffic: Traffic | None = None
    certaindex: list[int] | None = None
    requests: list[RequestSummary] | None = None
    rollout: Rollout | None = None
    proxy: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


def _traffic_text(t: Traffic | None, proxy: dict[str, Any] | None) -> Text:
    text = Text()
    if t is None:
        text.append("traffic: unavailable", style="dim")
    else:
        minutes = t.window_s / 60
        text.append(f"last {minutes:g} min  ", style="bold")
        text.append(f"{t.requests_per_s:.2f} req/s  {t.tokens_per_s:,.0f} tok/s  "
                    f"probe tokens {t.probe_share:.1%}  ")
        text.append(f"errors {t.errors}", style="bold red" if t.errors else "")
    if proxy is not None:
        rollout = proxy.get("rollout") or {}
        text.append(f"\nproxy {proxy.get('status', '?')}  rollout from {rollout.get('source', '?')}"
                    f"  active streams {proxy.get('active_streams', '?')}")
    return text


def _histogram_text(bins: list[int] | None) -> Text:
    if not bins:
        return Text("certaindex: no probes", style="dim")
    top = max(bins) or 1
    bars = "".join(BLOCKS[round(b / top * (len(BLOCKS) - 1))] if b else BLOCKS[0] for b in bins)
    return Text.assemble("certaindex 0 ", (bars, "bold cyan"), f" 1  ({sum(bins)} probes)")


def _timeline_text(t: Timeline | None) -> Text:
    if t is None:
        return Text("select a request to see its probes", style="dim")
    r = t.request
    tokens = "-" if r.completion_tokens is None else f"{r.completion_tokens:,}"
    out = Text.assemble((f"{r.id}\n", "bold"), f"{r.model or '-'}  {r.mode}  {r.outcome}  "
                        f"{tokens} tokens\n\n")
    if not t.probes:
        out.append("no probes recorded\n", style="dim")
    for i, p in enumerate(t.probes):
        ci = "  -  " if p.certaindex is None else f"{p.certaindex:.2f} "
        out.append(f"{p.position:>7,}  {ci} {(p.answer or '-')[:24]}")
        if p.hesitant:
            out.append(" (hesitant)", style="dim")
        if i == t.stop_index:
            out.append(f"  ◀ paper's rule stops: {t.stop_reason}", style="bold yellow")
        out.append("\n")
    if t.stop_index is None and t.probes:
        out.append("paper's rule: never stops\n", style="dim")
    if t.decision_token is not None:
        out.append(f"live policy decided at {t.decision_token:,}: {t.decision_answer or '-'}\n",
                   style="yellow")
    out.append(f"final answer: {r.final_answer or '-'}", style="bold green")
    if t.stop_answer is not None and t.stop_answer != r.final_answer:
        out.append(f"  (stop answer differs: {t.stop_answer})", style="bold red")
    return out


def _rollout_text(r: Rollout | None) -> Text:
    if r is None:
        return Text("rollout: unavailable", style="dim")
    out = Text("rollout\n", style="bold")
    if not r.scopes:
        out.append("no scopes: proxies follow their own flags\n", style="dim")
    for s in r.scopes:
        mode = f"enforce {s.percent:g}%" if s.mode == "enforce" else s.mode
        policy = "none" if s.policy_id is None else f"{s.policy_id} (v{s.policy_version})"
        out.append(f"{s.scope:<16} {mode:<13} policy {policy}\n",
                   style="bold red" if s.mode == "enforce" else "")
    if r.history:
        out.append("\nlast changes\n", style="bold")
    for e in r.history:
        out.append(f"{e.at:%m-%d %H:%M} {e.who} {e.scope} {e.field}: {e.previous or '(new)'}→"
                   f"{e.new or 'none'}  {e.reason}\n")
    return out


class DashboardApp(App[None]):
    CSS = """
    #banner { background: $error; color: $text; padding: 0 1; display: none; }
    #banner.shown { display: block; }
    #top { height: 5; }
    #traffic { width: 1fr; }
    #spark { width: 40; height: 3; margin: 0 1; }
    #main { height: 1fr; }
    #left { width: 3fr; }
    #right { width: 2fr; border-left: solid $primary; }
    #timeline { height: 2fr; padding: 0 1; }
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
        Binding("r", "refresh", "Refresh"),
        Binding("slash", "focus_filter", "Filter"),
        Binding("q", "quit", "Quit"),
    ]
    TITLE = "dynasor"

    def __init__(self, source: StoreSource, proxy_url: str | None = None, *,
                 transport: httpx.BaseTransport | None = None, refresh_s: float = 2.0) -> None:
        super().__init__()
        self.source = source
        self.proxy_url = proxy_url.rstrip("/") if proxy_url else None
        self._transport = transport
        self.refresh_s = refresh_s
        self.filters = Filters()
        self.snapshot = Snapshot()
        self.timeline: Timeline | None = None
        self._shown_rows: list[RequestSummary] | None = None

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
            with Vertical(id="right"):
                with VerticalScroll(id="timeline"):
                    yield Static(_timeline_text(None), id="timeline-text")
                with VerticalScroll(id="rollout"):
                    yield Static(_rollout_text(None), id="rollout-text")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#requests", DataTable)
        for col in ("created (UTC)", "model", "mode", "outcome", "tokens", "probes", "answer"):
            table.add_column(col, key=col)
        table.focus()
        self.action_refresh()
        self.set_interval(self.refresh_s, self.action_refresh)

    # --- reading ------------------------------------------------------------------------------

    def action_refresh(self) -> None:
        self._refresh(self.filters)

    @work(thread=True, exclusive=True, group="refresh")
    def _refresh(self, filters: Filters) -> None:
        snap = Snapshot()
        try:
            snap.traffic = self.source.traffic()
            snap.certaindex = self.source.certaindex_histogram()
            snap.requests = self.source.requests(filters)
            snap.rollout = self.source.rollout()
        except SourceError as exc:
            snap.problems.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a dashboard must outlive any store surprise
            snap.problems.append(f"store error: {type(exc).__name__}: {exc}")
        if self.proxy_url is not None:
            snap.proxy = self._health(snap.problems)
        self.call_from_thread(self._show, snap, filters)

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
        self.query_one("#numbers", Static).update(_traffic_text(snap.traffic, snap.proxy))
        self.query_one("#histogram", Static).update(_histogram_text(snap.certaindex))
        self.query_one("#spark", Sparkline).data = snap.traffic.buckets if snap.traffic else []
        self.query_one("#rollout-text", Static).update(_rollout_text(snap.rollout))
        if snap.requests is not None and filters == self.filters:
            self._fill_table(snap.requests)

    def _fill_table(self, rows: list[RequestSummary]) -> None:
        if rows == self._shown_rows:
            return
        table = self.query_one("#requests", DataTable)
        keep = self._cursor_id()
        table.clear()
        for r in rows:
            tokens = "-" if r.completion_tokens is None else f"{r.completion_tokens:,}"
            table.add_row(f"{r.created_at:%m-%d %H:%M:%S}", r.model or "-", r.mode, r.outcome,
                          tokens, str(r.probe_count), (r.final_answer or "-")[:20], key=r.id)
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
            self.call_from_thread(self.notify, str(exc), severity="error")
            return
        self.call_from_thread(self._show_timeline, timeline)

    def _show_timeline(self, timeline: Timeline | None) -> None:
        self.timeline = timeline
        self.query_one("#timeline-text", Static).update(_timeline_text(timeline))

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
        self._ask("switch policy", "Switch policy: the scope's shadow and enforce decisions use "
                  "this stored policy from now on", Ask('policy id, or "latest"', "latest"))

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
            self.call_from_thread(self.notify, str(exc), title=f"{what} refused",
                                  severity="error")
            return
        self.call_from_thread(self.notify, message, title=what)
        self.call_from_thread(self.action_refresh)


def parse_percent(text: str) -> float:
    """The percentage typed in the dialog; RolloutError (as the rules say it) if it is none."""
    try:
        return float(text)
    except ValueError:
        raise RolloutError(f"percent must be a number from 0 to 100, not {text!r}") from None


def create_app(source: StoreSource, proxy_url: str | None = None, *,
               transport: httpx.BaseTransport | None = None,
               refresh_s: float = 2.0) -> DashboardApp:
    """The dashboard over `source`; with `proxy_url`, its `/health` is read too."""
    return DashboardApp(source, proxy_url, transport=transport, refresh_s=refresh_s)
