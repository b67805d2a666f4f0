"""Tags contributors add to experiments registered by others, stored per contributor.

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('contributed_tag',
    sa.Column('experiment_id', sa.String(length=64), nullable=False),
    sa.Column('contributor_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['contributor_id'], ['contributor.id'], ),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('experiment_id', 'contributor_id', 'name')
    )


def downgrade() -> None:
    op.drop_table('contributed_tag')
