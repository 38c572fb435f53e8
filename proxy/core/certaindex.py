"""Certaindex: the pure measurements of how far a reasoning program has converged.

Everything here is plain functions over plain data (no I/O), shared by the proxy,
the calibration replay, the dashboard and the scheduler.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

# The paper's probe suffix (Fu et al., 2024, Dynasor): appended to the text so far.
DEFAULT_PROBE_SUFFIX = (
    "... Oh, I suddenly got the answer to the whole problem, "
    "**Final Answer**\n\n\\[ \\boxed{"
)

# Words whose presence in a probe's output marks it as hesitant (the reference
# implementation's list). Matched as whole words: "no" must not match "know".
HESITATION_WORDS: tuple[str, ...] = ("wait", "hold", "but", "okay", "no", "hmm")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _hesitation_pattern(words: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z])(?:{alternatives})(?![A-Za-z])", re.IGNORECASE)


_DEFAULT_HESITATION = _hesitation_pattern(HESITATION_WORDS)


def is_hesitant(text: str, words: Sequence[str] | None = None) -> bool:
    """True when `text` holds a hesitation word as a whole word (case-insensitive)."""
    pattern = _DEFAULT_HESITATION if words is None else _hesitation_pattern(words)
    return pattern.search(text) is not None


def close_brace(text: str) -> tuple[str, bool]:
    """Read `text` as what follows an opening brace; return its balanced content.

    Returns (content, closed): `closed` is False when the braces never balanced,
    in which case `content` is all of `text`.
    """
    depth = 1
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[:i], True
    return text, False


def probe_answer(output: str) -> str | None:
    """The answer in a probe's output (decoded after `\\boxed{`), or None if empty."""
    content, _ = close_brace(output)
    content = content.strip()
    return content or None


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, braces balanced, or None."""
    last: str | None = None
    for match in _BOXED.finditer(text):
        content, closed = close_brace(text[match.end():])
        if closed and content.strip():
            last = content.strip()
    return last


_SPACES = re.compile(r"\s+")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(answer: str | None) -> str | None:
    """A cheap canonical form for comparing answers as strings.

    Exact-looking differences (spacing, `\\dfrac` vs `\\frac`, `\\left(`, a
    trailing period, `^\\circ`, a `\\text{}` wrapper) are folded; anything deeper
    needs the math-aware checker in `proxy.pipeline.equivalence`.
    """
    if answer is None:
        return None
    s = answer.strip()
    s = _TEXT_WRAP.sub(r"\1", s)
    for old, new in (
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", ""),
        ("$", ""),
    ):
        s = s.replace(old, new)
    s = _SPACES.sub("", s).rstrip(".")
    return s or None


def entropy(counts: Iterable[int]) -> float:
    """Shannon entropy (nats) of a distribution given by counts."""
    values = [c for c in counts if c > 0]
    total = sum(values)
    if total == 0:
        return 0.0
    return -sum(c / total * math.log(c / total) for c in values)


def entropy_certaindex(group_sizes: Sequence[int]) -> float:
    """Self-consistency certaindex: 1 - H(answers) / log(n), in [0, 1].

    `group_sizes` are the sizes of the groups of equivalent answers among the
    n samples so far (a sample with no answer is a group of its own). With
    fewer than two samples there is no evidence of agreement: 0.
    """
    n = sum(group_sizes)
    if n < 2:
        return 0.0
    return max(0.0, 1.0 - entropy(group_sizes) / math.log(n))


def group_by_normalized(answers: Sequence[str | None]) -> list[int]:
    """Group index of each answer by normalized string; None answers stand alone."""
    index: dict[str, int] = {}
    groups: list[int] = []
    next_group = 0
    for answer in answers:
        key = normalize_answer(answer)
        if key is None:
            groups.append(next_group)
            next_group += 1
            continue
        if key not in index:
            index[key] = next_group
            next_group += 1
        groups.append(index[key])
    return groups


def group_sizes(groups: Sequence[int]) -> list[int]:
    """Sizes of the groups named by each sample's group index."""
    return list(Counter(groups).values())


def majority(answers: Sequence[str | None], groups: Sequence[int]) -> str | None:
    """The answer of the largest group (ties: the group seen first); None if none."""
    counts = Counter(g for a, g in zip(answers, groups) if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    for answer, group in zip(answers, groups):
        if answer is not None and counts[group] == best:
            return answer
    return None


def probe_certaindex(answers: Sequence[str | None], hesitant: Sequence[bool], window: int = 3) -> float:
    """Chain-of-thought certaindex after a probe: the paper's agreement C_k in [0, 1].

    The share of the last `window` non-hesitant probes that give their most
    common answer; fewer probes than `window` count as disagreement.
    """
    recent = [normalize_answer(a) for a, h in zip(answers, hesitant) if not h][-window:]
    counts = Counter(a for a in recent if a is not None)
    if not counts:
        return 0.0
    return counts.most_common(1)[0][1] / window


# How a multi-step program's reward scores become its certaindex (the paper's reward
# certaindex): MCTS by the mean reward of its terminal rollouts, rebase by the best candidate.
REWARD_AGGREGATES: dict[str, str] = {"mcts": "mean", "rebase": "max"}


def reward_certaindex(rewards: Sequence[float], aggregate: str = "mean") -> float:
    """Reward certaindex in [0, 1]: the mean or the max of reward scores (clipped to [0, 1]).

    With no reward yet there is no evidence: 0.
    """
    if aggregate not in ("mean", "max"):
        raise ValueError(f"unknown reward aggregate {aggregate!r}: mean or max")
    scores = [min(1.0, max(0.0, float(r))) for r in rewards]
    if not scores:
        return 0.0
    return max(scores) if aggregate == "max" else sum(scores) / len(scores)
