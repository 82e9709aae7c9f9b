"""Where the server's settings come from, highest first: `encloud serve` flags, ENCLOUD_*
variables, a TOML config file (`--config FILE` or ENCLOUD_CONFIG_FILE), the defaults.

Every field of `Settings` is a flag (`port` is `--port`, `model_dir` is `--model-dir` or
`--model`); `--help` lists each with its variable and default. A bad value is reported as one
line naming the flag and the variable, never as a pydantic traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource

from encloud.server.settings import Settings

CONFIG_FILE_ENV = "ENCLOUD_CONFIG_FILE"
# Short names for the flags people type most.
FLAG_ALIASES = {
    "model_dir": ("--model",),
    "embeddings_model_dir": ("--embeddings-model",),
    "tcti": ("--tpm",),
    "tls_cert_file": ("--tls-cert",),
    "tls_key_file": ("--tls-key",),
    "tls_client_ca_file": ("--tls-client-ca",),
}


class SettingsError(ValueError):
    """A setting that is missing, unknown or invalid; the message is one line for the user."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return f"ENCLOUD_{name.upper()}"


def _is_bool(name: str) -> bool:
    return Settings.model_fields[name].annotation in (bool, "bool")


def _is_list(name: str) -> bool:
    annotation = Settings.model_fields[name].annotation
    return typing.get_origin(annotation) is list or str(annotation).startswith("list")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --debug, and one flag per settings field (default None: not given)."""
    parser.add_argument(
        "--config",
        type=Path,
        help=f"TOML file of settings by field name (port = 50051); [env {CONFIG_FILE_ENV}]",
    )
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "none" if default is None else default
        text = f"{field.description} [env {env_name(name)}; default {shown}]".replace("%", "%%")
        names = (flag(name), *FLAG_ALIASES.get(name, ()))
        if _is_bool(name):
            parser.add_argument(
                *names, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            metavar = "LIST" if _is_list(name) else name.rsplit("_", 1)[-1].upper()
            parser.add_argument(*names, dest=name, default=None, metavar=metavar, help=text)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (lists as JSON or comma-separated)."""
    given: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        if _is_list(name) and isinstance(value, str):
            text = value.strip()
            value = (
                json.loads(text)
                if text.startswith("[")
                else [v.strip() for v in text.split(",") if v.strip()]
            )
        given[name] = value
    return given


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SettingsError(f"config file {path} is not readable TOML: {err}") from None
    unknown = sorted(set(values) - set(Settings.model_fields))
    if unknown:
        raise SettingsError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return values


def load_settings(
    overrides: Mapping[str, Any] | None = None, config_file: Path | None = None
) -> Settings:
    """Flags (`overrides`) over ENCLOUD_* over the config file over the defaults."""
    path = config_file or (
        Path(os.environ[CONFIG_FILE_ENV]) if CONFIG_FILE_ENV in os.environ else None
    )
    file_values = read_config_file(path) if path is not None else {}

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    try:
        layered = _Layered(**dict(overrides or {}))
    except ValidationError as err:
        raise SettingsError(describe_validation_error(err)) from None
    return Settings.model_construct(**layered.model_dump())


def describe_validation_error(err: ValidationError) -> str:
    """One line: each bad setting by its flag and variable, with pydantic's reason."""
    parts = []
    for problem in err.errors():
        name = str(problem["loc"][0]) if problem["loc"] else ""
        message = problem["msg"].removeprefix("Value error, ")
        if name in Settings.model_fields:
            parts.append(f"{flag(name)} / {env_name(name)}: {message}")
        elif name:
            parts.append(f"unknown setting {name!r} ({env_name(name)}?)")
        else:
            parts.append(message)
    return "; ".join(parts)


def parse(argv: Sequence[str], prog: str = "encloud serve") -> tuple[Settings, bool]:
    """(settings, debug) from the command line and the environment; SettingsError on a bad
    value (argparse itself exits 2 on an unknown flag)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description="Run the encloud server. Every setting is a flag, an ENCLOUD_* variable "
        "or a key of the --config TOML file (flags win, then variables, then the file).",
    )
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    try:
        overrides = overrides_from(args)
    except json.JSONDecodeError as err:
        raise SettingsError(f"a list flag is not valid JSON: {err}") from None
    return load_settings(overrides, args.config), bool(args.debug)
