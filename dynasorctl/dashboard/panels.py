"""What each panel of the dashboard says: plain functions from the source's dataclasses to text.

Kept apart from the app so that what is shown can be read (and tested) without a terminal.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text

from dynasorctl.dashboard.calibrate import CalibrationResult
from dynasorctl.dashboard.savings import Damage, PolicySavings, Savings
from dynasorctl.dashboard.source import Rollout, Timeline, Traffic

BLOCKS = " ▁▂▃▄▅▆▇█"


def traffic_text(t: Traffic | None, proxy: dict[str, Any] | None) -> Text:
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


def histogram_text(bins: list[int] | None) -> Text:
    if not bins:
        return Text("certaindex: no probes", style="dim")
    top = max(bins) or 1
    bars = "".join(BLOCKS[round(b / top * (len(BLOCKS) - 1))] if b else BLOCKS[0] for b in bins)
    return Text.assemble("certaindex 0 ", (bars, "bold cyan"), f" 1  ({sum(bins)} probes)")


def timeline_text(t: Timeline | None) -> Text:
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
        if p.confidence is not None:
            out.append(f"  p {p.confidence:.4f}", style="cyan")
        if p.kind == "trial":
            out.append("  trial at a transition word", style="magenta")
        elif p.kind == "statement" and p.trigger_position is not None:
            out.append(f"  checks the answer stated at {p.trigger_position:,}", style="magenta")
        if p.hesitant:
            out.append(" (hesitant)", style="dim")
        if i == t.stop_index:
            out.append(f"  ◀ paper's rule stops: {t.stop_reason}", style="bold yellow")
        out.append("\n")
    if t.stop_index is None and t.probes:
        out.append("paper's rule: never stops\n", style="dim")
    if t.decision_token is not None:
        source = {"probe": " (a probe)", "trial": " (a trial)",
                  "text": " (the end of thinking: the answer written)"}.get(t.stop_source or "", "")
        out.append(f"live policy decided at {t.decision_token:,}{source}: "
                   f"{t.decision_answer or '-'}\n", style="yellow")
    out.append(f"final answer: {r.final_answer or '-'}", style="bold green")
    if t.stop_answer is not None and t.stop_answer != r.final_answer:
        out.append(f"  (stop answer differs: {t.stop_answer})", style="bold red")
    return out


def rollout_text(r: Rollout | None) -> Text:
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


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _damage(d: Damage | None) -> str:
    return "not observable" if d is None else f"{d.share:.1%} (≤{d.upper:.1%})"


def _row(label: str, n: int, stopped: float, net: str, damage: str) -> str:
    return f"  {label:<10}{n:>8,}{stopped:>9.0%}{net:>11}  {damage}\n"


def _policy_savings(out: Text, title: str, s: PolicySavings) -> None:
    p = s.policy
    out.append(f"{title}: policy {p.id} (v{p.version}, model {p.model})\n", style="bold")
    if s.shadow is None and s.enforced is None:
        out.append("  observed: no shadowed or enforced request yet\n", style="dim")
    if (g := s.shadow) is not None:
        out.append(_row("shadow", g.requests, g.stopped / g.requests, _share(g.net_saved),
                        _damage(g.damage)))
    if (g := s.enforced) is not None:
        net = "-" if g.net_saved is None else f"{g.net_saved:.1%}*"
        out.append(_row("enforced", g.requests, g.stopped / g.requests, net, _damage(g.damage)))
    if (pr := s.projected) is not None:
        out.append(_row("replayed", pr.runs, pr.stopped, _share(pr.net_saved),
                        _damage(pr.damage)), style="cyan")
    else:
        out.append(f"  replayed: {s.problem}\n", style="dim")


def savings_text(s: Savings | None, problem: str | None = None) -> Text:
    """Net saved and answers changed (share, 95% upper bound), observed and replayed."""
    out = Text("savings     requests  stopped  net saved  answers changed\n", style="bold")
    if problem is not None:
        return out.append(problem, style="red")
    if s is None:
        return out.append("computing…", style="dim")
    if s.active is None and s.recommended is None:
        return out.append("no policy in the store yet: calibrate (c) to get one", style="dim")
    if s.active is not None:
        _policy_savings(out, "active", s.active)
    else:
        out.append("active: no policy rolled out\n", style="dim")
    if s.recommended is not None and s.recommended is s.active:
        out.append("recommended: the active policy (the newest stored)\n", style="dim")
    elif s.recommended is not None:
        _policy_savings(out, "recommended", s.recommended)
    if any(x is not None and x.enforced is not None for x in (s.active, s.recommended)):
        out.append("* against the tokens of its shadowed requests\n", style="dim")
    return out


def calibration_text(c: CalibrationResult | None, status: str | None) -> Text:
    """The frontier of the last calibration run from the dashboard, or how the run goes."""
    out = Text("calibration ", style="bold")
    if status is not None:
        return out.append(status, style="yellow")
    if c is None:
        return out.append("(c) on the store's newest probed requests", style="dim")
    out.append(f"{c.runs:,} runs ({c.holdout:,} held out), target {c.target}\n")
    out.append(f"  {'frontier':<22}{'net saved':>10}{'changed':>9}{'bound':>8}  certified\n",
               style="bold")
    for f in c.frontier:
        out.append(f"  {f.name[:22]:<22}{f.net_saved:>10.1%}{f.changed:>9.2%}{f.bound:>8.2%}  "
                   f"{'yes' if f.certified else 'no' if f.tested else '-'}\n",
                   style="bold green" if f.name == c.recommended else "")
    if c.recommended is None:
        out.append(c.message or "no policy certified", style="red")
    elif c.stored is not None:
        out.append(f"recommended {c.recommended}: stored as policy {c.stored.id} "
                   f"(v{c.stored.version}), inactive; s switches to it", style="green")
    return out
