"""Assembles Sentinel from its settings and serves it (`encloud sentinel serve`)."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy.engine import Engine

from encloud.broker.kek import KekError, KeyWrapper, create_kek_file, load_kek, rotate_kek
from encloud.broker.service import Sentinel
from encloud.broker.servicer import OwnerServicer, WorkloadServicer, generic_handler
from encloud.broker.settings import SentinelSettings
from encloud.broker.store import Store, make_engine, migrate
from encloud.protocol.audit import AuditLog, generate_key_files, load_private_key

log = logging.getLogger("encloud.sentinel")


class SentinelStartError(RuntimeError):
    """Sentinel cannot start as configured (the message says why, in one line)."""


@dataclass
class RunningSentinel:
    server: grpc.Server
    sentinel: Sentinel
    engine: Engine
    owner_port: int
    workload_port: int
    health: health.HealthServicer

    def stop(self, grace: float = 5.0) -> None:
        """Health turns NOT_SERVING, calls in flight get `grace` seconds, then all closes."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.sentinel.audit.close()
        self.engine.dispose()


def init_state(settings: SentinelSettings) -> list[str]:
    """Create what a new Sentinel needs: the KEK, the audit checkpoint key, the schema.
    Never overwrites a KEK. Returns what it created, in words."""
    created = []
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    kek = settings.resolved_kek_file()
    if not kek.exists():
        create_kek_file(kek)
        created.append(f"KEK {kek} (mode 0600)")
    key = settings.resolved_checkpoint_key()
    if not key.exists():
        generate_key_files(key, key.with_suffix(".pub"))
        created.append(f"audit checkpoint key {key}")
    engine = make_engine(settings.resolved_database_url())
    try:
        migrate(engine)
    finally:
        engine.dispose()
    created.append("the database schema at its newest revision")
    return created


def rotate(settings: SentinelSettings, new_kek_file: Path) -> int:
    """Rewrap every key from the settings' KEK to the one in `new_kek_file` (created, mode
    0600, when missing), then move the new file over the old one. Stop every Sentinel on the
    database first: one left running refuses (KEK_ROTATED) until restarted."""
    old_file = settings.resolved_kek_file()
    old = KeyWrapper(load_kek(old_file))
    if not new_kek_file.exists():
        create_kek_file(new_kek_file)
    new = KeyWrapper(load_kek(new_kek_file))
    if new.check_value == old.check_value:
        raise KekError("the new KEK is the current one")
    engine = make_engine(settings.resolved_database_url())
    try:
        migrate(engine)
        try:
            count = rotate_kek(Store(engine), old, new)
        except ValueError as err:
            raise KekError(str(err)) from None
    finally:
        engine.dispose()
    new_kek_file.replace(old_file)
    return count


def build(settings: SentinelSettings) -> tuple[Sentinel, Engine]:
    """The KEK first (no KEK, no start), then the database (migrated), then the audit log."""
    wrapper = KeyWrapper(load_kek(settings.resolved_kek_file()))
    engine = make_engine(settings.resolved_database_url())
    try:
        migrate(engine)
        checkpoint_key = settings.resolved_checkpoint_key()
        audit = AuditLog(
            settings.resolved_audit_log(),
            checkpoint_key=load_private_key(checkpoint_key) if checkpoint_key.exists() else None,
        )
        sentinel = Sentinel(
            Store(engine, kek_check=wrapper.check_value),
            wrapper,
            audit,
            nonce_ttl_seconds=settings.nonce_ttl_seconds,
            max_outstanding_nonces=settings.max_outstanding_nonces,
            max_outstanding_nonces_per_peer=settings.max_outstanding_nonces_per_peer,
            accept_dev_policies=settings.accept_dev_policies,
        )
    except BaseException:
        engine.dispose()
        raise
    return sentinel, engine


def _owner_credentials(settings: SentinelSettings) -> grpc.ServerCredentials:
    files = (settings.tls_cert, settings.tls_key, settings.client_ca)
    if any(path is None for path in files):
        raise SentinelStartError(
            "the owner API needs mutual TLS: set tls_cert, tls_key and client_ca"
        )
    cert, key, ca = (path.read_bytes() for path in files)  # type: ignore[union-attr]
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def _listen(
    server: grpc.Server, setting: str, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC's "Failed to bind": in use, or not an address of this host
        raise SentinelStartError(
            f"cannot listen on {address} ({setting}): in use or not an address here"
        ) from None


def start(settings: SentinelSettings) -> RunningSentinel:
    owner_credentials = _owner_credentials(settings)
    sentinel, engine = build(settings)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_workers))
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_generic_rpc_handlers(
        (
            generic_handler(OwnerServicer(sentinel), "OwnerService"),
            generic_handler(
                WorkloadServicer(sentinel, settings.trusted_proxies), "WorkloadService"
            ),
        )
    )
    try:
        owner_port = _listen(server, "owner_listen", settings.owner_listen, owner_credentials)
        workload_credentials = (
            grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
            )
            if settings.tls_cert and settings.tls_key
            else None
        )
        workload_port = _listen(
            server, "workload_listen", settings.workload_listen, workload_credentials
        )
    except BaseException:
        server.stop(None)
        sentinel.audit.close()
        engine.dispose()
        raise
    server.start()
    for service in ("", "encloud.sentinel.v1.OwnerService", "encloud.sentinel.v1.WorkloadService"):
        checker.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "sentinel serving",
        extra={
            "address": f"{settings.owner_listen} (owners), {settings.workload_listen} (workloads)"
        },
    )
    return RunningSentinel(server, sentinel, engine, owner_port, workload_port, checker)


def serve(settings: SentinelSettings) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    running = start(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"sentinel: owner API on port {running.owner_port} (mutual TLS), "
        f"workload API on port {running.workload_port}",
        flush=True,
    )
    stop.wait()
    running.stop()
