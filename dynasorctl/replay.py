"""`dynasorctl replay`: an OpenAI-compatible upstream that answers from recorded traces.

A request whose prompt holds a recorded problem gets that problem's recorded
completion, streamed one token-sized piece a chunk in vLLM's wire format. A
probe (the prompt continues with a prefix of the recorded text and a probe
suffix) gets the answer recorded for the probe at that token position; a trial
(the text before a transition word continued with the trial file's inducer) the
trial recorded at that word, with logprobs (when asked for) whose mean
probability is its recorded confidence. So the proxy in front of it sees what it
would see in front of the real model.

The server is a plain ASGI app (`create_replay_app`) served by uvicorn: by the
command (`replay_server`) or in-process (`serve_replay`) for the demo and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dynasorctl.recordings import (
    ReplayIndex,
    Reply,
    probe_match,
    probe_reply,
    rough_tokens,
    token_position,
    trace_reply,
    trial_match,
    trial_reply,
)
from dynasorctl.traces import CotTrace, ScProgram
from dynasorctl.trials import Trials
from proxy.pipeline.exchange import read_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]



# --- requests and the wire format ------------------------------------------------------------


# Samples one request may ask for: each is a whole reply held in memory (n = 10^30 grew the
# server to 22 GB before it was bounded); far above the recorded programs' 16.
MAX_SAMPLES = 128


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields pass, as on vLLM


class _StreamOptions(_Open):
    include_usage: bool = False


class _Part(_Open):
    text: str = ""


class _ChatMessage(_Open):
    role: str
    content: str | list[_Part] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Request(_Open):
    model: str | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool | int | None = None  # chat: true; completions: how many alternatives

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None and self.logprobs is not False


class ChatRequest(_Request):
    messages: list[_ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


class _HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        self.status = status


_Model = TypeVar("_Model", bound=BaseModel)


def _parse(model: type[_Model], body: bytes) -> _Model:
    try:
        return model.model_validate(json.loads(body))
    except json.JSONDecodeError as exc:
        raise _HttpError(400, "BadRequestError", f"request body is not JSON: {exc}") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        raise _HttpError(400, "BadRequestError", f"{where}: {err['msg']}") from exc


class _Wire:
    """The vLLM-shaped bodies of one response, chat or text completion."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, index: int, text: str, finish: str | None, stream: bool,
                tokens: Sequence[tuple[str, float]] | None = None) -> dict[str, Any]:
        if not self.chat:
            said: dict[str, Any] = {"text": text}
        elif stream:
            said = {"delta": {"content": text}}
        else:
            said = {"message": {"role": "assistant", "content": text}}
        return {"index": index, **said, "logprobs": self._logprobs(tokens),
                "finish_reason": finish, "stop_reason": None}

    def _logprobs(self, tokens: Sequence[tuple[str, float]] | None) -> dict[str, Any] | None:
        """vLLM's logprobs of these tokens: `content[]` on chat, parallel lists on completions."""
        if tokens is None:
            return None
        if self.chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                 "top_logprobs": []} for t, lp in tokens]}
        offsets = [sum(len(t) for t, _ in tokens[:i]) for i in range(len(tokens))]
        return {"text_offset": offsets, "token_logprobs": [lp for _, lp in tokens],
                "tokens": [t for t, _ in tokens], "top_logprobs": [{t: lp} for t, lp in tokens]}

    def role_chunk(self, index: int) -> dict[str, Any]:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None}
        return self._envelope("chat.completion.chunk", [choice])

    def chunk(self, index: int, text: str, finish: str | None,
              logprob: float | None = None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        tokens = None if logprob is None else [(text, logprob)]
        return self._envelope(obj, [self._choice(index, text, finish, True, tokens)])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.chunk(0, "", None), "choices": [], "usage": usage}

    def body(self, replies: Sequence[Reply], usage: dict[str, int],
             logprobs: bool = False) -> dict[str, Any]:
        choices = [self._choice(i, r.text, r.finish_reason, False,
                                list(zip(r.pieces, r.logprobs)) if logprobs and r.logprobs else None)
                   for i, r in enumerate(replies)]
        return {**self._envelope("chat.completion" if self.chat else "text_completion", choices),
                "usage": usage}


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


