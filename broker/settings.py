"""Sentinel's settings: one pydantic-settings object, flags over ENCLOUD_SENTINEL_* over
defaults (docs/SENTINEL.md lists them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SentinelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLOUD_SENTINEL_", extra="forbid")

    state_dir: Path = Field(
        Path("sentinel-state"),
        description="Sentinel's folder: the SQLite database, the audit log and, by default, "
        "the KEK and the audit checkpoint key",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the key database (postgresql+psycopg://... for "
        "PostgreSQL); default: SQLite at STATE_DIR/sentinel.db",
    )
    kek_file: Path | None = Field(
        None,
        description="The key-encryption key (32 bytes, mode 0600); default STATE_DIR/kek. "
        "Keep it off the database's disk and backups",
    )
    audit_log: Path | None = Field(None, description="default STATE_DIR/audit.jsonl")
    audit_checkpoint_key: Path | None = Field(
        None,
        description="Ed25519 PEM signing the audit checkpoints; default "
        "STATE_DIR/audit-checkpoint.key",
    )
    owner_listen: str = Field("127.0.0.1:7443", description="the owner API's mutual-TLS address")
    workload_listen: str = Field(
        "127.0.0.1:7444",
        description="the workload API's address (TLS with tls_cert/tls_key; without, "
        "plaintext: everything on it is quote-bound or HPKE-sealed)",
    )
    tls_cert: Path | None = Field(None, description="Sentinel's TLS certificate chain (PEM)")
    tls_key: Path | None = Field(None, description="its private key (PEM)")
    client_ca: Path | None = Field(
        None,
        description="CA certificates (PEM) owners' client certificates chain to; an owner "
        "is then the one whose certificate's public key was pinned by `sentinel owner add`",
    )
    nonce_ttl_seconds: int = Field(60, ge=5, le=600, description="a challenge nonce's life")
    max_outstanding_nonces: int = Field(
        10_000,
        ge=1,
        description="challenge nonces live at once; more is RESOURCE_EXHAUSTED (the workload "
        "API is unauthenticated: this bounds what a caller can make Sentinel store)",
    )
    max_outstanding_nonces_per_peer: int = Field(
        64,
        ge=1,
        description="of those, at most this many one caller's (its IP address, an IPv6 "
        "one by its /64; behind a trusted proxy, the address it forwarded)",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="networks (CIDR) of proxies whose x-forwarded-for names the caller",
    )
    accept_dev_policies: bool = Field(
        False,
        description="accept release policies marked dev_only (trust on first use, e.g. a "
        "swtpm server's own): for development and tests, never in production",
    )
    max_workers: int = Field(32, ge=1, le=256, description="gRPC worker threads")

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'sentinel.db'}"

    def resolved_kek_file(self) -> Path:
        return self.kek_file or self.state_dir / "kek"

    def resolved_audit_log(self) -> Path:
        return self.audit_log or self.state_dir / "audit.jsonl"

    def resolved_checkpoint_key(self) -> Path:
        return self.audit_checkpoint_key or self.state_dir / "audit-checkpoint.key"
