"""The upstream's URL as the operator gives it, and as the proxy uses and shows it (pure).

Credentials in the URL (`http://user:pass@host`) become an `Authorization: Basic` header
sent with every upstream request; the URL the proxy connects to, and every URL it shows
(`/health`, the store's `upstream` column, error messages, logs), holds none. A trailing
`/v1`, the form OpenAI clients are configured with, is stripped with a notice: the proxy
forwards the client's own `/v1/...` paths.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

REDACTED = "***"


@dataclass(frozen=True, slots=True)
class UpstreamUrl:
    base: str  # what requests go to: no credentials, no /v1, no trailing slash
    shown: str  # what is shown anywhere: the base with the password (if any) as ***
    authorization: str | None  # the URL's credentials as a Basic Authorization value
    notice: str | None  # what start-up says when the URL given was changed


def _netloc(parts: SplitResult, userinfo: str | None) -> str:
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{userinfo}@{host}{port}" if userinfo is not None else f"{host}{port}"


def parse_upstream(url: str) -> UpstreamUrl:
    """Split the operator's URL into where to connect, what to show, and the credentials.

    ValueError (with a reason, never the password) when it is no http(s) URL.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises on a port that is no number
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    if parts.query or parts.fragment:
        raise ValueError("must have no query or fragment")
    path = parts.path.rstrip("/")
    notice = None
    if path.endswith("/v1"):
        path = path.removesuffix("/v1")
        notice = "the /v1 at the end of the upstream URL is dropped: clients' /v1/... paths are forwarded as they are"
    base = urlunsplit((parts.scheme, _netloc(parts, None), path, "", ""))
    authorization, shown = None, base
    if parts.username is not None or parts.password is not None:
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        userinfo = f"{parts.username}:{REDACTED}" if parts.password is not None else REDACTED
        shown = urlunsplit((parts.scheme, _netloc(parts, userinfo), path, "", ""))
    return UpstreamUrl(base, shown, authorization, notice)
