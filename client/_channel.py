"""What every program that dials an encloud server needs before the channel: a target with
its port, and TLS credentials from PEM files (the CLI and the proxy both use these)."""

from __future__ import annotations

from pathlib import Path

import grpc


def require_port(target: str) -> str:
    """`target` if it is host:port or [v6]:port; ValueError otherwise (without a port gRPC
    would silently dial 443)."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or host.endswith(":") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{target!r} is not host:port (the port is required)")
    return target


def tls_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS (with `ca`) or mutual TLS (with `cert` and `key`) credentials from PEM files; None,
    plaintext, when none is given. OSError for a missing file; ValueError for a certificate
    without its key or a key without its certificate."""
    if (cert is None) != (key is None):
        raise ValueError("give --cert and --key together")
    if ca is None and cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def open_channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    """A blocking channel to `target`: TLS with `credentials`, plaintext without."""
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)
