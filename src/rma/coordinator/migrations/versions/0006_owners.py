"""owners: a worker's owner (rma worker join --owner) and a client key's (rma admin keys
create --owner)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("worker", "api_key"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column(
                    "owner",
                    sqlmodel.sql.sqltypes.AutoString(length=64),
                    nullable=False,
                    server_default="",
                )
            )


def downgrade() -> None:
    for table in ("api_key", "worker"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("owner")
