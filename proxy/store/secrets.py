"""Secrets kept in the store, so that every proxy on one store shares them."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from proxy.store.models import SecretRow

ROLLOUT_SALT = "rollout_salt"


def shared_secret(engine: Engine, name: str) -> bytes:
    """The store's secret `name`: 32 random bytes made by the first proxy that asks (blocking).

    Two proxies asking at once both try to insert; the key lets one win and the other reads it.
    """
    query = select(SecretRow.value).where(SecretRow.name == name)
    with engine.connect() as conn:
        value = conn.scalar(query)
    if value is None:
        try:
            with engine.begin() as conn:
                conn.execute(insert(SecretRow).values(name=name, value=secrets.token_hex(32),
                                                      created_at=datetime.now(UTC)))
        except IntegrityError:  # another proxy made it first
            pass
        with engine.connect() as conn:
            value = conn.scalar(query)
    return bytes.fromhex(value)
