"""One benchmark program as it runs: which requests it makes, what it signals, when it ends.

Pure state machines over a `Template` (what the recording and the policy decided), driven
by whoever runs the requests (the simulator, or the real engine): they report a request's
tokens and its end; the program answers with `Actions`. The same code behaves the same
on both, so the simulator can be checked against the engine.

- Self-consistency, stopping: samples in waves of the policy's `min_samples` (the next
  wave once every answer of the last is read, as enforce does); answers read in start
  order; after the answer at which the policy stops, samples not read are aborted.
- Self-consistency, no stopping: all samples at once, each to its end.
- Chain of thought, stopping: a probe (a short request on the text so far) every
  `probe_every` tokens, one in flight; when a probe at or past the policy's stop position
  returns, the main request is aborted.
- Chain of thought, no stopping: the main request to its end, no probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynasorctl.bench.serve.workload import Program
from proxy.scheduler.base import Job, JobKind


@dataclass(frozen=True, slots=True)
class Request:
    """One engine request a program makes."""

    request_id: str
    program_id: str
    kind: JobKind
    tokens: int  # to generate (ignore_eos)
    prompt_tokens: int  # context before generating
    cached: int  # of which the prefix cache already holds (a probe's: all but the suffix)
    parent: str | None = None  # a probe: the request whose text it reads
    position: int = 0  # a probe: the parent's tokens it reads

    def job(self, now: float, program_type: str, budget: int | None) -> Job:
        # No max_tokens: a client's budget says nothing of the length it replays, and the
        # scheduler must not be told the answer.
        return Job(self.request_id, self.program_id, self.kind, now, None, self.prompt_tokens,
                   program_type, budget)


@dataclass(slots=True)
class Actions:
    submit: list[Request] = field(default_factory=list)
    abort: list[str] = field(default_factory=list)
    signal: float | None = None
    done: bool = False


class ProgramRun:
    def __init__(self, program: Program, stopping: bool) -> None:
        self.program = program
        self.template = program.template
        self.stopping = stopping
        self.done = False
        self.stopped = False  # ended by the policy
        self.live: set[str] = set()  # requests submitted and not ended

    @property
    def correct(self) -> bool:
        return self.template.correct_stopped if self.stopped else self.template.correct_full

    @property
    def budget(self) -> int:
        return len(self.template.lengths)

    def start(self) -> Actions:
        raise NotImplementedError

    def tokens(self, request_id: str, tokens: int) -> Actions:
        """A running request has generated `tokens` so far."""
        return Actions()

    def watch(self, request_id: str) -> int | None:
        """The token count at which this request's progress next matters (None: its end)."""
        return None

    def finished(self, request_id: str, tokens: int) -> Actions:
        """A request ended by itself (not aborted)."""
        raise NotImplementedError

    def _request(self, suffix: str, kind: JobKind, tokens: int, prompt: int, cached: int,
                 parent: str | None = None, position: int = 0) -> Request:
        request = Request(f"{self.program.program_id}/{suffix}", self.program.program_id, kind,
                          tokens, prompt, cached, parent, position)
        self.live.add(request.request_id)
        return request

    def _end(self, actions: Actions, stopped: bool) -> Actions:
        self.done = True
        self.stopped = stopped
        actions.done = True
        actions.abort = sorted(self.live)
        self.live.clear()
        return actions


class ScRun(ProgramRun):
    def __init__(self, program: Program, stopping: bool) -> None:
        super().__init__(program, stopping)
        self.started = 0
        self.ended: set[int] = set()
        self.read = 0

    def _sample(self, i: int) -> Request:
        prompt = self.template.prompt_tokens
        return self._request(f"s{i}", "sample", self.template.lengths[i], prompt,
                             prompt if i else 0)

    def _wave(self) -> Actions:
        size = self.template.wave if self.stopping else self.budget
        first, self.started = self.started, min(self.budget, self.started + size)
        return Actions(submit=[self._sample(i) for i in range(first, self.started)])

    def start(self) -> Actions:
        return self._wave()

    def finished(self, request_id: str, tokens: int) -> Actions:
        self.live.discard(request_id)
        self.ended.add(int(request_id.rsplit("/s", 1)[1]))
        actions = Actions()
        while self.read < self.started and self.read in self.ended:
            self.read += 1
            actions.signal = self.template.certaindex[self.read - 1]
            if self.stopping and self.read >= self.template.stop_after:
                return self._end(actions, stopped=self.read < self.budget)
        if self.read == self.budget:
            return self._end(actions, stopped=False)
        if self.stopping and self.read == self.started:
            actions.submit = self._wave().submit
        return actions


class CotRun(ProgramRun):
    def __init__(self, program: Program, stopping: bool) -> None:
        super().__init__(program, stopping)
        self.main = f"{program.program_id}/main"
        self.probe: str | None = None  # the probe in flight
        self.next_probe = 0  # index into the template's probe points
        self.generated = 0

    def start(self) -> Actions:
        t = self.template
        return Actions(submit=[self._request("main", "cot", t.lengths[0], t.prompt_tokens, 0)])

    def watch(self, request_id: str) -> int | None:
        if not self.stopping or request_id != self.main or self.probe is not None:
            return None
        points = self.template.probes
        return points[self.next_probe].position if self.next_probe < len(points) else None

    def tokens(self, request_id: str, tokens: int) -> Actions:
        if request_id == self.main:
            self.generated = tokens
        return Actions(submit=self._probe())

    def _probe(self) -> list[Request]:
        """Probe the latest point the main request has passed, if none is in flight."""
        points = self.template.probes
        if not self.stopping or self.probe is not None or self.done:
            return []
        due = self.next_probe
        while due + 1 < len(points) and points[due + 1].position <= self.generated:
            due += 1
        if due >= len(points) or points[due].position > self.generated:
            return []
        self.next_probe = due
        position = points[due].position
        context = self.template.prompt_tokens + position
        request = self._request(f"p{position}", "probe", self.template.probe_tokens,
                                context + self.template.probe_suffix, context, self.main, position)
        self.probe = request.request_id
        return [request]

    def finished(self, request_id: str, tokens: int) -> Actions:
        self.live.discard(request_id)
        if request_id == self.main:
            return self._end(Actions(), stopped=False)
        point = self.template.probes[self.next_probe]
        self.probe = None
        self.next_probe += 1
        actions = Actions(signal=point.certaindex)
        stop_at = self.template.stop_at
        if stop_at is not None and point.position >= stop_at:
            return self._end(actions, stopped=True)
        actions.submit = self._probe()
        return actions


def run_for(program: Program, stopping: bool) -> ProgramRun:
    return (ScRun if program.template.type == "sc" else CotRun)(program, stopping)
