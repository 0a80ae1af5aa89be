"""worker verification: verified and disagreement counts, agreement streak, quarantine

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.add_column(sa.Column("verified", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("disagreements", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("verify_streak", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("quarantined", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.drop_column("quarantined")
        batch_op.drop_column("verify_streak")
        batch_op.drop_column("disagreements")
        batch_op.drop_column("verified")
