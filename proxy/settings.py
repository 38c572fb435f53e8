"""Proxy settings: `DYNASOR_*` environment variables, an optional TOML file, then flags.

Every setting is documented once, here; the documentation site's settings reference
(docs/reference/settings.md) is generated from these fields by `dynasorctl.reference`
when the site is built (`dynasorctl observe --help` shows the flags that override them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from proxy.control.guardrails import GuardrailSettings
from proxy.core.certaindex import DEFAULT_PROBE_SUFFIX
from proxy.upstream.url import UpstreamUrl, parse_upstream


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DYNASOR_", extra="forbid")

    upstream_url: str = Field(
        "http://127.0.0.1:8000", description="base URL of the vLLM or SGLang server "
        "(`http://user:pass@host` sends Basic credentials; a trailing /v1 is dropped)"
    )
    upstream_api_key: str | None = Field(
        None, description="key sent upstream as a Bearer token; replaces the client's Authorization"
    )
    affinity_header: str | None = Field(
        None, description="header a router in front of several replicas pins a session by "
        "(vLLM's router: X-Session-ID; SGLang's: X-SMG-Routing-Key), set on each request, its "
        "samples and probes, valued by the client's own value, else the program, else the "
        "request id; unset: not sent"
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="upstream connect timeout")
    read_timeout_s: float = Field(600.0, gt=0, description="longest silence from the upstream")
    host: str = Field("127.0.0.1", description="address the proxy listens on")
    port: int = Field(8080, ge=1, le=65535, description="port the proxy listens on")
    db_url: str | None = Field(None, description="SQLAlchemy URL of the store "
                                  "(default: sqlite:///$XDG_DATA_HOME/dynasor/dynasor.db)")
    store_text: bool = Field(False, description="store prompt and completion text, not only hashes")
    probe_rate: float = Field(1.0, ge=0.0, le=1.0, description="share of requests probed (0: off)")
    probe_interval: int = Field(64, ge=1, description="probe every this many generated tokens")
    probe_suffix: str = Field(DEFAULT_PROBE_SUFFIX, description="text appended before probing")
    probe_max_tokens: int = Field(20, ge=1, description="most tokens a probe decodes")
    probe_temperature: float = Field(0.6, ge=0.0, description="probe sampling temperature (paper)")
    probe_top_p: float = Field(0.95, gt=0.0, le=1.0, description="probe nucleus sampling (paper)")
    probe_logprobs: bool = Field(
        True, description="probes ask for logprobs and record their answer's confidence")
    trial_words: list[str] = Field(
        ["wait"], description="observe and shadow (unless the policy sets its own): trials (DEER) "
        "at these transition words; empty: none")
    trial_max: int = Field(30, ge=0, description="trials at the first this many transition words")
    probe_concurrency: int = Field(8, ge=1, description="probes in flight at once, all requests")
    probe_max_per_request: int = Field(256, ge=1, description="most probes for one request")
    record_queue_size: int = Field(10_000, ge=1, description="records buffered for the store")
    request_body_timeout_s: float = Field(
        30.0, gt=0, description="longest wait for the rest of a client's request body (then 400)"
    )
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="on SIGTERM/SIGINT, how long in-flight requests may run on before "
        "they are ended and recorded as interrupted"
    )
    mode: Literal["observe", "shadow", "enforce"] = Field(
        "observe", description="observe: measure only; shadow: also decide, change nothing; "
        "enforce: stop streams the policy stops (for `enforce_percent` of programs); used when "
        "the store holds no rollout state"
    )
    policy_file: str | None = Field(None, description="policy file (TOML) for shadow and enforce")
    enforce_percent: float = Field(
        100.0, ge=0.0, le=100.0, description="share of programs enforced; the rest are shadowed"
    )
    sc_parallel: int = Field(
        0, ge=0, description="enforced self-consistency: samples generated at once "
        "(0: the policy's min_samples); fewer saves more, more answers sooner"
    )
    allow_opt_in: bool = Field(False, description="honour `X-Dynasor: enforce` from clients")
    answer_template: str = Field(
        "**Final Answer**\n\\boxed{{{answer}}}",
        description="what an enforced stop writes after the last token ({answer}: the answer)",
    )

    rollout_poll_s: float = Field(0.5, gt=0, description="how often the rollout state is reloaded")
    guardrails: GuardrailSettings = Field(
        default_factory=GuardrailSettings, description="bounds that roll enforce back to shadow"
    )
    admin_token: str | None = Field(None, description="token of the admin API (unset: no admin API)")
    admin_port: int = Field(8081, ge=1, le=65535, description="port of the admin API (loopback)")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines: text, or json (one object a line, for log pipelines)")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector to send traces to (unset: no tracing; "
        "needs the otel extra)")

    @model_validator(mode="after")
    def _policy_for_mode(self) -> Settings:
        # A store-backed rollout can supply the policy; flags alone must name one.
        if self.mode != "observe" and self.policy_file is None:
            raise ValueError(f"mode {self.mode} needs a policy_file")
        return self

    @field_validator("upstream_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_upstream(v)  # its ValueError names what is wrong, never the password
        return v.strip().rstrip("/")

    @model_validator(mode="after")
    def _one_credential(self) -> Settings:
        if self.upstream_api_key and self.upstream.authorization:
            raise ValueError("upstream_url holds credentials and upstream_api_key is set: use one")
        return self

    @property
    def upstream(self) -> UpstreamUrl:
        """The upstream URL as the proxy uses and shows it (see `proxy.upstream.url`)."""
        return parse_upstream(self.upstream_url)
