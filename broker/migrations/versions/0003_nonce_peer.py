"""Challenge nonces name the caller they were issued to, so each caller gets a share of the
live nonces (max_outstanding_nonces_per_peer) and no one caller can take them all.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nonces live a minute: any from before this revision count for no peer and soon expire.
    with op.batch_alter_table("challenge_nonces") as table:
        table.add_column(sa.Column("peer", sa.String(80), nullable=False, server_default=""))
        table.create_index("ix_challenge_nonces_peer", ["peer"])


def downgrade() -> None:
    with op.batch_alter_table("challenge_nonces") as table:
        table.drop_index("ix_challenge_nonces_peer")
        table.drop_column("peer")
