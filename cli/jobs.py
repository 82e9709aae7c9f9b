"""`encloud job`: the owner signs a job, anyone runs it, the owner opens its answers.

    encloud job sign --input IN.sealed --key KEY --model-digest HEX --output-name NAME
                     --signing-key ED25519.key [--params JSON] [--ttl S] -o MANIFEST.json
    encloud job run  --manifest MANIFEST.json --input IN.sealed -o ANSWERS.sealed
                     [--target HOST:PORT --ca --cert --key]
    encloud open ANSWERS.sealed --key KEY --manifest MANIFEST.json -o ANSWERS.jsonl

The input is `encloud seal` of a JSONL file, one chat request per line:
{"messages": [{"role": "user", "content": "..."}], "seed": 7}. Every mistake is one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from encloud.cli.options import add_target_args, channel_credentials


def cmd_sign(args: argparse.Namespace) -> int:
    """Sign a manifest for a sealed input: its digest and record count come from the file
    (opened with the owner's key, in memory, to count the records)."""
    from encloud.protocol import job, sealed_file

    try:
        model = bytes.fromhex(args.model_digest)
    except ValueError:
        model = b""
    if len(model) != 32:
        raise ValueError("--model-digest is 64 hex digits")
    try:
        params = job.check_params(json.loads(args.params))
    except ValueError as err:
        raise ValueError(f"--params is a JSON object of decoding parameters: {err}") from None
    key = sealed_file.read_key_file(args.key.read_bytes())
    signing = serialization.load_pem_private_key(args.signing_key.read_bytes(), None)
    if not isinstance(signing, Ed25519PrivateKey):
        raise ValueError(f"{args.signing_key} is not an Ed25519 private key")
    data = args.input.read_bytes()
    records, key_id = _count_records(data, key)
    manifest = job.new_manifest(
        key_id=key_id,
        model_digest=model,
        input_sha256=hashlib.sha256(data).digest(),
        records=records,
        output=args.output_name,
        params=params,
        ttl_seconds=args.ttl,
    )
    args.output.write_bytes(job.sign_manifest(manifest, signing))
    print(
        f"job {manifest.job_id.hex()}: {records} records under key id {key_id}, answers to "
        f"{manifest.output}, expires at {manifest.expires_at} -> {args.output}"
    )
    return 0


def _count_records(sealed: bytes, key: bytes) -> tuple[int, str]:
    """The input's record count (each one checked to be a chat request) and its key id."""
    import io

    from encloud.protocol import job
    from encloud.protocol.sealed_file import OpenedStream

    opened = OpenedStream(io.BytesIO(sealed), key)
    count = 0
    partial = b""
    for plaintext in opened:
        *lines, partial = (partial + plaintext).split(b"\n")
        for line in lines:
            if line.strip():
                job.parse_record(line, count)
                count += 1
    if partial.strip():
        job.parse_record(partial, count)
        count += 1
    if count == 0:
        raise ValueError("the sealed input holds no records")
    return count, opened.header.key_id


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or resume) a job on a server; the answers file appears only once it is whole."""
    from encloud.cli.main import _replacing
    from encloud.client.jobs import JobClient, JobProgress

    def show(progress: JobProgress) -> None:
        print(
            f"job: {progress.records_done}/{progress.records_total} records, "
            f"{progress.completion_tokens} tokens",
            file=sys.stderr,
        )

    manifest = args.manifest.read_bytes()
    with (
        JobClient(args.target, credentials=channel_credentials(args)) as client,
        open(args.input, "rb") as source,
        _replacing(args.output) as sink,
    ):
        result = client.run(manifest, source, sink, show)
    resumed = f" ({result.records_resumed} from an earlier call)" if result.records_resumed else ""
    print(
        f"job done: {result.records} records{resumed}, {result.completion_tokens} tokens, "
        f"answers sha256 {result.answers_sha256.hex()} -> {args.output}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    jobs = sub.add_parser("job", help="confidential batch jobs: sign a job, run it")
    job_sub = jobs.add_subparsers(dest="job_command", required=True)
    sign = job_sub.add_parser("sign", help="sign a job manifest for a sealed JSONL input")
    sign.add_argument("--input", type=Path, required=True, help="the sealed input (encloud seal)")
    sign.add_argument("--key", type=Path, required=True, help="its key file (to count records)")
    sign.add_argument("--model-digest", required=True, help="the model the job must run on")
    sign.add_argument("--output-name", required=True, help="the answers file's name")
    sign.add_argument("--signing-key", type=Path, required=True, help="Ed25519 PEM private key")
    sign.add_argument("--params", default="{}", help="decoding parameters as a JSON object")
    sign.add_argument("--ttl", type=int, default=3600, help="seconds the manifest stays valid")
    sign.add_argument("-o", "--output", type=Path, required=True, help="the manifest to write")
    sign.set_defaults(func=cmd_sign)
    run = job_sub.add_parser("run", help="run a signed job on a server, write its answers")
    run.add_argument("--manifest", type=Path, required=True, help="the signed manifest")
    run.add_argument("--input", type=Path, required=True, help="the sealed input")
    run.add_argument("-o", "--output", type=Path, required=True, help="the answers to write")
    add_target_args(run)
    run.set_defaults(func=cmd_run)
