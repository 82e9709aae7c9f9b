"""Used orders carry their order's expiry, so rows past it can be pruned: an expired order is
refused before its id is looked at, so forgetting it changes no decision.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows from before this revision get NULL: their expiry is unknown, so they are kept.
    with op.batch_alter_table("used_orders") as table:
        table.add_column(sa.Column("expires_at", sa.BigInteger, nullable=True))
        table.create_index("ix_used_orders_expires_at", ["expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("used_orders") as table:
        table.drop_index("ix_used_orders_expires_at")
        table.drop_column("expires_at")
