"""probes: confidence, kind and trigger position; requests: where a stop's answer came from

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("probes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("confidence", sa.Float(), nullable=True))
        # Every probe recorded before this migration was a periodic (or check) probe.
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False,
                                      server_default="periodic"))
        batch_op.add_column(sa.Column("trigger_position", sa.Integer(), nullable=True))
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stop_source", sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("stop_source")
    with op.batch_alter_table("probes", schema=None) as batch_op:
        batch_op.drop_column("trigger_position")
        batch_op.drop_column("kind")
        batch_op.drop_column("confidence")
