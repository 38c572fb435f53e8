"""SQLAlchemy 2 models of what dynasor observes (requests, probes, program samples) and of
what the operator adds to it (gold labels, calibrated policies).

Raw observations, not verdicts: any policy can be replayed from these rows.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class RequestRow(Base):
    """One client request relayed to the upstream."""

    __tablename__ = "requests"
    __table_args__ = (  # newest first by model, mode or policy (the dashboard's reads)
        Index("ix_requests_model_created_at", "model", "created_at"),
        Index("ix_requests_mode_created_at", "mode", "created_at"),
        Index("ix_requests_policy_created_at", "policy", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    model: Mapped[str | None] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # chat | completion
    upstream: Mapped[str] = mapped_column(String(300))
    mode: Mapped[str] = mapped_column(String(16), default="observe")
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    n: Mapped[int] = mapped_column(Integer, default=1)
    status_code: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    final_answer: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    program_id: Mapped[str | None] = mapped_column(String(200), index=True)
    probed: Mapped[bool] = mapped_column(Boolean, default=False)
    probe_count: Mapped[int] = mapped_column(Integer, default=0)
    probe_tokens: Mapped[int] = mapped_column(Integer, default=0)
    prompt_hash: Mapped[str | None] = mapped_column(String(64))
    completion_hash: Mapped[str | None] = mapped_column(String(64))
    prompt_text: Mapped[str | None] = mapped_column(Text)
    completion_text: Mapped[str | None] = mapped_column(Text)
    # shadow and enforce: the policy file, and where it stopped (or would have)
    policy: Mapped[str | None] = mapped_column(String(300))
    decision_token: Mapped[int | None] = mapped_column(Integer)
    decision_answer: Mapped[str | None] = mapped_column(Text)
    enforced: Mapped[bool] = mapped_column(Boolean, server_default=sa_false())
    # where the stop's answer came from: probe | trial | text (the end of thinking)
    stop_source: Mapped[str | None] = mapped_column(String(8))


class ProbeRow(Base):
    """One probe: the answer the model gave when forced to answer at `position` tokens."""

    __tablename__ = "probes"
    __table_args__ = (Index("ix_probes_request_position", "request_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    position: Mapped[int] = mapped_column(Integer)
    answer: Mapped[str | None] = mapped_column(Text)
    hesitant: Mapped[bool] = mapped_column(Boolean, default=False)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))  # ok | error | cancelled
    certaindex: Mapped[float | None] = mapped_column(Float)
    # the answer's mean token probability (probes that asked for logprobs), else None
    confidence: Mapped[float | None] = mapped_column(Float)
    # periodic | statement (an answer stated in the thinking) | trial (a transition word) | check
    kind: Mapped[str] = mapped_column(String(16), server_default="periodic")
    # main tokens when the statement or the transition word that asked for it was complete
    trigger_position: Mapped[int | None] = mapped_column(Integer)


class SampleRow(Base):
    """One finished sample of a self-consistency program, with certaindex after it."""

    __tablename__ = "program_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    program_id: Mapped[str] = mapped_column(String(200), index=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    sample_index: Mapped[int] = mapped_column(Integer)  # order in which samples finished
    answer: Mapped[str | None] = mapped_column(Text)
    answer_group: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    certaindex: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LabelRow(Base):
    """A gold answer for one request, or for every request with one prompt (by its hash).

    Rows are never updated: a newer label for the same request or prompt wins, and a
    request's own label wins over its prompt's.
    """

    __tablename__ = "labels"
    __table_args__ = (
        CheckConstraint("(request_id IS NULL) <> (prompt_hash IS NULL)", name="one_target"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str | None] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True)
    prompt_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    gold: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(300))  # where it came from, e.g. the file imported
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PolicyRow(Base):
    """A policy file kept in the store, versioned per (kind, model scope); active ones apply."""

    __tablename__ = "policies"
    __table_args__ = (
        Index("ix_policies_kind_model_version", "kind", "model", "version", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))  # cot | sc
    model: Mapped[str] = mapped_column(String(200))  # the model it applies to, "*" for all
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, ... within (kind, model)
    policy_toml: Mapped[str] = mapped_column(Text)  # the policy file, as `--out` writes it
    source: Mapped[str] = mapped_column(Text)  # what it was calibrated on
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    active: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    note: Mapped[str | None] = mapped_column(Text)


class RolloutScopeRow(Base):
    """How far a policy is rolled out in one scope: "*", "model:NAME" or "key:NAME".

    Proxies read these rows every second; `proxy.control.rollout` is the only writer, and
    it audits every change in `rollout_audit`.
    """

    __tablename__ = "rollout_scopes"
    __table_args__ = (
        CheckConstraint("mode IN ('off', 'observe', 'shadow', 'enforce')", name="mode"),
        CheckConstraint("percent >= 0 AND percent <= 100", name="percent"),
    )

    scope: Mapped[str] = mapped_column(String(300), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))  # off | observe | shadow | enforce
    percent: Mapped[float] = mapped_column(Float)  # enforced share in enforce, 0-100
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)


class RolloutAuditRow(Base):
    """One field of one rollout scope changed: by whom, why, from what to what."""

    __tablename__ = "rollout_audit"
    __table_args__ = (Index("ix_rollout_audit_scope_id", "scope", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    scope: Mapped[str] = mapped_column(String(300))
    field: Mapped[str] = mapped_column(String(16))  # mode | percent | policy
    previous: Mapped[str | None] = mapped_column(Text)  # None: the scope was created
    new: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    who: Mapped[str] = mapped_column(String(200))


class SecretRow(Base):
    """A secret every proxy on this store shares and no client sees (the rollout salt).

    Made once, by the first proxy that needs it (`proxy.store.secrets`), never changed.
    """

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))  # hex
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
