"""Every trigger live, through the proxy against a scripted upstream, equals the replay.

One generation with answer statements, transition words and `</think>`; probes and
trials answered from tables (with logprobs). For each policy the live decision
(shadow and enforce, streamed and not) is the replay's: `first_stop` over the
observations `dynasorctl.calibration.signals` builds from the same recordings.
"""

from __future__ import annotations

import json
import math

import pytest

from dynasorctl.calibration.observed import ObservedRun
from dynasorctl.calibration.policyfile import dump_policy_file
from dynasorctl.calibration.signals import observations
from proxy.core.certaindex import DEFAULT_PROBE_SUFFIX
from proxy.core.policy import (
    TRIAL_SETTINGS,
    CotPolicy,
    PolicyFile,
    ProbeObservation,
    StatementObservation,
    first_stop,
    taken,
)
from proxy.core.text import think_end, token_position, transition_words
from tests.fakes import SSE, Call, FakeResponse, chat_stream, sse
from tests.unit.test_proxy import chat_body, make

INDUCER = TRIAL_SETTINGS.suffix or ""


def _pieces() -> list[str]:
    """A generation with statements, "Wait"s, `</think>` and a summary, cut as the replay
    server cuts a recorded text: proportionally, so token positions are the replay's."""
    out = ["<think>", "\n"] + ["step "] * 40 + ["Wait", ", "] + ["more "] * 50
    out += ["so ", "the ", "answer ", "is ", "12", ".", " "] + ["check "] * 40
    out += ["Wait", ", "] + ["again "] * 40 + ["\\boxed{", "7", "}", " "] + ["sure "] * 40
    out += ["wait", " "] + ["fine "] * 30 + ["\n</think>", "\n\n"] + ["The ", "answer ", "is ",
                                                                   "\\boxed{7}", "."] * 8
    text = "".join(out)
    return [text[len(text) * i // len(out): len(text) * (i + 1) // len(out)] for i in range(len(out))]


PIECES = _pieces()
TEXT = "".join(PIECES)
TOKENS = len(PIECES)
ENDS = [len("".join(PIECES[: i + 1])) for i in range(TOKENS)]
THINK_AT = TEXT.index("</think>")
INTERVAL = 16
THINK_END = token_position(think_end(TEXT)[0], len(TEXT), TOKENS)


def _probe_answer(position: int) -> tuple[str, float]:
    if position < 90:
        return "3", 0.6
    return ("12", 0.97) if position < 190 else ("7", 0.98)


# Trials at each "Wait" of the thinking: (answer, confidence).
WORDS = transition_words(TEXT[:THINK_AT], ["wait"])
TRIALS = dict(zip(WORDS, [("3", 0.5), ("7", 0.95), ("7", 0.9999)]))


def _tokens(answer: str, confidence: float, open_brace: bool) -> list[tuple[str, float]]:
    body = [(ch, math.log(confidence)) for ch in answer] + [("}", math.log(confidence))]
    return ([] if open_brace else [("{", 0.0)]) + body


def _reply(pieces: list[tuple[str, float]]) -> FakeResponse:
    events = [{"choices": [{"index": 0, "delta": {"content": t},
                            "logprobs": {"content": [{"token": t, "logprob": lp}]},
                            "finish_reason": None}]} for t, lp in pieces]
    return FakeResponse(headers=list(SSE), parts=sse(events))


def scripted(delay_s: float = 0.004, pieces: list[str] = PIECES, answer_at=None):
    """The upstream: `pieces` streamed, probes answered by `answer_at(position)`, trials by TRIALS."""
    main = FakeResponse(200, list(SSE), chat_stream(pieces), delay_s=delay_s)
    ends = [len("".join(pieces[: i + 1])) for i in range(len(pieces))]
    answer_at = answer_at or _probe_answer

    def handler(call: Call):
        body = call.json()
        if body.get("continue_final_message"):
            said = body["messages"][-1]["content"]
            if said.endswith(INDUCER):  # a trial: answered by where its word is
                answer, confidence = TRIALS[len(said) - len(INDUCER)]
                return _reply(_tokens(answer, confidence, open_brace=False))
            prefix = said[: -len(DEFAULT_PROBE_SUFFIX)]
            answer, confidence = answer_at(ends.index(len(prefix)) + 1)
            return _reply(_tokens(answer, confidence, open_brace=True))
        if body.get("max_tokens") == 1 and body.get("stream") is False:
            usage = {"prompt_tokens": 17, "completion_tokens": 1, "total_tokens": 18}
            return FakeResponse(200, parts=[json.dumps({"choices": [], "usage": usage}).encode()])
        return main

    return main, handler


def recorded_run() -> ObservedRun:
    """The recordings as a trace file would hold them: probes every INTERVAL, trials at words."""
    probes = tuple(ProbeObservation(p, *_probe_answer(p)[:1], False, 2,
                                    confidence=_probe_answer(p)[1])
                   for p in range(INTERVAL, TOKENS, INTERVAL)
                   if p < THINK_END)  # none once `</think>` is written
    trials = tuple(ProbeObservation(token_position(at, len(TEXT), TOKENS), a, False, len(a) + 2,
                                    confidence=c, trial=True) for at, (a, c) in TRIALS.items())
    return ObservedRun("r", "g", "m", probes, "7", TOKENS, text=TEXT, trials=trials)


POLICIES = {
    "periodic": CotPolicy(interval=INTERVAL, window=3),
    "statement": CotPolicy(periodic=False, statement={"align": INTERVAL}),
    "statement gated, then the end of thinking": CotPolicy(
        periodic=False, think_end=True, statement={"align": INTERVAL, "min_confidence": 0.99}),
    "trial confidence": CotPolicy(periodic=False, transition={"min_confidence": 0.99}),
    "agreeing trials": CotPolicy(periodic=False, transition={"agree": 2, "agree_confidence": 0.9}),
    "a trial before the window fills": CotPolicy(interval=INTERVAL, window=3,
                                                 transition={"min_confidence": 0.4}),
    "end of thinking": CotPolicy(periodic=False, think_end=True),
    "never": CotPolicy(periodic=False, transition={"min_confidence": 0.99999}),
    "everything": CotPolicy(interval=INTERVAL, window=8, statement={"align": INTERVAL},
                            transition={"min_confidence": 0.9}, think_end=True),
}


def _policy_file(tmp_path, policy: CotPolicy) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(dump_policy_file(PolicyFile(version=2, kind="cot", cot=policy)))
    return str(path)


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("how", ["shadow", "enforce", "enforce whole"])
async def test_live_decision_is_the_replayed_one(tmp_path, name, how):
    policy = POLICIES[name]
    seq = observations(recorded_run())
    index, decision = first_stop(policy, seq)
    main, handler = scripted()
    mode = how.split()[0]
    app, upstream, sink, client = make(handler, mode=mode, policy_file=_policy_file(tmp_path, policy),
                                       probe_interval=INTERVAL)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=how != "enforce whole"))
    assert r.status_code == 200
    (record,) = sink.records
    req = record.request
    if index is None:
        assert (req["decision_token"], req["stop_source"], req["enforced"]) == (None, None, False)
        return
    at = seq[index]
    assert (req["decision_token"], req["decision_answer"], req["stop_source"]) == (
        at.position, decision.answer, decision.source)
    assert req["enforced"] is (mode == "enforce")
    if mode != "enforce":
        return
    # An enforcing proxy takes exactly the probes and trials the replay counts, no more.
    took = sorted((p["position"], p["kind"] == "trial") for p in record.probes if p["status"] == "ok")
    assert took == sorted((p.position, p.trial) for p in taken(policy, seq[: index + 1]))
    # Each probe row says what took it, where that was, and how confident its answer was.
    stated = {o.position for o in seq if isinstance(o, StatementObservation)}
    by_trial = {o.position: o.confidence for o in seq if isinstance(o, ProbeObservation) and o.trial}
    for row in record.probes:
        if row["kind"] == "trial":
            assert row["confidence"] == pytest.approx(by_trial[row["position"]])
            assert row["trigger_position"] >= row["position"]
        else:
            assert row["confidence"] == pytest.approx(_probe_answer(row["position"])[1])
            if row["kind"] == "statement":
                assert row["trigger_position"] in stated
                assert row["position"] - INTERVAL < row["trigger_position"] <= row["position"]
    assert main.closed and main.sent < len(main.parts)
    if how == "enforce whole":
        message = r.json()["choices"][0]["message"]["content"]
    else:
        message = "".join(c["delta"].get("content") or "" for e in _events(r.content)
                          for c in e["choices"])
    assert message.endswith(f"**Final Answer**\n\\boxed{{{decision.answer}}}")


