"""worker verification: verified and disagreement counts, agreement streak, quarantine;
the credits ledger

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0005"
down_revision = "0004"
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
    op.create_table(
        "credit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("worker_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("service", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("amount", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_credit_ts"), "credit", ["ts"], unique=False)
    op.create_index(op.f("ix_credit_worker_id"), "credit", ["worker_id"], unique=False)
    op.create_index(op.f("ix_credit_key_id"), "credit", ["key_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_credit_key_id"), table_name="credit")
    op.drop_index(op.f("ix_credit_worker_id"), table_name="credit")
    op.drop_index(op.f("ix_credit_ts"), table_name="credit")
    op.drop_table("credit")
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.drop_column("quarantined")
        batch_op.drop_column("verify_streak")
        batch_op.drop_column("disagreements")
        batch_op.drop_column("verified")
