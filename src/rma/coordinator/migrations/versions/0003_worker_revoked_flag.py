"""worker revoked flag: removed by the operator, as opposed to by the sweeper for silence

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("revoked", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # who removed the workers already removed is unknown: keep them out (a new token brings
    # them back), as before this revision
    op.execute(
        sa.text("UPDATE worker SET revoked = :yes WHERE status = 'removed'").bindparams(yes=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.drop_column("revoked")