def _events(raw: bytes) -> list[dict]:
    return [json.loads(b[6:]) for b in raw.split(b"\n\n")
            if b.startswith(b"data: ") and b != b"data: [DONE]"]


async def test_end_of_thinking_stop_when_the_server_splits_the_reasoning_off(tmp_path):
    """vLLM's and SGLang's reasoning parsers send the thinking in `reasoning_content` and eat
    `</think>`: the first content token ends the thinking, and the stop writes the answer."""
    thinking = ["Let ", "me ", "see", ", ", "so ", "the ", "answer ", "is ", "7", ".", " ", "Done", "."]
    summary = ["\n\n", "The ", "answer ", "is ", "\\boxed{7}", "."] * 20
    events = [{"id": "c1", "object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": {"reasoning_content": p}, "finish_reason": None}]}
              for p in thinking]
    events += [{"id": "c1", "object": "chat.completion.chunk", "model": "m",
                "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
               for p in summary]
    main = FakeResponse(200, list(SSE), sse(events), delay_s=0.002)
    policy = _policy_file(tmp_path, CotPolicy(periodic=False, think_end=True))
    app, _, sink, client = make(lambda call: main, mode="enforce", policy_file=policy,
                                store_text=True)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    evs = _events(r.content)
    content = "".join(c["delta"].get("content") or "" for e in evs for c in e["choices"])
    assert content == "\n\n\n\n**Final Answer**\n\\boxed{7}"  # the first content token, then the answer
    ext = next(e["dynasor"] for e in evs if "dynasor" in e)
    assert (ext["source"], ext["answer"], ext["stop_token"]) == ("text", "7", len(thinking) + 1)
    assert main.closed and main.sent < len(main.parts)
    (record,) = sink.records
    assert record.request["stop_source"] == "text" and record.probes == []
    assert record.request["completion_text"].startswith("<think>\nLet me see")
    assert "Done.\n</think>\n\n\n\n" in record.request["completion_text"]


@pytest.mark.parametrize("name", ["periodic", "statement", "trial confidence", "end of thinking"])
async def test_what_comes_after_the_stop_changes_no_live_decision(tmp_path, name):
    """Causality, live: every token and probe answer after the stop rewritten (after the word,
    for a trial: its trigger), same decision."""
    policy = POLICIES[name]
    seq = observations(recorded_run())
    index, decision = first_stop(policy, seq)
    assert index is not None
    stop = seq[index].position
    cut = stop
    if decision.source == "trial":  # a trial is taken once its word is written, with what follows
        word = next(at for at in TRIALS if token_position(at, len(TEXT), TOKENS) == stop)
        cut = token_position(word + len("wait") + 1, len(TEXT), TOKENS)
    # After that: other words (no "wait", no `</think>`, no statement) and other answers.
    pieces = PIECES[:cut] + ["other "] * (TOKENS - cut)

    def answer_at(position: int) -> tuple[str, float]:
        return _probe_answer(position) if position <= cut else ("99", 0.99999)

    main, handler = scripted(pieces=pieces, answer_at=answer_at)
    app, _, sink, client = make(handler, mode="shadow", policy_file=_policy_file(tmp_path, policy),
                                probe_interval=INTERVAL)
    async with app:
        await client.post("/v1/chat/completions", json=chat_body(stream=True))
    (record,) = sink.records
    req = record.request
    assert (req["decision_token"], req["decision_answer"], req["stop_source"]) == (
        stop, decision.answer, decision.source)
