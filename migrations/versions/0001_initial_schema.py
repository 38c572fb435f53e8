"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 22:27:15.901330
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('requests',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('upstream', sa.String(length=300), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('stream', sa.Boolean(), nullable=False),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('finish_reason', sa.String(length=32), nullable=True),
    sa.Column('final_answer', sa.Text(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('ttft_ms', sa.Float(), nullable=True),
    sa.Column('program_id', sa.String(length=200), nullable=True),
    sa.Column('probed', sa.Boolean(), nullable=False),
    sa.Column('probe_count', sa.Integer(), nullable=False),
    sa.Column('probe_tokens', sa.Integer(), nullable=False),
    sa.Column('prompt_hash', sa.String(length=64), nullable=True),
    sa.Column('completion_hash', sa.String(length=64), nullable=True),
    sa.Column('prompt_text', sa.Text(), nullable=True),
    sa.Column('completion_text', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_requests'))
    )
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_requests_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_requests_model'), ['model'], unique=False)
        batch_op.create_index(batch_op.f('ix_requests_program_id'), ['program_id'], unique=False)

    op.create_table('probes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('request_id', sa.String(length=32), nullable=False),
    sa.Column('choice_index', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=True),
    sa.Column('hesitant', sa.Boolean(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('certaindex', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], name=op.f('fk_probes_request_id_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_probes'))
    )
    with op.batch_alter_table('probes', schema=None) as batch_op:
        batch_op.create_index('ix_probes_request_position', ['request_id', 'position'], unique=False)

    op.create_table('program_samples',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('program_id', sa.String(length=200), nullable=False),
    sa.Column('request_id', sa.String(length=32), nullable=False),
    sa.Column('choice_index', sa.Integer(), nullable=False),
    sa.Column('sample_index', sa.Integer(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=True),
    sa.Column('answer_group', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('finish_reason', sa.String(length=32), nullable=True),
    sa.Column('certaindex', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], name=op.f('fk_program_samples_request_id_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_program_samples'))
    )
    with op.batch_alter_table('program_samples', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_program_samples_program_id'), ['program_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('program_samples', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_program_samples_program_id'))

    op.drop_table('program_samples')
    with op.batch_alter_table('probes', schema=None) as batch_op:
        batch_op.drop_index('ix_probes_request_position')

    op.drop_table('probes')
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_requests_program_id'))
        batch_op.drop_index(batch_op.f('ix_requests_model'))
        batch_op.drop_index(batch_op.f('ix_requests_created_at'))

    op.drop_table('requests')
