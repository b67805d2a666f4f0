"""Initial ledger schema: experiments, tags, arms, run sets, runs, metrics, verdicts,
reproductions, duplicate flags, environments, contributors (see quantatlas/atlas/models.py).

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('contributor',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('environment',
    sa.Column('key', sa.String(length=32), nullable=False),
    sa.Column('device', sa.String(length=300), nullable=True),
    sa.Column('hostname', sa.String(length=300), nullable=True),
    sa.Column('git_commit', sa.String(length=100), nullable=True),
    sa.Column('python', sa.String(length=50), nullable=True),
    sa.Column('platform', sa.String(length=300), nullable=True),
    sa.Column('packages', sa.JSON(), nullable=True),
    sa.Column('full', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('experiment',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('spec_hash', sa.String(length=64), nullable=True),
    sa.Column('family_hash', sa.String(length=64), nullable=True),
    sa.Column('title', sa.Text(), nullable=False),
    sa.Column('hypothesis', sa.Text(), nullable=False),
    sa.Column('notes', sa.Text(), nullable=True),
    sa.Column('model', sa.String(length=300), nullable=True),
    sa.Column('control', sa.String(length=200), nullable=True),
    sa.Column('spec', sa.JSON(), nullable=True),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('imported', sa.JSON(), nullable=True),
    sa.Column('contributor_id', sa.Integer(), nullable=True),
    sa.Column('merged_into', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('result', sa.String(length=20), nullable=True),
    sa.Column('confidence', sa.Float(), nullable=True),
    sa.Column('verdict_stamp', sa.String(length=100), nullable=True),
    sa.ForeignKeyConstraint(['contributor_id'], ['contributor.id'], ),
    sa.ForeignKeyConstraint(['merged_into'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_experiment_created_at', 'experiment', ['created_at'], unique=False)
    op.create_index('ix_experiment_family_hash', 'experiment', ['family_hash'], unique=False)
    op.create_index('ix_experiment_model', 'experiment', ['model'], unique=False)
    op.create_index('ix_experiment_spec_hash', 'experiment', ['spec_hash'], unique=False)

    op.create_table('arm',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('experiment_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=True),
    sa.Column('is_control', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('experiment_id', 'name')
    )
    op.create_index('ix_arm_experiment_id', 'arm', ['experiment_id'], unique=False)

    op.create_table('duplicate_flag',
    sa.Column('experiment_id', sa.String(length=64), nullable=False),
    sa.Column('other_id', sa.String(length=64), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.ForeignKeyConstraint(['other_id'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('experiment_id', 'other_id')
    )
    op.create_table('run_set',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('experiment_id', sa.String(length=64), nullable=False),
    sa.Column('environment_key', sa.String(length=32), nullable=False),
    sa.Column('contributor_id', sa.Integer(), nullable=False),
    sa.Column('model_hash', sa.String(length=128), nullable=False),
    sa.Column('eval_fingerprint', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['contributor_id'], ['contributor.id'], ),
    sa.ForeignKeyConstraint(['environment_key'], ['environment.key'], ),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('experiment_id', 'environment_key', 'contributor_id', 'model_hash', 'eval_fingerprint')
    )
    op.create_index('ix_run_set_experiment_id', 'run_set', ['experiment_id'], unique=False)

    op.create_table('tag',
    sa.Column('experiment_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('experiment_id', 'name')
    )
    op.create_index('ix_tag_name', 'tag', ['name'], unique=False)

    op.create_table('verdict',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('experiment_id', sa.String(length=64), nullable=False),
    sa.Column('arm', sa.String(length=200), nullable=False),
    sa.Column('control', sa.String(length=200), nullable=True),
    sa.Column('result', sa.String(length=20), nullable=False),
    sa.Column('p_value', sa.Float(), nullable=True),
    sa.Column('p_adjusted', sa.Float(), nullable=True),
    sa.Column('effect', sa.Float(), nullable=True),
    sa.Column('ci_low', sa.Float(), nullable=True),
    sa.Column('ci_high', sa.Float(), nullable=True),
    sa.Column('confidence', sa.Float(), nullable=True),
    sa.Column('bits_delta', sa.Float(), nullable=True),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('experiment_id', 'arm')
    )
    op.create_index('ix_verdict_experiment_id', 'verdict', ['experiment_id'], unique=False)

    op.create_table('reproduction',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('experiment_id', sa.String(length=64), nullable=False),
    sa.Column('run_set_id', sa.Integer(), nullable=False),
    sa.Column('arm', sa.String(length=200), nullable=False),
    sa.Column('result', sa.String(length=20), nullable=False),
    sa.Column('agrees', sa.Boolean(), nullable=False),
    sa.Column('independent', sa.Boolean(), nullable=False),
    sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.ForeignKeyConstraint(['run_set_id'], ['run_set.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('experiment_id', 'run_set_id', 'arm')
    )
    op.create_index('ix_reproduction_experiment_id', 'reproduction', ['experiment_id'], unique=False)

    op.create_table('run',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('arm_id', sa.Integer(), nullable=False),
    sa.Column('run_set_id', sa.Integer(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('n_tokens', sa.Integer(), nullable=True),
    sa.Column('per_token_kld', sa.LargeBinary(), nullable=True),
    sa.Column('per_token_sha256', sa.String(length=64), nullable=True),
    sa.Column('extra', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['arm_id'], ['arm.id'], ),
    sa.ForeignKeyConstraint(['run_set_id'], ['run_set.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('arm_id', 'run_set_id', 'seed')
    )
    op.create_index('ix_run_arm_id', 'run', ['arm_id'], unique=False)
    op.create_index('ix_run_run_set_id', 'run', ['run_set_id'], unique=False)

    op.create_table('metric',
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('nonfinite', sa.String(length=8), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], ),
    sa.PrimaryKeyConstraint('run_id', 'name')
    )


def downgrade() -> None:
    op.drop_table('metric')
    op.drop_index('ix_run_run_set_id', table_name='run')
    op.drop_index('ix_run_arm_id', table_name='run')

    op.drop_table('run')
    op.drop_index('ix_reproduction_experiment_id', table_name='reproduction')

    op.drop_table('reproduction')
    op.drop_index('ix_verdict_experiment_id', table_name='verdict')

    op.drop_table('verdict')
    op.drop_index('ix_tag_name', table_name='tag')

    op.drop_table('tag')
    op.drop_index('ix_run_set_experiment_id', table_name='run_set')

    op.drop_table('run_set')
    op.drop_table('duplicate_flag')
    op.drop_index('ix_arm_experiment_id', table_name='arm')

    op.drop_table('arm')
    op.drop_index('ix_experiment_spec_hash', table_name='experiment')
    op.drop_index('ix_experiment_model', table_name='experiment')
    op.drop_index('ix_experiment_family_hash', table_name='experiment')
    op.drop_index('ix_experiment_created_at', table_name='experiment')

    op.drop_table('experiment')
    op.drop_table('environment')
    op.drop_table('contributor')
