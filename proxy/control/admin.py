"""The admin API: rollout controls over HTTP, on their own port, behind a token.

It listens apart from the client-facing port (which relays every path to the
upstream), so clients can never reach it; every call needs
`Authorization: Bearer <admin_token>`. It goes through the same functions as
`dynasorctl rollout`, so every change is audited the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy.exc import SQLAlchemyError

from proxy.control import rollout
from proxy.pipeline.app import ProxyApp
from proxy.pipeline.exchange import JSON_HEADERS, Receive, Scope, Send, read_body
from proxy.pipeline.sse import error_body


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str


class SetBody(_Body):
    scope: str = "*"
    mode: str | None = None
    percent: float | None = None
    policy: str | None = None


class PromoteBody(_Body):
    scope: str = "*"


class KillBody(_Body):
    pass


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class AdminApp:
    WHO = "admin-api"

    def __init__(self, proxy: ProxyApp, token: str) -> None:
        self.proxy = proxy
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(auth, b"Bearer " + self._token):
            await _json(send, 401, error_body("admin token missing or wrong", "unauthorized", 401))
            return
        engine = self.proxy.control._engine
        if engine is None:
            await _json(send, 503, error_body("the proxy has no store", "unavailable", 503))
            return
        body = await read_body(receive)
        try:
            result = await self._route(scope["method"], scope["path"], body, engine)
        except (rollout.RolloutError, ValidationError, ValueError) as exc:
            message = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            await _json(send, 400, error_body(message, "invalid_request", 400))
            return
        except SQLAlchemyError as exc:
            await _json(send, 503, error_body(f"store: {exc}".splitlines()[0], "unavailable", 503))
            return
        if result is None:
            await _json(send, 404, error_body(f"no admin route {scope['path']}", "not_found", 404))
            return
        await self.proxy.control.refresh()  # this process applies the change at once
        await _json(send, 200, json.dumps(_plain(result)).encode())

    async def _route(self, method: str, path: str, raw: bytes, engine: Any) -> Any:
        if (method, path) == ("GET", "/rollout"):
            state = await asyncio.to_thread(rollout.load_state, engine)
            history = await asyncio.to_thread(rollout.history, engine, 20)
            return {"scopes": state.scopes, "history": history,
                    "guardrails": self.proxy.control.guardrails.status()}
        if (method, path) == ("GET", "/rollout/history"):
            return {"history": await asyncio.to_thread(rollout.history, engine, 200)}
        if (method, path) == ("POST", "/rollout/set"):
            b = SetBody.model_validate_json(raw or b"{}")
            return await asyncio.to_thread(rollout.set_scope, engine, b.scope, mode=b.mode,
                                           percent=b.percent, policy=b.policy, reason=b.reason,
                                           who=self.WHO)
        if (method, path) == ("POST", "/rollout/promote"):
            p = PromoteBody.model_validate_json(raw or b"{}")
            return await asyncio.to_thread(rollout.promote, engine, p.scope, reason=p.reason,
                                           who=self.WHO)
        if (method, path) == ("POST", "/rollout/kill"):
            k = KillBody.model_validate_json(raw or b"{}")
            return {"scopes": await asyncio.to_thread(rollout.kill, engine, reason=k.reason,
                                                      who=self.WHO)}
        return None


async def _json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})
