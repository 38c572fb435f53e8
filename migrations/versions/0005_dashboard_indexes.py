"""requests: composite indexes for the dashboard's newest-first reads by model, mode and policy

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Each serves "the newest requests with this value" (ORDER BY created_at DESC LIMIT n)
# from the index alone: the request browser's model and mode filters, and the
# savings panel's requests decided by one policy.
INDEXES = (
    ("ix_requests_model_created_at", ["model", "created_at"]),
    ("ix_requests_mode_created_at", ["mode", "created_at"]),
    ("ix_requests_policy_created_at", ["policy", "created_at"]),
)


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        for name, columns in INDEXES:
            batch_op.create_index(name, columns, unique=False)


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        for name, _ in reversed(INDEXES):
            batch_op.drop_index(name)