# --- the ASGI app ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Json:
    status: int
    body: dict[str, Any] | None


Response = _Json | AsyncGenerator[bytes, None]


class ReplayApp:
    """The replay upstream as an ASGI app."""

    def __init__(self, index: ReplayIndex, tokens_per_second: float = 0.0) -> None:
        self.index = index
        self.unrecorded_trials = 0  # trials asked at a word the trial file has no trial for
        self.tokens_per_second = tokens_per_second
        self._routes: dict[tuple[str, str], Callable[[bytes], Awaitable[Response]]] = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        try:
            handler = self._routes.get((scope["method"], scope["path"]))
            if handler is None:
                if any(path == scope["path"] for _, path in self._routes):
                    raise _HttpError(405, "MethodNotAllowed", f"{scope['method']} not allowed here")
                raise _HttpError(404, "NotFoundError", f"no route {scope['path']}")
            response = await handler(body)
        except _HttpError as exc:
            response = _Json(exc.status, exc.body)
        if isinstance(response, _Json):
            await _send_json(send, response)
        else:
            await _send_stream(send, receive, response)

    async def _health(self, _: bytes) -> Response:
        return _Json(200, None)

    async def _models(self, _: bytes) -> Response:
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "dynasor-replay",
                 "root": m, "parent": None} for m in self.index.models]
        return _Json(200, {"object": "list", "data": data})

    async def _chat(self, body: bytes) -> Response:
        req = _parse(ChatRequest, body)
        messages = req.messages
        probe = messages[-1].role == "assistant"
        context = "\n".join(m.text for m in (messages[:-1] if probe else messages))
        continuation = messages[-1].text if probe else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await self._respond(req, True, context, continuation, max_tokens)

    async def _completions(self, body: bytes) -> Response:
        req = _parse(CompletionRequest, body)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise _HttpError(400, "BadRequestError", "replay serves one prompt a request")
            prompt = prompt[0]
        return await self._respond(req, False, prompt, None, req.max_tokens)

    async def _respond(self, req: _Request, chat: bool, context: str,
                       continuation: str | None, max_tokens: int | None) -> Response:
        """Match the prompt to its recordings, say what each choice replies, then send it."""
        problem = self.index.problem_in(context)
        if problem is None:
            raise _HttpError(404, "NotFoundError", "no recorded trace matches this prompt "
                             f"(none of the {len(self.index.problems)} recorded problems is in it)")
        ranked = self.index.ranked(problem, req.model, req.seed)
        prompt = context + (continuation or "")
        after = continuation if continuation is not None else (
            None if chat else context[context.index(problem) + len(problem):])
        trial = trial_match(ranked, after, self.index.inducer) if after is not None else None
        if continuation is not None:
            probe = probe_match(ranked, continuation, strict=False)
        elif not chat:
            probe = probe_match(ranked, after or "", strict=True)
        else:
            probe = None
        if trial is not None:
            rec, found = trial
            self.unrecorded_trials += found is None
            replies = [trial_reply(found, max_tokens)] * req.n
            prompt_tokens = rough_tokens(prompt)
        elif probe is not None:
            rec, length = probe
            position = token_position(length, len(rec.text), rec.completion_tokens)
            replies = [probe_reply(rec, position, max_tokens)] * req.n
            prompt_tokens = rough_tokens(prompt)
        else:
            picked = [ranked[i % len(ranked)] for i in range(req.n)]
            replies = [trace_reply(r, max_tokens) for r in picked]
            rec = picked[0]
            prompt_tokens = rec.prompt_tokens or rough_tokens(prompt)
        completion = sum(r.completion_tokens for r in replies)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        wire = _Wire(chat, rec.model)
        if not req.stream:
            return await self._whole(wire, replies, usage, req.wants_logprobs)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return self._stream(wire, replies, usage if include_usage else None, req.wants_logprobs)

    async def _whole(self, wire: _Wire, replies: list[Reply], usage: dict[str, int],
                     logprobs: bool) -> _Json:
        if self.tokens_per_second > 0:
            await asyncio.sleep(max(len(r.pieces) for r in replies) / self.tokens_per_second)
        return _Json(200, wire.body(replies, usage, logprobs))

    async def _stream(self, wire: _Wire, replies: list[Reply], usage: dict[str, int] | None,
                      logprobs: bool) -> AsyncGenerator[bytes, None]:
        if wire.chat:
            for i in range(len(replies)):
                yield _sse(wire.role_chunk(i))
        loop = asyncio.get_running_loop()
        start = loop.time()
        # The choices advance together, a piece each a step, as in one batch.
        for step in range(max(len(r.pieces) for r in replies)):
            for i, r in enumerate(replies):
                if step < len(r.pieces):
                    last = step == len(r.pieces) - 1
                    logprob = r.logprobs[step] if logprobs and r.logprobs else None
                    yield _sse(wire.chunk(i, r.pieces[step], r.finish_reason if last else None,
                                          logprob))
            await self._pace(loop, start, step + 1)
        if usage is not None:
            yield _sse(wire.usage_chunk(usage))
        yield b"data: [DONE]\n\n"

    async def _pace(self, loop: asyncio.AbstractEventLoop, start: float, steps: int) -> None:
        if self.tokens_per_second <= 0:
            await asyncio.sleep(0)  # as fast as possible, but never hog the loop
            return
        # Against the start, not the last chunk, so the rate does not drift.
        await asyncio.sleep(max(0.0, start + steps / self.tokens_per_second - loop.time()))


