"""Log lines for people (`text`, the default) or for log pipelines (`json`).

JSON is one object a line: `time` (UTC, ISO 8601), `level`, `logger`,
`request_id` (of the request being served, else null), `event` (the message),
then the fields the caller passed with `extra=`, and `exception` when there is
one. The request id is a context variable the proxy sets once per request, so
the request's probe and record tasks (which copy the context) carry it too.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

REQUEST_ID: ContextVar[str | None] = ContextVar("dynasor_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has; anything else on a record came from `extra=` (uvicorn's
# `color_message` aside: the same message with terminal colours).
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the request id of the context it was logged in (a handler
    may format it later, elsewhere)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", None),
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def handler(log_format: LogFormat, stream: Any = None) -> logging.Handler:
    """A handler writing `log_format` lines to `stream` (stderr by default)."""
    out = logging.StreamHandler(stream)
    out.addFilter(RequestIdFilter())
    out.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return out


def configure(log_format: LogFormat, level: int = logging.INFO) -> None:
    """One stderr handler on the root logger, in `log_format`."""
    root = logging.getLogger()
    root.handlers[:] = [handler(log_format)]
    root.setLevel(level)
