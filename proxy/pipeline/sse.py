"""Server-sent events: an incremental reader of `data:` payloads, and frame writers."""

from __future__ import annotations

import json


class SseReader:
    """Feed raw bytes as they arrive; get back the `data:` payload of each complete event."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        *events, self._buf = buf.split(b"\n\n")
        out = []
        for event in events:
            data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if data:
                out.append(b"\n".join(data))
        return out


DONE_TAIL = b"\n\ndata: [DONE]"


def payload_array(raw: bytes) -> bytes | None:
    """The payloads of a whole stream as the text of one JSON array (`[DONE]` left out).

    Valid JSON exactly when every event is one `data: ` line, as vLLM and SGLang send them:
    any other line (a comment, `event:`, `id:`, a second data line, CRLF framing) leaves
    text that is not JSON, so the caller's parse fails and it reads event by event. A few
    C-speed byte operations instead of a split per event; None when it cannot be plain.
    """
    if not raw.startswith(b"data: "):
        return None
    body = raw[6:].rstrip(b"\n")
    if body.endswith(DONE_TAIL):
        body = body[:-len(DONE_TAIL)]
    elif body == b"[DONE]":
        return b"[]"
    # JSON strings hold no raw newline, so every separator found is a real one.
    return b"".join((b"[", body.replace(b"\n\ndata: ", b","), b"]"))


def error_frame(message: str, type_: str = "upstream_error", code: int = 502) -> bytes:
    """An OpenAI-style error event followed by the end marker (for errors mid-stream)."""
    body = json.dumps({"error": {"message": message, "type": type_, "code": code}})
    return f"data: {body}\n\ndata: [DONE]\n\n".encode()


def error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    """An OpenAI-shaped JSON error body."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()
