"""The fast reading of a whole stream gives what the event-by-event reader gives, or steps aside."""

from __future__ import annotations

import orjson
import pytest

from dynasorctl.bench.fake_upstream import chat_stream
from proxy.pipeline.observe import ResponseObserver
from proxy.pipeline.sse import SseReader, payload_array

PLAIN = [
    b"".join(chat_stream(64)),
    b'data: {"a": 1}\n\ndata: {"b": "x\\n\\ndata: y"}\n\n',  # separators inside a JSON string
    b'data: {"a": 1}\n\n',  # no [DONE]
    b'data: {"a": 1}\n\ndata: {"b": 2}',  # the last event's blank line never came
    b"data: [DONE]\n\n",
    b'data: {"a": 1}\n\n\n\ndata: {"b": 2}\n\n',  # an extra blank line: empty event, skipped
]
OTHER = [
    b'data: {"a": 1}\r\n\r\ndata: [DONE]\r\n\r\n',  # CRLF
    b': keep-alive\n\ndata: {"a": 1}\n\n',  # a comment first
    b'data: {"a": 1}\n\n: keep-alive\n\ndata: {"b": 2}\n\n',  # a comment between
    b'event: message\ndata: {"a": 1}\n\n',  # an event line
    b'data: {"a":\ndata: 1}\n\n',  # one payload on two data lines
    b'data:{"a": 1}\n\n',  # no space after the colon
    b'data: {"a": 1}\n\ndata:{"b": 2}\n\n',
    b'data: {"a": 1}\n\nid: 7\ndata: {"b": 2}\n\n',  # an id line
    b'data: {"a": 1}\n\nretry: 10\n\ndata: {"b": 2}\n\n',
    b'data: 1\ndata: 2\n\n',  # two data lines, each JSON on its own
    b'data: {"a": 1}\n\ndata: [DONE]\n\ndata: {"b": 2}\n\n',  # [DONE] before the end
]


def reference(raw: bytes) -> list:
    return [orjson.loads(p) for p in SseReader().feed(raw + b"\n\n") if p != b"[DONE]"]


@pytest.mark.parametrize("raw", PLAIN)
def test_plain_streams_read_in_one_go_as_the_reader_reads_them(raw):
    array = payload_array(raw)
    assert array is not None
    assert orjson.loads(array) == reference(raw)


@pytest.mark.parametrize("raw", OTHER)
def test_any_other_shape_is_left_to_the_reader(raw):
    array = payload_array(raw)
    if array is not None:  # the text it gives is not JSON, so the caller reads event by event
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(array)


@pytest.mark.parametrize("raw", PLAIN + OTHER + [b'data: {"a": 1}\n\ndata: {broken\n\ndata: {"b": 2}\n\n'])
def test_the_observer_sees_the_same_events_either_way(raw):
    seen: list = []
    observer = ResponseObserver("chat", True)
    observer._apply = lambda body, stream=True: seen.append(body)  # type: ignore[method-assign]
    observer.feed(raw)
    observer.finish()
    good = [orjson.loads(p) for p in SseReader().feed(raw + b"\n\n") if p != b"[DONE]" and _json(p)]
    assert seen == good


def _json(payload: bytes) -> bool:
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return True
