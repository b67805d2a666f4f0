"""Sensitivity measurements (issue 17): ΔKLD and Δbits per tensor group and candidate codec.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sensitivity',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('experiment_id', sa.String(length=64), nullable=False),
    sa.Column('arm', sa.String(length=200), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('contributor_id', sa.Integer(), nullable=False),
    sa.Column('model_hash', sa.String(length=64), nullable=False),
    sa.Column('base', sa.String(length=300), nullable=False),
    sa.Column('grouping', sa.String(length=20), nullable=False),
    sa.Column('kld_base', sa.Float(), nullable=False),
    sa.Column('calib_tokens', sa.Integer(), nullable=False),
    sa.Column('forward_passes', sa.Integer(), nullable=False),
    sa.Column('rows', sa.JSON(none_as_null=True), nullable=False),
    sa.Column('data', sa.JSON(none_as_null=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['contributor_id'], ['contributor.id'], ),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('experiment_id', 'arm', 'seed', 'contributor_id', 'model_hash', 'grouping',
                        name='uq_sensitivity_run')
    )
    op.create_index(op.f('ix_sensitivity_experiment_id'), 'sensitivity', ['experiment_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_sensitivity_experiment_id'), table_name='sensitivity')
    op.drop_table('sensitivity')
