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
import socket
import sys
import time
from collections.abc import Sequence
from http.server import ThreadingHTTPServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from encloud.protocol.eventlog import ROLE_CHAT, ROLE_EMBEDDINGS
from encloud.protocol.faults import TpmUnavailableError
from encloud.server import config, logs
from encloud.server.attestation.startup import (
    AttestationConfig,
    AttestationRuntime,
    start_attestation,
)
from encloud.server.core import InferenceCore
from encloud.server.grpc_servicer import (
    JOB_SERVICE_NAME,
    SERVICE_NAME,
    InferenceServicer,
    JobServicer,
    add_to_server,
)
from encloud.server.inference.embedder import Embedder
from encloud.server.inference.engine import Engine
from encloud.server.inference.manifest import ModelIntegrityError
from encloud.server.jobs import JobConfig, JobRunner, SentinelLink
from encloud.server.metrics import Metrics
from encloud.server.runtime_event import load_embedder, load_engine, workload_events
from encloud.server.sessions import SessionStore
from encloud.server.settings import Settings

log = logging.getLogger("encloud.server")

# Streams cancelled at the end of the grace period get this long to seal their final frame.
FINAL_FRAME_MARGIN_SECONDS = 1.0


def job_runner(settings: Settings, service: InferenceCore) -> JobRunner:
    """The job runner, its folders and its link to Sentinel from the settings."""
    jobs_dir = settings.jobs_dir or settings.state_dir / "jobs"
    config = JobConfig(
        jobs_dir=jobs_dir,
        outbox_dir=settings.job_outbox_dir or jobs_dir / "outbox",
        concurrency=settings.job_concurrency,
        max_input_bytes=settings.max_job_input_bytes,
        max_running_jobs=settings.max_running_jobs,
    )
    sentinel = None
    if settings.sentinel_address:
        ca = settings.sentinel_ca_file.read_bytes() if settings.sentinel_ca_file else None
        sentinel = SentinelLink(settings.sentinel_address, ca, settings.sentinel_timeout_seconds)
    return JobRunner(
        config, settings, sentinel, service.prepare_job_release, service.generate_for_job
    )


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
        # gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind and
        # share its connections. Off: a taken port fails the start.
        ("grpc.so_reuseport", 0),
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


class StartupError(RuntimeError):
    """The server cannot start; the message is one line naming the setting to fix."""


def preflight(settings: Settings) -> None:
    """What can be checked before anything starts, each failure one StartupError."""
    if not settings.serve_chat and settings.embeddings_model_dir is None:
        raise StartupError(
            "nothing to serve: --no-serve-chat (ENCLOUD_SERVE_CHAT=false) needs "
            "--embeddings-model DIR (ENCLOUD_EMBEDDINGS_MODEL_DIR)"
        )
    if settings.serve_chat and not (settings.model_dir / "manifest.json").is_file():
        raise StartupError(
            f"no exported model at {settings.model_dir} (--model / ENCLOUD_MODEL_DIR): "
            "export one with `encloud export-model` and point the server at the folder it prints"
        )
    embeddings = settings.embeddings_model_dir
    if embeddings is not None and not (embeddings / "manifest.json").is_file():
        raise StartupError(
            f"no exported embedding model at {embeddings} (--embeddings-model / "
            "ENCLOUD_EMBEDDINGS_MODEL_DIR): export one with `encloud export-embeddings-model` "
            "and point the server at the folder it prints"
        )
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "sentinel_ca_file"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise StartupError(f"{name} (ENCLOUD_{name.upper()}): no file at {path}")
    if settings.provider == "cuda":
        from encloud.server.inference.engine import cuda_available

        if not cuda_available():
            raise StartupError(
                "provider cuda (--provider / ENCLOUD_PROVIDER): this machine has no usable "
                "CUDA device or runtime; use --provider cpu"
            )


# A sealed EMBED_RESPONSE beyond its vector block: fields, length prefix, padding to 1 KiB,
# nonce and tag, the SealedMessage and EmbedResponse framing.
EMBED_RESPONSE_OVERHEAD = 2048


def check_embed_response_fits(settings: Settings, dimension: int) -> None:
    """The largest Embed answer (embed_max_texts rows: the last bucket) must fit in one gRPC
    message, or every request of that bucket would fail after the model ran."""
    largest = settings.embed_max_texts * dimension * 4 + EMBED_RESPONSE_OVERHEAD
    if largest > settings.max_message_bytes:
        raise StartupError(
            f"embed_max_texts {settings.embed_max_texts} (ENCLOUD_EMBED_MAX_TEXTS) x "
            f"{dimension} dimensions needs responses of {largest} bytes, above "
            f"max_message_bytes {settings.max_message_bytes} (ENCLOUD_MAX_MESSAGE_BYTES): "
            "lower the first or raise the second"
        )


class _Started:
    """What a start-up has brought up so far: a failed start stops exactly that, and the
    shutdown stops it all."""

    def __init__(self) -> None:
        self.metrics_server: ThreadingHTTPServer | None = None
        self.metrics_address = ""
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.health: health.aio.HealthServicer | None = None
        self.servicer: InferenceServicer | None = None
        self.jobs: JobServicer | None = None
        self.engine: Engine | None = None
        self.embedder: Embedder | None = None
        self.attestation: AttestationRuntime | None = None

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
        if self.engine is not None:
            self.engine.close()
        if self.embedder is not None:
            self.embedder.close()
        if self.attestation is not None:
            self.attestation.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


