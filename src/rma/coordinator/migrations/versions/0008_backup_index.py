"""backup index: data services' backups listed in the database (their bytes in a backup store,
the data dir or S3), so that every coordinator on it sees them

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backup",
        sa.Column("service", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("worker_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("worker", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("location", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
        sa.PrimaryKeyConstraint("service", "id"),
    )
    with op.batch_alter_table("backup", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_backup_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("backup", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_backup_created_at"))
    op.drop_table("backup")