def create_replay_app(records: Sequence[CotTrace] | Sequence[ScProgram],
                      tokens_per_second: float = 0.0, trials: Trials | None = None) -> ReplayApp:
    """The replay upstream over `records` (as `dynasorctl.traces.load` returns them) and the
    trials recorded for them (`dynasorctl.trials.load_trials`), if any."""
    return ReplayApp(ReplayIndex(records, trials), tokens_per_second)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_json(send: Send, response: _Json) -> None:
    body = b"" if response.body is None else json.dumps(response.body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_stream(send: Send, receive: Receive, frames: AsyncGenerator[bytes, None]) -> None:
    headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    # The proxy hangs up once it has stopped a request early: stop generating then.
    watcher = asyncio.create_task(watch())
    try:
        async for frame in frames:
            if gone.is_set():
                return
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await frames.aclose()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# --- serving ---------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); raises OSError if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def base_url(sock: socket.socket) -> str:
    """The URL a bound socket serves at, e.g. `http://127.0.0.1:8001` (append `/v1`)."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def replay_server(app: ReplayApp, sock: socket.socket) -> uvicorn.Server:
    """The uvicorn server the command runs: `replay_server(app, sock).run(sockets=[sock])`."""
    return uvicorn.Server(_config(app, sock))


def _config(app: ReplayApp, sock: socket.socket, **extra: Any) -> uvicorn.Config:
    host, port = sock.getsockname()[:2]
    return uvicorn.Config(app, host=host, port=port, log_level="warning", loop="uvloop",
                          http="httptools", **extra)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # Ctrl-C belongs to the host program, not to an embedded upstream


@contextlib.asynccontextmanager
async def serve_replay(records: Sequence[CotTrace] | Sequence[ScProgram],
                       tokens_per_second: float = 0.0, host: str = "127.0.0.1",
                       port: int = 0, trials: Trials | None = None) -> AsyncIterator[str]:
    """Serve the replay as a task on the running loop; yields its base URL once it accepts.

    Port 0 picks a free port. Streams still open on exit get a second to finish.
    """
    sock = bind_socket(host, port)
    app = create_replay_app(records, tokens_per_second, trials)
    server = _EmbeddedServer(_config(app, sock, timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start
                raise RuntimeError("the replay server exited before it started")
            await asyncio.sleep(0.01)
        yield base_url(sock)
    finally:
        server.should_exit = True
        await task
        sock.close()
