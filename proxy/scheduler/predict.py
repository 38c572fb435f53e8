"""What a program still needs: the scheduler's learned, approximate view of work. Pure.

Learned per program type as programs run: the tokens a request generates (a moving
average over finished requests, stopped ones at what they really generated), and how
many requests a program makes in all (a histogram over the last programs, so the
expected requests still to come can be read given how many it has made already).
Certaindex then shrinks what is still to come: a program that has converged is near
its end, whatever its type usually needs.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

HISTORY = 1000  # programs per type the request-count histogram remembers


@dataclass(slots=True)
class TypeModel:
    """What the finished programs of one type were like."""

    tokens_per_request: float | None = None
    requests: Counter[int] = field(default_factory=Counter)  # programs by requests made
    _recent: deque[int] = field(default_factory=deque)

    def requests_left(self, made: int) -> float | None:
        """E[R - made | R >= made] over the programs seen (0 if none made as many; None if none).

        A program that has made `made` requests is one of those that make at least that many.
        """
        if not self.requests:
            return None
        longer = [(r, c) for r, c in self.requests.items() if r >= made]
        count = sum(c for _, c in longer)
        return sum((r - made) * c for r, c in longer) / count if count else 0.0


class WorkModel:
    """Learned tokens per request and requests per program, per program type."""

    def __init__(self, prior_tokens: float = 512.0, weight: float = 0.05) -> None:
        self.prior_tokens = prior_tokens
        self.weight = weight  # of each new observation in the moving averages
        self.types: dict[str, TypeModel] = {}
        self.seconds_per_token: float | None = None  # one stream's pace on the engine now

    def _type(self, program_type: str) -> TypeModel:
        model = self.types.get(program_type)
        if model is None:
            model = self.types[program_type] = TypeModel()
        return model

    def tokens(self, program_type: str, max_tokens: int | None = None) -> float:
        """Expected tokens of one request of this type (capped by its own budget)."""
        learned = self._type(program_type).tokens_per_request
        guess = learned if learned is not None else (max_tokens or self.prior_tokens)
        return min(guess, max_tokens) if max_tokens else guess

    def requests_left(self, program_type: str, made: int, budget: int | None) -> float:
        """Requests a program that has made `made` is still expected to make."""
        learned = self._type(program_type).requests_left(made)
        if learned is None:  # nothing learned: its budget is all we know
            learned = float(max(0, budget - made)) if budget else 0.0
        return min(learned, budget - made) if budget else learned

    def learn_request(self, program_type: str, tokens: int) -> None:
        model = self._type(program_type)
        model.tokens_per_request = _average(model.tokens_per_request, tokens, self.weight)

    def learn_program(self, program_type: str, requests: int) -> None:
        model = self._type(program_type)
        model.requests[requests] += 1
        model._recent.append(requests)
        if len(model._recent) > HISTORY:
            old = model._recent.popleft()
            model.requests[old] -= 1
            if not model.requests[old]:
                del model.requests[old]

    def learn_pace(self, seconds_per_token: float) -> None:
        self.seconds_per_token = _average(self.seconds_per_token, seconds_per_token, self.weight)


def _average(current: float | None, sample: float, weight: float) -> float:
    return float(sample) if current is None else current + weight * (sample - current)
