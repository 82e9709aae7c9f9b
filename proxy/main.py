"""`encloud proxy`: settings (flags over ENCLOUD_PROXY_* variables), checks, and the server.

    encloud proxy --target HOST:PORT --policy policy.json [--listen 127.0.0.1:8080]

Every mistake is one line and a non-zero exit (docs/PROXY.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from prometheus_client import start_http_server
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from encloud.client import require_port, tls_credentials
from encloud.protocol.audit import AuditLog
from encloud.protocol.errors import EncloudError
from encloud.protocol.policy import load_policy
from encloud.proxy.app import LOOPBACK_NAMES, Proxy, ProxyMetrics, Safety, build_app, is_loopback
from encloud.proxy.pool import SessionPool

log = logging.getLogger("encloud.proxy")


class ProxySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLOUD_PROXY_", extra="forbid")

    listen: str = Field("127.0.0.1:8080", description="host:port the proxy listens on.")
    target: str = Field(..., description="The encloud server (or its load balancer), host:port.")
    policy: Path = Field(..., description="The verification policy (JSON).")
    ca: Path | None = Field(None, description="PEM CA certificates of a TLS server.")
    cert: Path | None = Field(None, description="PEM client certificate (mutual TLS).")
    key: Path | None = Field(None, description="PEM private key of cert.")
    audit_log: Path = Field(
        Path(".encloud/proxy-audit.jsonl"), description="Every attestation outcome goes here."
    )
    token: SecretStr | None = Field(
        None, description="Require 'Authorization: Bearer TOKEN' (needed off loopback)."
    )
    allow_remote: bool = Field(
        False, description="Allow a non-loopback listen address (needs a token)."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Host header names accepted beside loopback ones."
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="Origins accepted (none by default: no browser use)."
    )
    sessions: int = Field(4, ge=1, le=64, description="Attested sessions in the pool.")
    streams_per_session: int = Field(
        4, ge=1, le=64, description="Requests at once per session (the server's limit)."
    )
    request_timeout: float = Field(300.0, gt=0, description="Deadline of one request, seconds.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus port.")
    log_level: str = Field("INFO", description="Python logging level.")


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {listen!r} is not host:port")
    return host.strip("[]"), int(port)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse(argv: Sequence[str]) -> ProxySettings:
    parser = _Parser(prog="encloud proxy", description=__doc__.split("\n\n")[0])
    for name, field in ProxySettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"ENCLOUD_PROXY_{name.upper()}"
        text = f"{field.description} [env {env}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=text)
        elif name in ("allowed_hosts", "allowed_origins"):
            parser.add_argument(flag[:-1], dest=name, action="append", help=text + " (repeat)")
        else:
            parser.add_argument(flag, dest=name, default=None, help=text)
    args = parser.parse_args(list(argv))
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return ProxySettings(**given)
    except ValidationError as err:
        problem = err.errors()[0]
        name = str(problem["loc"][0]) if problem["loc"] else ""
        where = f"--{name.replace('_', '-')} / ENCLOUD_PROXY_{name.upper()}: " if name else ""
        raise ValueError(where + problem["msg"]) from None


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, stopping on SIGTERM/SIGINT and returning (uvicorn re-raises the signal
        once it has stopped, so the process would die of it: exit 0 is what a drained proxy
        reports)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.handle_exit, signum, None)
            yield

    return Server


async def serve(settings: ProxySettings) -> None:
    import uvicorn

    _Server = _server_class()

    try:
        require_port(settings.target)
    except ValueError as err:
        raise ValueError(f"--target {err}") from None
    host, port = _split(settings.listen)
    if not is_loopback(host) and not settings.allow_remote:
        raise ValueError(f"{host} is not loopback: add --allow-remote (and a --token)")
    if not is_loopback(host) and settings.token is None:
        raise ValueError("a non-loopback listen address needs --token")
    policy = load_policy(settings.policy)
    credentials = tls_credentials(settings.ca, settings.cert, settings.key)
    audit = AuditLog(settings.audit_log)
    pool = SessionPool(
        settings.target,
        policy,
        audit,
        sessions=settings.sessions,
        streams_per_session=settings.streams_per_session,
        credentials=credentials,
        timeout=settings.request_timeout,
    )
    metrics = ProxyMetrics()
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr="127.0.0.1", registry=metrics.registry)
    safety = Safety(
        allowed_hosts=LOOPBACK_NAMES | frozenset(settings.allowed_hosts),
        allowed_origins=frozenset(settings.allowed_origins),
        token=settings.token.get_secret_value() if settings.token else None,
    )

    async def shutdown() -> None:
        await pool.close()  # EndSession for each: the server wipes the keys; ours go too
        audit.close()
        log.info("stopped; sessions ended, keys wiped")

    app = build_app(Proxy(pool, metrics), safety, shutdown)
    # log_config=None: uvicorn's own lines go through the JSON format set up in run().
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,
    )
    server = _Server(config)
    await server.serve()


def run(argv: Sequence[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format='{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", '
        '"message": "%(message)s"}',
    )
    try:
        settings = parse(argv)
        asyncio.run(serve(settings))
    except (ValueError, EncloudError) as err:
        print(f"encloud proxy: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"encloud proxy: {err.strerror or err}: {err.filename or ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
