"""Jobs: one row per job manifest Sentinel released a key for, holding which machine and
start-up has the live release, so that a job runs once and resumes only after a restart.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.LargeBinary, primary_key=True),
        sa.Column("data_key", sa.Integer, sa.ForeignKey("data_keys.id"), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("ak_fingerprint", sa.String(64), nullable=False),
        sa.Column("reset_count", sa.BigInteger, nullable=False),
        sa.Column("restart_count", sa.BigInteger, nullable=False),
        sa.Column("startups", sa.Integer, nullable=False),
        sa.Column("release_seq", sa.Integer, nullable=False),
        sa.Column("proof_version", sa.Integer, nullable=False),
        sa.Column("records_done", sa.BigInteger, nullable=False),
        sa.Column("answers_sha256", sa.String(64), nullable=True),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("jobs")
