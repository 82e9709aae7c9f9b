"""Command-line pieces every client command shares: the target, TLS files, and a parser whose
mistakes are one line (no usage dump, no traceback)."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path
from typing import NoReturn

import grpc


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (`--help` still shows usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def version() -> str:
    try:
        return importlib.metadata.version("encloud")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def target(value: str) -> str:
    """host:port, or [v6]:port; a target without a port would silently dial 443."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or host.endswith(":") or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not host:port (the port is required)")
    return value


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return number


def add_target_args(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    kwargs = {"required": True} if required else {"default": "127.0.0.1:50051"}
    parser.add_argument("--target", type=target, help="server host:port", **kwargs)  # type: ignore[arg-type]
    parser.add_argument("--ca", type=Path, help="PEM CA certificates of a TLS server")
    parser.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key", type=Path, help="PEM private key of --cert")


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --ca/--cert/--key; None (plaintext) when none is given.
    A missing file raises OSError, which the command reports as one line."""
    if (args.cert is None) != (args.key is None):
        raise ValueError("give --cert and --key together")
    if args.ca is None and args.cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=args.ca.read_bytes() if args.ca else None,
        private_key=args.key.read_bytes() if args.key else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None,
    )