def _bind(server: grpc.aio.Server, settings: Settings) -> str:
    """Bind the gRPC port; the address (host:port) it listens on."""
    credentials = server_credentials(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # IPv6 literal
    bind = f"{host}:{settings.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(bind)
        else:
            port = server.add_secure_port(bind, credentials)
    except RuntimeError:
        raise StartupError(
            f"cannot listen on {bind} (--host/--port, ENCLOUD_HOST/ENCLOUD_PORT): the address "
            "is taken or not this machine's"
        ) from None
    return f"{host}:{port}"


async def _start(settings: Settings, started: _Started, metrics: Metrics) -> None:
    """Metrics, gRPC (NOT_SERVING), the engine, the TPM: each recorded in `started` as it
    comes up. The preflight checks ran before (run())."""
    if settings.metrics_port is not None:
        try:
            started.metrics_server, metrics_port = metrics.serve(
                settings.metrics_host, settings.metrics_port
            )
        except OSError as err:
            raise StartupError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
                f"(ENCLOUD_METRICS_HOST/ENCLOUD_METRICS_PORT): {err.strerror}"
            ) from None
        started.metrics_address = f"{settings.metrics_host}:{metrics_port}"

    server = started.server = grpc.aio.server(options=server_options(settings))
    started.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(started.health, server)
    await _set_health(started.health, health_pb2.HealthCheckResponse.NOT_SERVING)
    replica = settings.replica_name or socket.gethostname()
    started.servicer = InferenceServicer(
        metrics, trusted_proxies=settings.trusted_proxies, replica=replica
    )
    started.jobs = JobServicer(metrics, replica=replica)
    add_to_server(started.servicer, server, started.jobs)
    if settings.reflection:
        from encloud.server import reflection

        reflection.enable(server, (SERVICE_NAME, JOB_SERVICE_NAME, health.SERVICE_NAME))
    started.address = _bind(server, settings)
    await server.start()
    log.info(
        "listening, not serving yet",
        extra={
            "address": started.address,
            "tls": settings.tls_cert_file is not None,
            "metrics": started.metrics_address,
        },
    )
    models: dict[str, bytes] = {}
    if settings.serve_chat:
        try:
            engine = started.engine = await asyncio.to_thread(load_engine, settings)
        except ModelIntegrityError as err:
            raise StartupError(f"the model folder does not verify (--model): {err}") from None
        models[ROLE_CHAT] = engine.model_digest
    try:
        embedder = started.embedder = await asyncio.to_thread(load_embedder, settings)
    except ModelIntegrityError as err:
        raise StartupError(
            f"the embedding model folder does not verify (--embeddings-model): {err}"
        ) from None
    if embedder is not None:
        check_embed_response_fits(settings, embedder.dimension)
        models[ROLE_EMBEDDINGS] = embedder.model_digest
    events = workload_events(
        settings,
        models,
        started.engine.facts() if started.engine is not None else None,
        embedder.facts() if embedder is not None else None,
    )
    try:
        started.attestation = await asyncio.to_thread(
            start_attestation, attestation_config(settings), events
        )
    except TpmUnavailableError:
        raise StartupError(
            f"cannot reach the TPM at TCTI {settings.tcti!r} (--tpm / ENCLOUD_TCTI); for a "
            "simulator run `encloud tpm start --state DIR` and use the TCTI it prints"
        ) from None


async def serve(settings: Settings) -> None:
    """Start, serve until SIGTERM or SIGINT, drain, stop. A failed start stops what it had
    started (gRPC, metrics, the engine, the TPM) and raises StartupError or the error."""
    logs.configure(settings.log_level, access_log=settings.access_log)
    began = time.monotonic()
    metrics = Metrics()
    started = _Started()
    try:
        await _start(settings, started, metrics)
    except BaseException:
        await started.stop()
        raise
    server, health_servicer, servicer = started.server, started.health, started.servicer
    engine, embedder, attestation = started.engine, started.embedder, started.attestation
    assert server and health_servicer and servicer and attestation

    sessions = SessionStore(settings, metrics=metrics)
    service = InferenceCore(
        settings, attestation.attester, engine, sessions, metrics, embedder=embedder
    )
    servicer.attach(service)
    runner = job_runner(settings, service)
    assert started.jobs is not None
    started.jobs.attach(runner)
    sweeper = asyncio.create_task(_sweep_sessions(service, settings.session_sweep_interval_seconds))
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    if settings.ready_file is not None:
        extra = f"\nmetrics={started.metrics_address}" if started.metrics_address else ""
        partial = settings.ready_file.with_name(settings.ready_file.name + ".tmp")
        partial.write_text(started.address + extra + "\n")
        partial.replace(settings.ready_file)  # atomic: a reader never sees half a file
    log.info(
        "serving",
        extra={
            "address": started.address,
            "model_digest": engine.model_digest.hex() if engine else "",
            "embeddings_model_digest": embedder.model_digest.hex() if embedder else "",
            "workload_pcr": settings.workload_pcr,
            "records": len(attestation.attester.records),
            "seconds": round(time.monotonic() - began, 3),
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
    started.server = None  # stopped above, with its grace
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper
    await runner.close()
    service.shutdown()
    await started.stop()  # the engine, the TPM, metrics
    log.info("stopped; session keys wiped")


def run(argv: Sequence[str] = (), prog: str = "encloud serve") -> int:
    """The server's command line: settings from flags, ENCLOUD_* and a config file. Every
    foreseeable mistake is one line on stderr and exit code 2 (a setting) or 1 (start-up);
    `--debug` adds the traceback."""
    try:
        settings, debug = config.parse(argv, prog)
    except config.SettingsError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    try:
        preflight(settings)  # before logging is set up: a plain one-line mistake
        asyncio.run(serve(settings))
    except StartupError as err:
        if debug:
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:], prog="python -m encloud.server.app"))


if __name__ == "__main__":
    main()
