"""requests: the policy a shadowed or enforced request ran under, and its decision

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("policy", sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column("decision_token", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("decision_answer", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("enforced", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("enforced")
        batch_op.drop_column("decision_answer")
        batch_op.drop_column("decision_token")
        batch_op.drop_column("policy")
