"""A replay replica for the router tests, as its own process (so neither the test's event loop
nor the proxy in it can starve it): `python -m tests.replica PORT LOG`.

It answers as `dynasorctl replay` on the packaged sample (500 tokens a second) and writes one JSON line to LOG per
chat request: the problem (its first message) and whether it was a probe (it ends with an
assistant turn the model continues).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import uvicorn

from dynasorctl import traces
from dynasorctl.replay import create_replay_app


class Logged:
    """The replay app, noting which problem each chat request was about."""

    def __init__(self, app: Any, log: TextIO) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            messages.append(message)
            if not message.get("more_body"):
                break
        chat = json.loads(body)["messages"]
        self.log.write(json.dumps({"problem": chat[0]["content"],
                                   "probe": chat[-1]["role"] == "assistant"}) + "\n")
        self.log.flush()
        queued = iter(messages)

        async def replayed() -> dict:
            return next(queued, None) or await receive()

        await self.app(scope, replayed, send)


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    app = create_replay_app(traces.load_cot(traces.PACKAGED_SAMPLE), tokens_per_second=500)
    with open(path, "a", encoding="utf-8") as log:
        uvicorn.run(Logged(app, log), host="127.0.0.1", port=port, log_level="error")


if __name__ == "__main__":
    main()
