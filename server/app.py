"""Server start-up and shutdown: TPM, model, measurement, gRPC, health.

Order matters (DESIGN.md step 1): health is NOT_SERVING until the model is
verified and loaded, the TPM is open, and the workload is measured into the
workload PCR with its event log.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from encloud.client.eventlog import EVENT_MODEL, EVENT_RUNTIME, WorkloadEvent, canonical_json
from encloud.client.v1 import encloud_pb2_grpc as pb_grpc
from encloud.server import logs
from encloud.server.attestation.startup import start_attestation
from encloud.server.inference.engine import Engine
from encloud.server.service import InferenceService
from encloud.server.servicer import InferenceServicer
from encloud.server.sessions import SessionStore
from encloud.server.settings import Settings

log = logging.getLogger("encloud.server")

SERVICE_NAME = "encloud.v1.InferenceService"


def workload_events(engine: Engine) -> list[WorkloadEvent]:
    return [
        WorkloadEvent(EVENT_MODEL, engine.model_digest),
        WorkloadEvent(EVENT_RUNTIME, canonical_json(engine.runtime_event())),
    ]


def _server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Ping idle clients so dead peers free their sessions' streams.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Accept client pings every 10 s or more, even without active calls.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def serve(settings: Settings) -> None:
    logs.configure(settings.log_level)
    started = time.monotonic()
    server = grpc.aio.server(options=_server_options(settings))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer = InferenceServicer()
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    address = f"{settings.host}:{port}"
    log.info("listening, not serving yet", extra={"address": address})

    engine = await asyncio.to_thread(
        Engine.load, settings.model_dir, threads=settings.threads, provider=settings.provider
    )
    attestation = await asyncio.to_thread(start_attestation, settings, workload_events(engine))

    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="engine")
    service = InferenceService(
        settings, attestation.attester, engine, SessionStore(settings), executor
    )
    servicer.attach(service)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if settings.ready_file is not None:
        settings.ready_file.write_text(address)
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
    log.info("draining")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=10.0)
    service.shutdown()
    executor.shutdown(wait=False, cancel_futures=True)
    attestation.close()
    log.info("stopped; session keys wiped")


def main() -> None:
    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
