"""Command-line pieces every client command shares: the target, TLS files, and a parser whose
mistakes are one line (no usage dump, no traceback)."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path
from typing import NoReturn

import grpc

from encloud.client import require_port, tls_credentials


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
    """host:port, or [v6]:port (encloud.client.require_port), as an argparse type."""
    try:
        return require_port(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
    return tls_credentials(args.ca, args.cert, args.key)
