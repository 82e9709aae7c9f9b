"""The first schema: owners, their signing keys, data keys and versions, nonces, used orders.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sentinel_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "owners",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("cert_spki_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "signing_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("owners.id"), nullable=False),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("owner_id", "fingerprint", name="uq_signing_keys_owner_fingerprint"),
    )
    op.create_table(
        "data_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(128), nullable=False, unique=True),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("owners.id"), nullable=False),
        sa.Column("policy", sa.LargeBinary, nullable=False),
        sa.Column("policy_sha256", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "data_key_versions",
        sa.Column("data_key", sa.Integer, sa.ForeignKey("data_keys.id"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "challenge_nonces",
        sa.Column("nonce", sa.LargeBinary, primary_key=True),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "used_orders",
        sa.Column("order_id", sa.LargeBinary, primary_key=True),
        sa.Column("data_key", sa.Integer, sa.ForeignKey("data_keys.id"), nullable=False),
        sa.Column("used_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "used_orders",
        "challenge_nonces",
        "data_key_versions",
        "data_keys",
        "signing_keys",
        "owners",
        "sentinel_settings",
    ):
        op.drop_table(table)
