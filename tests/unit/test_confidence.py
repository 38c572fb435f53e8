"""A probe's answer and confidence from what it decoded; logprobs as each server shapes them,
and shapes that cannot be read recorded as no confidence, never as a failure."""

from __future__ import annotations

import json
import math

import pytest

from proxy.core.confidence import answer_complete, answer_confidence, answer_of
from proxy.metrics import Metrics
from proxy.pipeline.dialect import token_logprobs
from proxy.pipeline.probe import Prober, how_to_probe
from proxy.settings import Settings
from tests.fakes import SSE, FakeResponse, ScriptedUpstream, sse

LN = math.log


def test_answer_after_an_open_or_a_decoded_brace():
    assert answer_of("12} and more", brace_open=True) == "12"
    assert answer_of(" {\\frac{1}{2}}\n", brace_open=False) == "\\frac{1}{2}"
    assert answer_of("no brace yet", brace_open=False) is None
    assert answer_of("}", brace_open=True) is None
    assert answer_complete("{12", brace_open=False) is False
    assert answer_complete("{12}", brace_open=False) and answer_complete("1}", brace_open=True)


def test_confidence_is_the_mean_probability_after_the_opening_brace_closing_brace_included():
    # DEER's trials: "{" decoded first, not counted; the answer and its "}" are.
    tokens = [("{", LN(0.1)), ("2", LN(0.9)), ("0", LN(0.8)), ("}", LN(0.7)), ("\n", LN(0.01))]
    assert answer_confidence(tokens, brace_open=False) == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    # A token that opens the brace and starts the answer counts (it holds the answer).
    assert answer_confidence([("{2", LN(0.5)), ("}", LN(1.0))], False) == pytest.approx(0.75)
    # The paper's suffix ends with "\\boxed{": every decoded token up to the closing one.
    assert answer_confidence([("1", LN(0.6)), ("2}", LN(0.8)), ("x", 0.0)], True) == pytest.approx(0.7)
    assert answer_confidence([("{", 0.0), ("{", 0.0), ("1", 0.0), ("}", 0.0), ("}", LN(0.5))],
                             False) == pytest.approx(3.5 / 4)  # the inner "{" counts


@pytest.mark.parametrize("tokens", [
    [],  # nothing decoded
    [("{", 0.0), ("1", LN(0.5))],  # the answer never closed
    [("1", 0.0)],  # no brace ever opened (a decoded-brace probe)
    [("{", 0.0), ("1", float("nan")), ("}", 0.0)],
])
def test_no_confidence_when_it_cannot_be_measured(tokens):
    assert answer_confidence(tokens, brace_open=False) is None


def test_logprob_shapes_of_chat_and_completions():
    chat = {"delta": {"content": "12"}, "logprobs": {"content": [
        {"token": "1", "logprob": -0.1, "bytes": [49], "top_logprobs": []},
        {"token": "2", "logprob": 0, "bytes": [50], "top_logprobs": []}]}}
    assert token_logprobs(chat, "chat") == [("1", -0.1), ("2", 0.0)]
    completion = {"text": "12", "logprobs": {"tokens": ["1", "2"], "token_logprobs": [-0.5, -1.0],
                                             "top_logprobs": None, "text_offset": [0, 1]}}
    assert token_logprobs(completion, "completion") == [("1", -0.5), ("2", -1.0)]


@pytest.mark.parametrize(("part", "kind"), [
    ({"delta": {"content": "1"}}, "chat"),  # no logprobs at all
    ({"delta": {"content": "1"}, "logprobs": None}, "chat"),
    ({"delta": {"content": "1"}, "logprobs": {"content": None}}, "chat"),
    ({"delta": {"content": "1"}, "logprobs": {"content": [{"token": "1"}]}}, "chat"),
    ({"delta": {"content": "1"}, "logprobs": {"content": [{"token": "1", "logprob": "x"}]}}, "chat"),
    ({"delta": {"content": "1"}, "logprobs": {"content": [{"token": "1", "logprob": 3.0}]}}, "chat"),
    ({"delta": {"content": "1"}, "logprobs": {"content": ["1"]}}, "chat"),
    ({"text": "1", "logprobs": {"tokens": ["1"], "token_logprobs": []}}, "completion"),
    ({"text": "1", "logprobs": {"tokens": ["1"]}}, "completion"),
    ({"text": "1", "logprobs": [-0.1]}, "completion"),
])
def test_unreadable_logprobs_read_as_not_measured(part, kind):
    assert token_logprobs(part, kind) is None


def _probe_reply(chunks: list[dict]) -> FakeResponse:
    return FakeResponse(headers=list(SSE), parts=sse([{"choices": [c]} for c in chunks]))


def _chunk(text: str, logprobs: object = "absent") -> dict:
    out: dict = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    if logprobs != "absent":
        out["logprobs"] = logprobs
    return out


def _lp(token: str, p: float) -> dict:
    return {"content": [{"token": token, "logprob": LN(p)}]}


@pytest.mark.parametrize(("chunks", "confidence"), [
    ([_chunk("1", _lp("1", 0.5)), _chunk("2", _lp("2", 0.7)), _chunk("}", _lp("}", 0.9))], 0.7),
    ([_chunk("1", _lp("1", 0.5)), _chunk("2"), _chunk("}", _lp("}", 0.9))], None),  # one missing
    ([_chunk("1", None), _chunk("2}", None)], None),  # logprobs: null (a server that ignores them)
    ([_chunk("1", {"content": []}), _chunk("2}", _lp("2}", 0.9))], None),  # text, no tokens
    ([_chunk("12}", {"content": [{"token": "12}", "logprob": None}]})], None),
    ([_chunk("", _lp("", 1.0)), _chunk("12}", _lp("12}", 0.25))], 0.25),  # an empty first chunk
])
async def test_a_probe_records_its_answer_whatever_its_logprobs_look_like(chunks, confidence):
    upstream = ScriptedUpstream(lambda call: _probe_reply(chunks))
    settings = Settings(upstream_url="http://scripted.upstream")
    prober = Prober(upstream, settings, Metrics())
    request = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    result = await prober.probe("chat", request, [], "so far", 64, how_to_probe(None, settings))
    assert result.answer == "12" and result.status == "ok"
    assert result.confidence == (None if confidence is None else pytest.approx(confidence))
    sent = json.loads(upstream.calls[0].body)
    assert sent["logprobs"] is True and sent["temperature"] == settings.probe_temperature


async def test_completion_probes_ask_for_logprobs_without_alternatives():
    reply = {"index": 0, "text": "12}", "finish_reason": None,
             "logprobs": {"tokens": ["12", "}"], "token_logprobs": [LN(0.5), LN(1.0)]}}
    upstream = ScriptedUpstream(lambda call: _probe_reply([reply]))
    settings = Settings(upstream_url="http://scripted.upstream")
    prober = Prober(upstream, settings, Metrics())
    result = await prober.probe("completion", {"model": "m", "prompt": "q"}, [], "so far", 64)
    assert result.answer == "12" and result.confidence == pytest.approx(0.75)
    assert json.loads(upstream.calls[0].body)["logprobs"] == 0
