"""rollout: per-scope rollout state (mode, enforced percent, policy) and its audit trail

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollout_scopes",
        sa.Column("scope", sa.String(length=300), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("percent", sa.Float(), nullable=False),
        sa.Column("policy_id", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.CheckConstraint("mode IN ('off', 'observe', 'shadow', 'enforce')",
                           name=op.f("ck_rollout_scopes_mode")),
        sa.CheckConstraint("percent >= 0 AND percent <= 100",
                           name=op.f("ck_rollout_scopes_percent")),
        sa.ForeignKeyConstraint(["policy_id"], ["policies.id"],
                                name=op.f("fk_rollout_scopes_policy_id_policies")),
        sa.PrimaryKeyConstraint("scope", name=op.f("pk_rollout_scopes")),
    )
    op.create_table(
        "rollout_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scope", sa.String(length=300), nullable=False),
        sa.Column("field", sa.String(length=16), nullable=False),
        sa.Column("previous", sa.Text(), nullable=True),
        sa.Column("new", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("who", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_audit")),
    )
    with op.batch_alter_table("rollout_audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollout_audit_at"), ["at"], unique=False)
        batch_op.create_index("ix_rollout_audit_scope_id", ["scope", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rollout_audit", schema=None) as batch_op:
        batch_op.drop_index("ix_rollout_audit_scope_id")
        batch_op.drop_index(batch_op.f("ix_rollout_audit_at"))
    op.drop_table("rollout_audit")
    op.drop_table("rollout_scopes")
