"""`encloud sentinel`: run the key broker, administer it, and use it as an owner.

    encloud sentinel init|serve|migrate [settings flags]         (the operator, on its host)
    encloud sentinel owner add NAME --cert OWNER.pem [settings]    (the operator)
    encloud sentinel rotate-kek --new-kek-file NEW [settings]      (the operator, Sentinel stopped)
    encloud sentinel signing-key add --public ED25519.pub  [owner connection flags]
    encloud sentinel key create|rotate|revoke|list ...     [owner connection flags]
    encloud sentinel audit [--after SEQ]                   [owner connection flags]
    encloud sentinel order sign --key-id K --model-digest HEX --ttl S --signing-key ED25519.key

Every mistake is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

# --- settings flags (the operator's commands) -------------------------------------------------


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    from encloud.broker.settings import SentinelSettings

    for name, field in SentinelSettings.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=f"setting_{name}", help=field.description
        )


def _settings(args: argparse.Namespace) -> Any:
    from encloud.broker.settings import SentinelSettings

    given = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    return SentinelSettings(**given)


def cmd_init(args: argparse.Namespace) -> int:
    from encloud.broker.app import init_state

    for line in init_state(_settings(args)):
        print(f"sentinel: created {line}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from encloud.broker.app import serve
    from encloud.server.logs import configure  # the server's JSON logs: whitelisted fields only

    settings = _settings(args)
    configure("INFO")
    # Alembic says which migration runs at INFO, as %-templates our JSON log would not fill.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    serve(settings)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from encloud.broker.store import make_engine, migrate, schema_revision

    settings = _settings(args)
    engine = make_engine(settings.resolved_database_url())
    try:
        migrate(engine)
        current, _ = schema_revision(engine)
    finally:
        engine.dispose()
    print(f"sentinel: the database is at schema revision {current}")
    return 0


def cmd_rotate_kek(args: argparse.Namespace) -> int:
    from encloud.broker.app import rotate

    settings = _settings(args)
    count = rotate(settings, args.new_kek_file)
    print(
        f"sentinel: {count} key version(s) and the import key rewrapped under the new KEK, "
        f"now {settings.resolved_kek_file()}; restart every Sentinel on this database"
    )
    return 0


def cmd_owner_add(args: argparse.Namespace) -> int:
    from encloud.broker.servicer import certificate_spki_sha256
    from encloud.broker.store import Store, make_engine, migrate
    from encloud.protocol.key_broker import check_owner_name

    name = check_owner_name(args.name)
    fingerprint = certificate_spki_sha256(args.cert.read_bytes())
    engine = make_engine(_settings(args).resolved_database_url())
    try:
        migrate(engine)
        Store(engine).add_owner(name, fingerprint)
    finally:
        engine.dispose()
    print(
        f"sentinel: owner {name} added (certificate key sha256 {fingerprint}); key ids {name}/..."
    )
    return 0


# --- owner commands ---------------------------------------------------------------------------


def _add_owner_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sentinel", required=True, help="the owner API, HOST:PORT")
    parser.add_argument("--ca", type=Path, required=True, help="CA of Sentinel's certificate")
    parser.add_argument("--cert", type=Path, required=True, help="this owner's certificate")
    parser.add_argument("--cert-key", type=Path, required=True, help="its private key (PEM)")


def _owner(args: argparse.Namespace) -> Any:
    from encloud.client.sentinel import OwnerClient

    return OwnerClient(
        args.sentinel,
        ca_pem=args.ca.read_bytes(),
        cert_pem=args.cert.read_bytes(),
        key_pem=args.cert_key.read_bytes(),
    )


def _print_key(info: Any) -> None:
    from encloud.client.sentinel import key_info_json

    print(key_info_json([info]))


def _read_key(path: Path) -> bytes:
    from encloud.protocol.sealed_file import read_key_file

    return read_key_file(path.read_bytes())


def cmd_signing_key_add(args: argparse.Namespace) -> int:
    public = serialization.load_pem_public_key(args.public.read_bytes())
    if not isinstance(public, Ed25519PublicKey):
        raise ValueError(f"{args.public} is not an Ed25519 public key")
    with _owner(args) as client:
        print(client.add_signing_key(public.public_bytes_raw()))
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    with _owner(args) as client:
        _print_key(client.create_key(args.key_id, args.policy.read_bytes(), _read_key(args.key)))
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    with _owner(args) as client:
        _print_key(client.rotate_key(args.key_id, _read_key(args.key)))
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    with _owner(args) as client:
        _print_key(client.revoke_key(args.key_id))
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    from encloud.client.sentinel import key_info_json

    with _owner(args) as client:
        text = key_info_json(client.list_keys())
    if text:
        print(text)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with _owner(args) as client:
        for entry in client.read_audit(args.after):
            print(json.dumps(entry, sort_keys=True))
    return 0


def cmd_order_sign(args: argparse.Namespace) -> int:
    from encloud.protocol.release_order import new_order, sign_order

    key = serialization.load_pem_private_key(args.signing_key.read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{args.signing_key} is not an Ed25519 private key")
    try:
        digest = bytes.fromhex(args.model_digest)
    except ValueError:
        raise ValueError("--model-digest is 64 hex digits") from None
    if len(digest) != 32:
        raise ValueError("--model-digest is 64 hex digits")
    order = new_order(args.key_id, digest, args.ttl)
    args.output.write_bytes(sign_order(order, key))
    print(f"order {order.order_id.hex()} for {order.key_id}, expires at {order.expires_at}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="encloud sentinel", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("init", cmd_init, "create the KEK, the audit checkpoint key and the schema"),
        ("serve", cmd_serve, "serve the owner and workload APIs until SIGTERM"),
        ("migrate", cmd_migrate, "bring the database schema to the newest revision"),
    ):
        command = sub.add_parser(name, help=text)
        _add_settings_flags(command)
        command.set_defaults(func=func)

    rotate = sub.add_parser(
        "rotate-kek", help="rewrap every key under a new KEK (stop Sentinel first)"
    )
    rotate.add_argument(
        "--new-kek-file",
        type=Path,
        required=True,
        help="the new KEK (created, mode 0600, if missing); it replaces kek_file when done",
    )
    _add_settings_flags(rotate)
    rotate.set_defaults(func=cmd_rotate_kek)

    owner = sub.add_parser("owner", help="the operator registers owners").add_subparsers(
        dest="owner_command", required=True
    )
    add = owner.add_parser("add", help="pin an owner's client certificate under a name")
    add.add_argument("name", help="the owner's name: its key ids start with NAME/")
    add.add_argument("--cert", type=Path, required=True, help="the owner's client certificate")
    _add_settings_flags(add)
    add.set_defaults(func=cmd_owner_add)

    signing = sub.add_parser("signing-key", help="release-order signing keys").add_subparsers(
        dest="signing_command", required=True
    )
    sadd = signing.add_parser("add", help="register an Ed25519 public key (PEM)")
    sadd.add_argument("--public", type=Path, required=True)
    _add_owner_flags(sadd)
    sadd.set_defaults(func=cmd_signing_key_add)

    key = sub.add_parser("key", help="this owner's data keys").add_subparsers(
        dest="key_command", required=True
    )
    create = key.add_parser("create", help="register a data key with its release policy")
    create.add_argument("key_id")
    create.add_argument("--policy", type=Path, required=True, help="the release policy (JSON)")
    create.add_argument("--key", type=Path, required=True, help="the key file (encloud seal's)")
    rotate = key.add_parser("rotate", help="add a version with new material")
    rotate.add_argument("key_id")
    rotate.add_argument("--key", type=Path, required=True, help="the new key file")
    revoke = key.add_parser("revoke", help="revoke for good (the material is deleted)")
    revoke.add_argument("key_id")
    listing = key.add_parser("list", help="this owner's keys, as JSON lines")
    for command, func in (
        (create, cmd_key_create),
        (rotate, cmd_key_rotate),
        (revoke, cmd_key_revoke),
        (listing, cmd_key_list),
    ):
        _add_owner_flags(command)
        command.set_defaults(func=func)

    audit = sub.add_parser("audit", help="this owner's audit entries, as JSON lines")
    audit.add_argument("--after", type=int, default=0, help="only entries with a higher seq")
    _add_owner_flags(audit)
    audit.set_defaults(func=cmd_audit)

    order = sub.add_parser("order", help="release orders").add_subparsers(
        dest="order_command", required=True
    )
    sign = order.add_parser("sign", help="sign a single-use release order")
    sign.add_argument("--key-id", required=True)
    sign.add_argument("--model-digest", required=True, help="the model it may run (64 hex)")
    sign.add_argument("--ttl", type=int, default=3600, help="seconds it stays valid")
    sign.add_argument("--signing-key", type=Path, required=True, help="Ed25519 private key PEM")
    sign.add_argument("-o", "--output", type=Path, required=True)
    sign.set_defaults(func=cmd_order_sign)
    return parser


def main(argv: list[str]) -> int:
    from pydantic import ValidationError

    from encloud.broker.app import SentinelStartError
    from encloud.broker.kek import KekError
    from encloud.protocol.errors import EncloudError
    from encloud.protocol.faults import DomainError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KekError, SentinelStartError) as error:
        print(f"encloud sentinel: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        print(f"encloud sentinel: {where}: {first['msg']}", file=sys.stderr)
        return 2
    except (EncloudError, DomainError) as error:
        print(f"encloud sentinel: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        print(f"encloud sentinel: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"encloud sentinel: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
