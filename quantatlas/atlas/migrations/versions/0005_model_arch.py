"""The architecture of the model a run set ran on (issue 27: findings across architectures): the
model's family as its config names it (`qwen3`, `llama`, `qwen3_moe`, ...). Run sets stored before
have none (NULL): the atlas reads them as of unknown architecture.

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('run_set') as batch:
        batch.add_column(sa.Column('model_arch', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('run_set') as batch:
        batch.drop_column('model_arch')
