"""Server start-up and shutdown: TPM, model, measurement, gRPC, health, metrics.

Order matters (docs/ATTESTATION.md, start-up): health is NOT_SERVING until the model is
verified and loaded, the TPM is open, and the workload is measured into the
workload PCR with its event log.

Shutdown on SIGTERM or SIGINT: health turns NOT_SERVING, the server stops
accepting calls, running calls get `shutdown_grace_seconds` to finish, the
rest are cancelled with a sealed CANCELLED final frame, every session's keys
are wiped, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from encloud.server import logs
from encloud.server.attestation.startup import AttestationConfig, start_attestation
from encloud.server.core import InferenceCore
from encloud.server.grpc_servicer import SERVICE_NAME, InferenceServicer, add_to_server
from encloud.server.inference.engine import Engine
from encloud.server.metrics import Metrics
from encloud.server.runtime_event import workload_events
from encloud.server.sessions import SessionStore
from encloud.server.settings import Settings

log = logging.getLogger("encloud.server")

# Streams cancelled at the end of the grace period get this long to seal their final frame.
FINAL_FRAME_MARGIN_SECONDS = 1.0


def attestation_config(settings: Settings) -> AttestationConfig:
    """The attestation side's plain configuration, taken from the one settings object."""
    return AttestationConfig(
        tcti=settings.tcti,
        tpm_timeout_seconds=settings.tpm_timeout_seconds,
        platform=settings.platform,
        state_dir=settings.state_dir,
        workload_pcr=settings.workload_pcr,
        pcr_selection=list(settings.pcr_selection),
        allow_resettable_workload_pcr=settings.allow_resettable_workload_pcr,
        ak_certificate_nv_index=settings.ak_certificate_nv_index,
        ak_certificate_chain_file=settings.ak_certificate_chain_file,
        hardware_certificate_chain_file=settings.hardware_certificate_chain_file,
        tsm_report_dir=settings.tsm_report_dir,
        dev_policy_path=settings.dev_policy_path,
        session_ttl_seconds=settings.session_ttl_seconds,
    )


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC channel arguments; docs/OPERATIONS.md explains each keepalive knob."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Ping idle connections so dead peers are found and their streams cancelled.
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        # Clients may ping this often without being told to go away (too_many_pings).
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            settings.keepalive_min_client_ping_interval_ms,
        ),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
    ]
    if settings.max_connection_age_ms is not None:
        options += [
            ("grpc.max_connection_age_ms", settings.max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_ms),
        ]
    return options


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the settings; None serves plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _sweep_sessions(service: InferenceCore, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        service.sweep()


async def serve(settings: Settings) -> None:
    logs.configure(settings.log_level)
    started = time.monotonic()
    metrics = Metrics()
    metrics_server: object | None = None
    metrics_address = ""
    if settings.metrics_port is not None:
        metrics_server, metrics_port = metrics.serve(settings.metrics_host, settings.metrics_port)
        metrics_address = f"{settings.metrics_host}:{metrics_port}"

    server = grpc.aio.server(options=server_options(settings))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer = InferenceServicer(metrics, trusted_proxies=settings.trusted_proxies)
    add_to_server(servicer, server)
    if settings.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    credentials = server_credentials(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # IPv6 literal
    bind = f"{host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(bind)
    else:
        port = server.add_secure_port(bind, credentials)
    await server.start()
    address = f"{host}:{port}"
    log.info(
        "listening, not serving yet",
        extra={"address": address, "tls": credentials is not None, "metrics": metrics_address},
    )

    engine = await asyncio.to_thread(
        Engine.load,
        settings.model_dir,
        threads=settings.threads,
        provider=settings.provider,
        max_batch=settings.max_batch,
        max_cohorts=settings.max_cohorts,
    )
    attestation = await asyncio.to_thread(
        start_attestation,
        attestation_config(settings),
        workload_events(settings, engine.model_digest, engine.facts()),
    )

    executor = ThreadPoolExecutor(
        max_workers=settings.generation_workers, thread_name_prefix="engine"
    )
    sessions = SessionStore(settings, metrics=metrics)
    service = InferenceCore(settings, attestation.attester, engine, sessions, executor, metrics)
    servicer.attach(service)
    sweeper = asyncio.create_task(_sweep_sessions(service, settings.session_sweep_interval_seconds))
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    if settings.ready_file is not None:
        ready = address + (f"\nmetrics={metrics_address}" if metrics_address else "")
        partial = settings.ready_file.with_name(settings.ready_file.name + ".tmp")
        partial.write_text(ready + "\n")
        partial.replace(settings.ready_file)  # atomic: a reader never sees half a file
    log.info(
        "serving",
        extra={
            "address": address,
            "model_digest": engine.model_digest.hex(),
            "workload_pcr": settings.workload_pcr,
            "records": len(attestation.attester.records),
            "seconds": round(time.monotonic() - started, 3),
        },
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    grace = settings.shutdown_grace_seconds
    log.info("draining", extra={"calls": service.running_calls, "grace_seconds": grace})
    await health_servicer.enter_graceful_shutdown()
    if settings.shutdown_notice_seconds:
        await asyncio.sleep(settings.shutdown_notice_seconds)
    # No new RPCs from here on; running ones are cancelled by gRPC after `grace`.
    stopping = asyncio.create_task(server.stop(grace))
    finished = await service.drain(max(grace - FINAL_FRAME_MARGIN_SECONDS, 0.0))
    if not finished:
        cancelled = service.cancel_all()
        log.info("grace period over, cancelling", extra={"calls": cancelled})
    await stopping
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper
    service.shutdown()
    executor.shutdown(wait=False, cancel_futures=True)
    engine.close()
    attestation.close()
    if metrics_server is not None:
        metrics_server.shutdown()  # type: ignore[attr-defined]
    log.info("stopped; session keys wiped")


def main() -> None:
    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
