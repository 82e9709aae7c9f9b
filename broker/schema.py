"""Sentinel's tables, as SQLAlchemy Core sees them (the queries of store.py). The schema
itself is made and changed only by the Alembic migrations in migrations/versions/; a test
checks the two agree."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

# Names of sentinel_settings rows.
KEK_CHECK = "kek_check"
IMPORT_SEED = "import_seed_wrapped"
IMPORT_PUBLIC = "import_public"

settings = Table(
    "sentinel_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    # Public values only: the KEK check value, the import key's suite and public key, and
    # its private key wrapped under the KEK.
    Column("value", LargeBinary, nullable=False),
)

owners = Table(
    "owners",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(63), nullable=False, unique=True),
    # Hex SHA-256 of the owner's client certificate's SubjectPublicKeyInfo.
    Column("cert_spki_sha256", String(64), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("owner_id", Integer, ForeignKey("owners.id"), nullable=False),
    Column("public_key", LargeBinary, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("owner_id", "fingerprint", name="uq_signing_keys_owner_fingerprint"),
)

keys = Table(
    "data_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(128), nullable=False, unique=True),
    Column("owner_id", Integer, ForeignKey("owners.id"), nullable=False),
    Column("policy", LargeBinary, nullable=False),
    Column("policy_sha256", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

key_versions = Table(
    "data_key_versions",
    metadata,
    Column("data_key", Integer, ForeignKey("data_keys.id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    # nonce || AES-256-GCM(KEK, key) with the key id and version as associated data.
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

nonces = Table(
    "challenge_nonces",
    metadata,
    Column("nonce", LargeBinary, primary_key=True),
    Column("expires_at", BigInteger, nullable=False),
    # Who it was issued to (protocol.peers.peer_key; revision 0003): each caller's share.
    Column("peer", String(80), nullable=False, server_default="", index=True),
)

used_orders = Table(
    "used_orders",
    metadata,
    # The order's 16-byte order id: a second use of it fails on this primary key.
    Column("order_id", LargeBinary, primary_key=True),
    Column("data_key", Integer, ForeignKey("data_keys.id"), nullable=False),
    Column("used_at", BigInteger, nullable=False),
    # The order's expires_at (revision 0002; NULL for rows from before it): a row past it is
    # pruned, since an expired order is refused before its id is looked at.
    Column("expires_at", BigInteger, nullable=True, index=True),
)

jobs = Table(
    "jobs",
    metadata,
    # The manifest's 16-byte job id (revision 0004).
    Column("job_id", LargeBinary, primary_key=True),
    Column("data_key", Integer, ForeignKey("data_keys.id"), nullable=False),
    Column("manifest_sha256", String(64), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    # "live" (a release is out), "paused" (the last release ended before the job did) or
    # "done" (never released again).
    Column("state", String(16), nullable=False),
    # The machine and start-up holding the live release: the AK's fingerprint, the TPM's
    # reset and restart counts, and how many start-ups its event log showed.
    Column("ak_fingerprint", String(64), nullable=False),
    Column("reset_count", BigInteger, nullable=False),
    Column("restart_count", BigInteger, nullable=False),
    Column("startups", Integer, nullable=False),
    Column("release_seq", Integer, nullable=False),
    # The newest key version of the live release: the one its end proof is made with.
    Column("proof_version", Integer, nullable=False),
    Column("records_done", BigInteger, nullable=False),
    Column("answers_sha256", String(64), nullable=True),
    Column("updated_at", BigInteger, nullable=False),
)

TABLES = (settings, owners, signing_keys, keys, key_versions, nonces, used_orders, jobs)
