"""Every setting of the server, in one place. Environment prefix: ENCLOUD_.

docs/CONFIGURATION.md lists each field; keep the two in step.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RESETTABLE_PCRS = frozenset({16, 23})


def _measured(why: str) -> dict[str, object]:
    """A setting measured into the attested runtime event, and why a client cares."""
    return {"measured": True, "why": why}


def _unmeasured(why: str) -> dict[str, object]:
    """A setting left out of the runtime event, and why that is safe."""
    return {"measured": False, "why": why}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLOUD_", extra="forbid")

    # --- network ---------------------------------------------------------------
    host: str = Field(
        "127.0.0.1",
        description="Address the gRPC server binds.",
        json_schema_extra=_unmeasured("where the server listens; clients see whom they reach"),
    )
    port: int = Field(
        50051,
        ge=0,
        le=65535,
        description="gRPC port; 0 picks a free one.",
        json_schema_extra=_unmeasured("where the server listens"),
    )
    ready_file: Path | None = Field(
        None,
        description="Once serving, the server writes its bound host:port here "
        "(for supervisors and tests that start it on port 0).",
        json_schema_extra=_unmeasured("a file for supervisors; changes nothing a client receives"),
    )
    max_message_bytes: int = Field(
        1 << 20,
        ge=4096,
        description="Largest gRPC message accepted or sent; a bigger one is RESOURCE_EXHAUSTED.",
        json_schema_extra=_measured("the largest request accepted: a limit every request meets"),
    )

    # --- TLS (the sealed envelope protects content; TLS protects metadata) -------
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain of the server. Set with tls_key_file to serve TLS; "
        "unset serves plaintext gRPC (loopback or behind a TLS-terminating proxy only).",
        json_schema_extra=_unmeasured(
            "transport security outside the envelope; the client sees the certificate itself"
        ),
    )
    tls_key_file: Path | None = Field(
        None,
        description="PEM private key of tls_cert_file (readable by the server only).",
        json_schema_extra=_unmeasured("transport security outside the envelope"),
    )
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA certificates of allowed callers. Set to require mutual TLS: "
        "a caller without a certificate from one of these CAs cannot connect.",
        json_schema_extra=_unmeasured(
            "who may connect, enforced by TLS, which the client sees itself"
        ),
    )

    # --- keepalive and HTTP/2 (grpc.keepalive_* channel arguments) --------------
    keepalive_time_ms: int = Field(
        60_000,
        ge=1000,
        description="The server pings a connection idle this long, so dead peers are found "
        "and their streams cancelled (grpc.keepalive_time_ms).",
        json_schema_extra=_unmeasured("connection housekeeping; no effect on answers or keys"),
    )
    keepalive_timeout_ms: int = Field(
        20_000,
        ge=1000,
        description="A ping not answered within this closes the connection "
        "(grpc.keepalive_timeout_ms).",
        json_schema_extra=_unmeasured("connection housekeeping; no effect on answers or keys"),
    )
    keepalive_min_client_ping_interval_ms: int = Field(
        10_000,
        ge=1000,
        description="Shortest interval between client pings the server accepts; faster "
        "pingers get GOAWAY (grpc.http2.min_ping_interval_without_data_ms).",
        json_schema_extra=_unmeasured("connection housekeeping"),
    )
    keepalive_permit_without_calls: bool = Field(
        True,
        description="Accept client keepalive pings on connections without active calls "
        "(grpc.keepalive_permit_without_calls).",
        json_schema_extra=_unmeasured("connection housekeeping"),
    )
    max_connection_age_ms: int | None = Field(
        None,
        ge=1000,
        description="Close connections older than this (with a grace of "
        "max_connection_age_grace_ms) so clients rebalance across replicas; unset: never. "
        "Sessions stay on their replica only behind a balancer that routes by the "
        "encloud-route header (docs/DEPLOY.md).",
        json_schema_extra=_unmeasured("connection rebalancing; sessions outlive connections"),
    )
    max_connection_age_grace_ms: int = Field(
        30_000,
        ge=0,
        description="Time a connection closed for its age has to finish calls.",
        json_schema_extra=_unmeasured("connection rebalancing"),
    )
    reflection: bool = Field(
        False,
        description="Serve gRPC server reflection (grpc.reflection.v1alpha), for grpcurl and "
        "debugging; it only describes the public .proto.",
        json_schema_extra=_unmeasured("describes only the public .proto"),
    )

    # --- observability -------------------------------------------------------------
    metrics_port: int | None = Field(
        9464,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (plain HTTP, its own port); "
        "0 picks a free one; unset turns metrics off.",
        json_schema_extra=_unmeasured(
            "where metrics are served; what they hold is fixed by the code (no sizes, no content)"
        ),
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics endpoint binds.",
        json_schema_extra=_unmeasured("where metrics are served"),
    )

    # --- TPM and measurement -----------------------------------------------------
    tcti: str = Field(
        "device:/dev/tpmrm0",
        description="TSS2 TCTI of the TPM: the CVM's vTPM, or swtpm:path=... in dev.",
        json_schema_extra=_unmeasured("which TPM: the quote and the AK trust path show it"),
    )
    state_dir: Path = Field(
        Path("/var/lib/encloud"),
        description="Folder of the workload event log (not secret; survives restarts).",
        json_schema_extra=_unmeasured(
            "where the event log is kept; the quote verifies the log itself"
        ),
    )
    workload_pcr: int = Field(
        15,
        ge=0,
        le=23,
        description="PCR the workload is measured into.",
        json_schema_extra=_unmeasured(
            "the quote shows which PCR holds the log, and the policy pins it"
        ),
    )
    pcr_selection: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15],
        description="SHA-256 PCRs every quote covers; must include the workload PCR. The default "
        "covers every boot PCR a production policy pins (firmware 0, 2; boot loader 4; Secure "
        "Boot 7; kernel, initrd and command line 8, 9, 11, 12) and 1, 3, 5, 6, 14.",
        json_schema_extra=_unmeasured("the quote shows the selection, and the policy pins it"),
    )
    platform: Literal["swtpm", "tpm", "azure", "gcp"] = Field(
        "tpm",
        description="Where the AK comes from: swtpm or a generic TPM (a primary ECC key "
        "under the endorsement hierarchy), or a cloud vTPM's provisioned AK.",
        json_schema_extra=_unmeasured(
            "the AK's trust path (pin, certificate chain, hardware report) shows it"
        ),
    )
    ak_certificate_nv_index: int | None = Field(
        None,
        description="NV index holding the AK certificate (DER), shipped in the evidence; "
        "for example 0x01C101D0 on Azure.",
        json_schema_extra=_unmeasured("the certificate is in the evidence and verified there"),
    )
    ak_certificate_chain_file: Path | None = Field(
        None,
        description="PEM file of intermediate certificates sent after the AK certificate.",
        json_schema_extra=_unmeasured("the chain is in the evidence and verified there"),
    )
    tsm_report_dir: Path | None = Field(
        None,
        description="configfs-tsm report folder (e.g. /sys/kernel/config/tsm/report); when "
        "set, every Attest ships a hardware report whose REPORT_DATA binds the session and "
        "the AK.",
        json_schema_extra=_unmeasured("the hardware report is in the evidence and verified there"),
    )
    hardware_certificate_chain_file: Path | None = Field(
        None,
        description="PEM chain of the hardware report's signer, leaf first (VCEK, ASK, ARK), "
        "shipped in the evidence.",
        json_schema_extra=_unmeasured("the chain is in the evidence and verified there"),
    )
    tpm_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest wait for one TPM command before UNAVAILABLE.",
        json_schema_extra=_unmeasured("how long to wait for the TPM; availability only"),
    )
    allow_resettable_workload_pcr: bool = Field(
        False,
        description="Dev only: allow PCR 16 or 23, which locality 0 can reset.",
        json_schema_extra=_unmeasured("the quote shows the workload PCR and the policy pins it"),
    )

    # --- model -------------------------------------------------------------------
    model_dir: Path = Field(
        Path("/opt/encloud/model"),
        description="Exported ONNX model folder with its manifest.json.",
        json_schema_extra=_unmeasured("a path; the model digest measures the model itself"),
    )
    serve_chat: bool = Field(
        True,
        description="Serve the chat model at model_dir (Infer, StreamInfer); false serves "
        "embeddings only (then embeddings_model_dir is required).",
        json_schema_extra=_unmeasured("the model events show which models are served"),
    )
    embeddings_model_dir: Path | None = Field(
        None,
        description="Exported embedding model folder (`encloud export-embeddings-model`); "
        "unset: no Embed (UNIMPLEMENTED, MODEL_NOT_SERVED).",
        json_schema_extra=_unmeasured("a path; its model event measures the model itself"),
    )
    embed_max_texts: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most texts in one Embed request; also the largest response bucket "
        "(responses are padded to 1, 8, 32 or this many vectors).",
        json_schema_extra=_measured("a limit every Embed request meets, and a response size"),
    )
    embed_max_tokens_per_text: int | None = Field(
        None,
        ge=3,
        description="Most tokens per Embed text (TEXT_TOO_LONG above, unless the request "
        "asks to truncate); unset: the model's own limit.",
        json_schema_extra=_measured("a limit every Embed text meets"),
    )
    embed_max_total_tokens: int = Field(
        16384,
        ge=2,
        description="Most tokens in all texts of one Embed request (after truncation).",
        json_schema_extra=_measured("a limit every Embed request meets"),
    )
    embed_batch_texts: int = Field(
        32,
        ge=1,
        le=256,
        description="Most texts the embedding model runs in one call, across requests.",
        json_schema_extra=_measured("batch shapes change the last bits of a vector"),
    )
    provider: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="ONNX Runtime provider. cuda needs onnxruntime-gpu "
        "(requirements/server-gpu.lock) and keeps the KV cache in device memory.",
        json_schema_extra=_measured(
            "CPU and CUDA kernels give different numerics, so different answers"
        ),
    )
    threads: int = Field(
        2,
        ge=1,
        le=256,
        description="Intra-op threads of the engine.",
        json_schema_extra=_measured(
            "the intra-op thread count changes reduction order, so answers can differ"
        ),
    )
    max_batch: int = Field(
        16,
        ge=1,
        le=64,
        description="Most concurrent streams the engine decodes in one batch.",
        json_schema_extra=_measured("batch shapes change the numerics of a request"),
    )
    prefill_chunk_tokens: int = Field(
        256,
        ge=16,
        le=8192,
        description="Prompt tokens prefilled per engine step, in all: a running stream waits "
        "at most one chunk between tokens, and a new prompt is prefilled this many tokens at "
        "a time.",
        json_schema_extra=_measured("chunk boundaries change the order of a prompt's sums"),
    )
    kv_budget_tokens: int = Field(
        16384,
        ge=256,
        description="KV cache budget: the most prompt + new tokens that admitted requests may "
        "come to hold, summed; a request that would pass it waits. Bounds the cache's memory "
        "(tokens x the model's bytes per token).",
        json_schema_extra=_measured("caps a request's prompt plus answer (PROMPT_TOO_LONG above)"),
    )
    stream_frame_interval_ms: int = Field(
        0,
        ge=0,
        le=2000,
        description="0: a StreamInfer FRAME as soon as text is ready (one per engine step). "
        "Above 0: frames on a fixed clock, one every this many ms, empty ones included, so the "
        "frames' number and timing show only the elapsed time, not the token count "
        "(docs/THREAT_MODEL.md).",
        json_schema_extra=_measured(
            "what an observer of the traffic learns (token count and timing, or elapsed time)"
        ),
    )
    engine_spinning: bool = Field(
        True,
        description="Let ONNX Runtime's intra-op threads spin between parallel sections "
        "(measured on 2 cores: a batch-1 decode step 8.9 ms spinning, 12.7-14.3 ms sleeping; "
        "an event-loop probe kept 62-67 % of its idle rate during a 1,000-token prefill "
        "spinning, 72-74 % sleeping). Off: more CPU left to the event loop, slower steps.",
        json_schema_extra=_unmeasured("thread scheduling only: the same sums in the same order"),
    )
    default_max_new_tokens: int = Field(
        256,
        ge=1,
        description="New tokens when a request asks for 0.",
        json_schema_extra=_measured("the length of an answer whose request asks for 0"),
    )
    max_new_tokens_limit: int = Field(
        2048,
        ge=1,
        description="Most new tokens a request may ask for (INVALID_ARGUMENT above).",
        json_schema_extra=_measured("a limit every request meets"),
    )
    max_stop_strings: int = Field(
        8,
        ge=0,
        le=64,
        description="Most stop strings in one request (INVALID_ARGUMENT above).",
        json_schema_extra=_measured("a limit every request meets"),
    )
    max_stop_string_chars: int = Field(
        64,
        ge=1,
        le=1024,
        description="Longest stop string, in characters.",
        json_schema_extra=_measured("a limit every request meets"),
    )
    max_stop_token_ids: int = Field(
        16,
        ge=0,
        le=256,
        description="Most stop token ids in one request.",
        json_schema_extra=_measured("a limit every request meets"),
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens in a templated prompt (PROMPT_TOO_LONG above); unset: the "
        "model's context length is the only limit.",
        json_schema_extra=_measured("a limit every request meets"),
    )
    max_queued_requests: int = Field(
        128,
        ge=1,
        description="Admission control: most Infer/StreamInfer calls waiting or running "
        "server-wide; beyond it RESOURCE_EXHAUSTED with RetryInfo.",
        json_schema_extra=_unmeasured(
            "load shedding: refused calls get RESOURCE_EXHAUSTED, nothing else changes"
        ),
    )

    # --- sessions ----------------------------------------------------------------
    session_ttl_seconds: int = Field(
        900,
        ge=10,
        le=86400,
        description="Absolute life of a session from its Attest reply (told to the client).",
        json_schema_extra=_measured("how long a released key may live in the server"),
    )
    session_idle_ttl_seconds: float = Field(
        300.0,
        gt=0,
        description="A bound session with no call for this long is dropped and its keys "
        "wiped; the client re-attests.",
        json_schema_extra=_measured("how long an unused key stays in the server's memory"),
    )
    session_sweep_interval_seconds: float = Field(
        1.0,
        gt=0,
        description="How often expired sessions are looked for and wiped.",
        json_schema_extra=_measured("how late an expired key may still be wiped"),
    )
    pending_session_ttl_seconds: int = Field(
        30,
        ge=1,
        description="Life of a session that has not received its key yet.",
        json_schema_extra=_measured("how long a session's private key waits for its release"),
    )
    max_sessions: int = Field(
        256,
        ge=1,
        description="Most sessions with a released key.",
        json_schema_extra=_unmeasured("a quota: availability only"),
    )
    max_pending_sessions: int = Field(
        64,
        ge=1,
        description="Most attested sessions still waiting for their key.",
        json_schema_extra=_unmeasured("a quota: availability only"),
    )
    max_pending_sessions_per_peer: int = Field(
        8,
        ge=1,
        description="Most sessions of one peer waiting for their key (well below the global "
        "quota, so one caller cannot take it from the others).",
        json_schema_extra=_unmeasured("a quota: availability only"),
    )
    max_sessions_per_peer: int = Field(
        32,
        ge=1,
        description="Most sessions with a released key per peer.",
        json_schema_extra=_unmeasured("a quota: availability only"),
    )
    max_queued_requests_per_peer: int = Field(
        32,
        ge=1,
        description="Most Infer/StreamInfer calls of one peer waiting or running at once.",
        json_schema_extra=_unmeasured("a quota: availability only"),
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks of reverse proxies whose x-forwarded-for names the "
        "peer (the last address they appended); ignored from anyone else.",
        json_schema_extra=_unmeasured("whose address keys the quotas; availability only"),
    )
    max_streams_per_session: int = Field(
        4,
        ge=1,
        description="Concurrent Infer/StreamInfer calls per session (RESOURCE_EXHAUSTED above).",
        json_schema_extra=_unmeasured("a quota: availability only"),
    )
    attest_rate_per_second: float = Field(
        20.0,
        gt=0,
        description="Per-peer (client IP) refill rate of Attest calls; Attest is "
        "unauthenticated and costs a TPM quote.",
        json_schema_extra=_unmeasured("a rate limit: availability only"),
    )
    attest_burst: int = Field(
        64,
        ge=1,
        description="Per-peer Attest calls allowed at once before the rate applies.",
        json_schema_extra=_unmeasured("a rate limit: availability only"),
    )
    end_session_grace_seconds: float = Field(
        5.0,
        ge=0,
        description="EndSession waits this long for the session's streams to seal their "
        "final frame before the keys go.",
        json_schema_extra=_measured(
            "how long keys stay after EndSession while streams seal their last frame"
        ),
    )

    # --- confidential batch jobs (docs/SENTINEL.md, "Jobs") ------------------------------
    sentinel_address: str | None = Field(
        None,
        description="host:port of Sentinel's workload API, where job keys come from. Unset: "
        "the server runs no jobs (JobService answers UNIMPLEMENTED).",
        json_schema_extra=_unmeasured(
            "where job keys come from; Sentinel verifies this server's quote, and a key from "
            "anywhere else does not open the owner's input"
        ),
    )
    sentinel_ca_file: Path | None = Field(
        None,
        description="PEM CA that Sentinel's workload API certificate chains to (TLS); unset: "
        "plaintext gRPC (the key travels HPKE-sealed to this server either way).",
        json_schema_extra=_unmeasured("transport security outside the HPKE-sealed key"),
    )
    sentinel_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Deadline of each call to Sentinel.",
        json_schema_extra=_unmeasured("how long a job waits for its key; no effect on answers"),
    )
    jobs_dir: Path | None = Field(
        None,
        description="Folder of running jobs' sealed spool and journal (default: "
        "state_dir/jobs). Nothing in it is in clear.",
        json_schema_extra=_unmeasured("where sealed job files wait; nothing in clear"),
    )
    job_outbox_dir: Path | None = Field(
        None,
        description="Folder the sealed answers files are written to, as <key owner>/<the "
        "manifest's output name> (default: jobs_dir/outbox).",
        json_schema_extra=_unmeasured("where sealed answers go; the manifest names the file"),
    )
    job_concurrency: int = Field(
        8,
        ge=1,
        le=256,
        description="Records of one job on the engine at once (batched with other requests).",
        json_schema_extra=_unmeasured(
            "how many records run at once; each record's answer does not depend on it"
        ),
    )
    max_running_jobs: int = Field(
        4,
        ge=1,
        le=1024,
        description="Jobs running at once; one more RunJob call is RESOURCE_EXHAUSTED "
        "(SERVER_BUSY, RetryInfo) until one ends.",
        json_schema_extra=_unmeasured("a quota: availability only"),
    )
    max_job_input_bytes: int = Field(
        1 << 30,
        ge=1,
        description="Largest sealed job input accepted (spooled to jobs_dir).",
        json_schema_extra=_unmeasured("a disk quota; refused inputs are never opened"),
    )

    # --- shutdown --------------------------------------------------------------------
    shutdown_notice_seconds: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM, health reports NOT_SERVING for this long while calls are "
        "still accepted, so load balancers stop routing here before the server refuses calls.",
        json_schema_extra=_unmeasured(
            "load-balancer notice at shutdown; keys are wiped at exit whatever it is"
        ),
    )
    shutdown_grace_seconds: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM: health turns NOT_SERVING, new calls are refused, running "
        "calls get this long to finish; the rest end with a sealed CANCELLED final frame.",
        json_schema_extra=_unmeasured(
            "time running calls get at shutdown; keys are wiped at exit whatever it is"
        ),
    )

    # --- dev ---------------------------------------------------------------------
    dev_policy_path: Path | None = Field(
        None,
        description="DEV ONLY, trust on first use: write a policy pinning this server's "
        "AK, PCRs, model and runtime here at start-up.",
        json_schema_extra=_unmeasured(
            "writes a DEV-ONLY policy file beside the server; changes nothing it serves"
        ),
    )
    replica_name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="This replica's name: in the access log, and (hashed) in the routing "
        "token a load balancer keeps sessions on this replica by. Unset: the host name.",
        json_schema_extra=_unmeasured(
            "names the replica for routing and logs; answers and keys do not depend on it"
        ),
    )
    access_log: bool = Field(
        True,
        description="One JSON line per RPC (method, status code, reason, seconds, replica); "
        "never a size, a token count, a session or request id, or a peer address.",
        json_schema_extra=_unmeasured(
            "what is logged is fixed by the code; this only turns it off"
        ),
    )
    log_level: str = Field(
        "INFO",
        description="Python logging level of the JSON logs.",
        json_schema_extra=_unmeasured(
            "no level logs content or sizes (the leak tests run at DEBUG)"
        ),
    )

    @model_validator(mode="after")
    def _check_pcrs(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set tls_cert_file and tls_key_file together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("mutual TLS (tls_client_ca_file) needs tls_cert_file")
        if self.workload_pcr not in self.pcr_selection:
            raise ValueError("pcr_selection must include workload_pcr")
        if self.workload_pcr in RESETTABLE_PCRS and not self.allow_resettable_workload_pcr:
            raise ValueError(
                f"PCR {self.workload_pcr} can be reset from locality 0; "
                "set allow_resettable_workload_pcr only in dev"
            )
        self.pcr_selection = sorted(set(self.pcr_selection))
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as err:
                raise ValueError(
                    f"trusted_proxies: {entry!r} is not an address or network"
                ) from err
        return self


def measurement_of(name: str) -> tuple[bool, str]:
    """(measured, why) of a settings field; KeyError when it is not classified."""
    extra = Settings.model_fields[name].json_schema_extra
    if not isinstance(extra, dict) or not isinstance(extra.get("measured"), bool):
        raise KeyError(f"setting {name} does not say whether it is measured")
    return bool(extra["measured"]), str(extra.get("why", ""))


def _json_value(value: object) -> object:
    """A value for canonical JSON, which holds no floats: a float as its decimal string."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def measured_settings(settings: Settings) -> dict[str, object]:
    """Every measured setting's value: the settings part of the runtime event."""
    return {
        name: _json_value(getattr(settings, name))
        for name in Settings.model_fields
        if measurement_of(name)[0]
    }


def configuration_markdown() -> str:
    """docs/CONFIGURATION.md, rendered from the fields above (a test keeps them equal)."""
    lines = [
        "# Configuration",
        "",
        "Every server setting, from `server/settings.py` (one pydantic-settings object).",
        "Set each as an environment variable with the prefix `ENCLOUD_`, for example",
        "`ENCLOUD_TCTI=device:/dev/tpmrm0`; lists are JSON (`ENCLOUD_PCR_SELECTION=[0,7,15]`).",
        "This file is generated: `python -m encloud.server.settings > docs/CONFIGURATION.md`.",
        "",
        "The measured column says whether the setting is part of the attested runtime event",
        "(docs/ATTESTATION.md): a client's policy pins its value, so changing it means a new",
        "policy. Each says why.",
        "",
        "| variable | default | meaning | measured |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(none)" if default is None else f"`{default}`"
        measured, why = measurement_of(name)
        lines.append(
            f"| `ENCLOUD_{name.upper()}` | {shown} | {field.description} "
            f"| {'**yes**' if measured else 'no'}: {why} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(configuration_markdown(), end="")
