"""The `encloud` command line.

Client commands (attest, chat, embed, seal, open, verify, policy, audit, loadgen) need only the
client package; server commands (serve, export-model, export-embeddings-model, demo)
import the server package when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from encloud.cli.options import (
    OneLineParser,
    add_target_args,
    channel_credentials,
    positive_int,
    version,
)
from encloud.protocol.errors import EncloudError

if TYPE_CHECKING:
    from encloud.client import Client

# Relative to the folder the command runs in; printed (absolute) after every attestation.
DEFAULT_AUDIT_LOG = Path(".encloud/audit.jsonl")


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    add_target_args(parser)
    parser.add_argument("--policy", type=Path, required=True, help="policy JSON file")
    audit = parser.add_mutually_exclusive_group()
    audit.add_argument(
        "--audit-log",
        type=Path,
        default=DEFAULT_AUDIT_LOG,
        help=f"append every attestation outcome, pass or fail, here (default: {DEFAULT_AUDIT_LOG} "
        "in the current folder)",
    )
    audit.add_argument(
        "--no-audit", action="store_true", help="keep no audit log (not recommended)"
    )


def _audit_path(args: argparse.Namespace) -> Path | None:
    return None if args.no_audit else Path(args.audit_log).resolve()


def _say_audited(path: Path | None) -> None:
    where = f"appended to {path}" if path is not None else "not kept (--no-audit)"
    print(f"audit log: the attestation outcome was {where}", file=sys.stderr)


def print_summary(attestation: object, policy: object, out=None) -> None:
    """The verification summary a user reads before trusting the server (to `out`, by
    default the stdout of the moment: not the one at import time)."""
    out = sys.stdout if out is None else out
    a = attestation
    dev = getattr(policy, "dev_only", False)
    print("Attestation verified", file=out)
    print(f"  AK fingerprint (SHA-256 of SPKI): {a.ak_fingerprint}", file=out)  # type: ignore[attr-defined]
    print(
        f"  workload PCR {a.workload_pcr}: {a.workload_pcr_value.hex()}",  # type: ignore[attr-defined]
        file=out,
    )
    for role, digest in a.models.items():  # type: ignore[attr-defined]
        print(f"  {role} model digest: {digest.hex()}", file=out)
    print(f"  workload events replayed: {len(a.events)}", file=out)  # type: ignore[attr-defined]
    print("  outcome: PASS (every check of the policy)", file=out)
    for index, why in getattr(policy, "pcr_waivers", {}).items():
        print(f"  WAIVED by the policy: PCR {index} is not pinned ({why})", file=out)
    note = getattr(a, "trust_note", "")
    if note:
        print(f"  still trusted: {note}", file=out)
    if dev:
        print(
            "  WARNING: DEV-ONLY policy (trust on first use, written by the server itself)",
            file=out,
        )


def cmd_attest(args: argparse.Namespace) -> int:
    from encloud.client import NO_AUDIT, Client
    from encloud.protocol.audit import AuditLog, load_private_key
    from encloud.protocol.bundle import bundle_from_attempt, save_bundle
    from encloud.protocol.errors import VerificationError
    from encloud.protocol.policy import load_policy
    from encloud.protocol.verifier import format_report

    credentials = channel_credentials(args)
    policy = load_policy(args.policy)
    audit_path = _audit_path(args)
    audit: AuditLog | None = None
    if audit_path is not None:
        key = load_private_key(args.audit_checkpoint_key) if args.audit_checkpoint_key else None
        audit = AuditLog(audit_path, checkpoint_key=key, checkpoints_path=args.audit_checkpoints)
    try:
        with Client(
            args.target,
            policy,
            audit_log=audit if audit is not None else NO_AUDIT,
            credentials=credentials,
        ) as client:
            try:
                attestation = client.attest()
            except VerificationError:
                attestation = None
            attempt = client.last_attempt
    finally:
        if audit is not None:
            audit.close()
    assert attempt is not None
    _say_audited(audit_path)
    if args.report:
        print(format_report(attempt.report))
    if args.save is not None:
        bundle = bundle_from_attempt(attempt)
        save_bundle(args.save, bundle)
        print(f"evidence bundle ({bundle.outcome}) saved to {args.save}")
    if attempt.failure is not None:
        raise attempt.failure
    print_summary(attestation, policy)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import datetime

    from encloud.protocol.bundle import load_bundle, verify_bundle
    from encloud.protocol.policy import load_policy, policy_digest
    from encloud.protocol.verifier import format_report

    policy = load_policy(args.policy)
    bundle = load_bundle(args.bundle)
    attestation, report, error = verify_bundle(bundle, policy)
    print(format_report(report))
    when = datetime.datetime.fromtimestamp(bundle.time, datetime.UTC).isoformat()
    print(
        f"offline re-verification of evidence from {bundle.target} saved at {when}: "
        "freshness (the client's nonce inside the quote) was checked at attestation time, "
        "not now; this run re-checks every other check with no server and no network"
    )
    if policy_digest(policy) != bundle.policy_sha256:
        print("note: this policy differs from the one used at attestation time")
    if error is not None:
        raise error
    print_summary(attestation, policy)
    return 0


def cmd_policy_from_manifest(args: argparse.Namespace) -> int:
    from encloud.cli import reference

    if bool(args.runtime_event) == bool(args.compute_runtime):
        print("encloud: give --runtime-event FILE or --compute-runtime (one)", file=sys.stderr)
        return 2
    if not args.model_dir and not args.embeddings_model:
        print("encloud: name a chat model folder or --embeddings-model DIR", file=sys.stderr)
        return 2
    if args.compute_runtime and len(args.embeddings_model) > 1:
        print(
            "encloud: --compute-runtime loads one embedding model; give one --embeddings-model "
            "(or the runtime events with --runtime-event)",
            file=sys.stderr,
        )
        return 2
    embeddings = args.embeddings_model[0] if args.embeddings_model else None
    if args.runtime_event:
        events = [reference.runtime_event_from_file(p) for p in args.runtime_event]
    else:
        chat_dirs: list[Path | None] = list(args.model_dir) or [None]
        events = [reference.runtime_event_by_loading(d, embeddings) for d in chat_dirs]
    pinned = [reference.read_pinned_key(p) for p in args.ak_pin]
    roots = [der for p in args.ak_roots for der in reference.read_roots(p)]
    values = reference.read_pcr_values(args.pcr_values) if args.pcr_values else None
    policy = reference.policy_from_manifest(
        args.model_dir,
        events,
        embedding_model_dirs=args.embeddings_model,
        pinned_public_keys=pinned,
        certificate_roots=roots,
        pcr_values=values,
        pcr_selection=_int_list(args.pcr_selection),
        workload_pcr=args.workload_pcr,
        max_session_ttl_seconds=args.max_session_ttl,
    )
    _write_policy(args.output, policy)
    print(f"policy written to {args.output}")
    for digest in policy.allowed_model_digests:
        print(f"  model digest (recomputed from the files): {digest.hex()}")
    for digest in policy.allowed_embedding_model_digests:
        print(f"  embedding model digest (recomputed from the files): {digest.hex()}")
    for digest in policy.allowed_runtime_events:
        print(f"  runtime event SHA-256: {digest.hex()}")
    if not policy.pcr_values:
        print(
            "  WARNING: no PCR values pinned: firmware, boot chain and kernel are unchecked; "
            "add --pcr-values for production",
            file=sys.stderr,
        )
    return 0


def cmd_policy_from_image(args: argparse.Namespace) -> int:
    from encloud.cli import reference

    if not args.runtime_event:
        print("encloud: give --runtime-event FILE (the image's published event)", file=sys.stderr)
        return 2
    events = [reference.runtime_event_from_file(p) for p in args.runtime_event]
    pinned = [reference.read_pinned_key(p) for p in args.ak_pin]
    roots = [der for p in args.ak_roots for der in reference.read_roots(p)]
    policy = reference.policy_from_image(
        args.image_dir,
        events,
        args.firmware_reference,
        pinned_public_keys=pinned,
        certificate_roots=roots,
        max_session_ttl_seconds=args.max_session_ttl,
    )
    _write_policy(args.output, policy)
    print(f"policy written to {args.output}")
    for index, value in sorted(policy.pcr_values.items()):
        print(f"  PCR {index:2}: {value.hex()}")
    return 0


def cmd_policy_init(args: argparse.Namespace) -> int:
    from encloud.cli import reference
    from encloud.client import first_use_evidence

    reply = first_use_evidence(args.target, credentials=channel_credentials(args))
    policy, runtimes = reference.policy_from_evidence(
        reply.evidence,
        qualifying_data=reply.qualifying_data,
        ttl_seconds=reply.ttl_seconds,
        workload_pcr=args.workload_pcr,
    )
    _write_policy(args.output, policy)
    banner = "!" * 78
    print(
        f"{banner}\nWARNING: DEV-ONLY POLICY (trust on first use). It pins whatever the server at "
        f"{args.target}\nshowed about itself just now; it proves nothing to anyone else and must "
        "never be used\nin production. Use `encloud policy from-manifest` for reference values "
        f"that do not\ndepend on trusting the server.\n{banner}",
        file=sys.stderr,
    )
    print(f"dev-only policy written to {args.output}")
    for event in runtimes:
        print(f"  runtime event seen: {json.dumps(event, sort_keys=True)}")
    if args.runtime_event_out is not None:
        from encloud.protocol import eventlog

        # The log lists start-ups in order: the last runtime event is the running server's.
        records = eventlog.parse(reply.evidence.workload_event_log)
        last = [r.event.data for r in records if r.event.event_type == eventlog.EVENT_RUNTIME]
        args.runtime_event_out.write_bytes(last[-1])
        print(f"runtime event of this start-up written to {args.runtime_event_out}")
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    from encloud.protocol.policy import parse_policy, policy_digest, policy_problems

    try:
        data = Path(args.file).read_bytes()
    except OSError as err:
        print(f"encloud: cannot read {args.file}: {err.strerror}", file=sys.stderr)
        return 2
    problems = policy_problems(data)
    if not problems and args.production_except_hardware:
        from encloud.protocol.policy import production_gaps_except_hardware

        problems = production_gaps_except_hardware(parse_policy(data))
    if problems:
        print(f"{args.file}: NOT usable: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    policy = parse_policy(data)
    kind = "vTPM only" if policy.platform is None else policy.platform.kind
    mode = "production" if policy.production else "dev"
    if args.production_except_hardware and not policy.production:
        mode = "production (every rule but the hardware report's)"
    print(f"{args.file}: complete {mode} policy ({kind}), version {policy.version}")
    print(f"  digest: {policy_digest(policy).hex()}")
    print(
        f"  bank {policy.pcr_bank}, PCRs {list(policy.pcr_selection)}, workload PCR "
        f"{policy.workload_pcr}, pinned PCRs {sorted(policy.pcr_values)}"
    )
    print(
        f"  {len(policy.allowed_model_digests)} model digest(s), "
        f"{len(policy.allowed_runtime_events)} runtime event(s)"
    )
    print(
        f"  AK: {len(policy.pinned_public_keys)} pinned key(s), "
        f"{len(policy.certificate_roots)} certificate root(s)"
    )
    print(f"  longest session TTL accepted: {policy.max_session_ttl_seconds} s")
    if policy.dev_only:
        print("  WARNING: dev_only: trust on first use, never for production", file=sys.stderr)
    for index, why in policy.pcr_waivers.items():
        print(f"  WAIVED: PCR {index} is not pinned: {why}")
    if policy.gce is not None:
        print(f"  GCE identity pinned: {policy.gce.to_obj()}")
    if not policy.pcr_values:
        print("  WARNING: no PCR values pinned", file=sys.stderr)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from encloud.protocol.audit import load_public_key, verify_log

    if (args.checkpoints is None) != (args.public_key is None):
        print("encloud: --checkpoints and --public-key go together", file=sys.stderr)
        return 2
    key = load_public_key(args.public_key) if args.public_key else None
    result = verify_log(args.log, args.checkpoints, key)
    print(f"{args.log}: OK: {result.summary()}")
    return 0


def cmd_audit_keygen(args: argparse.Namespace) -> int:
    from encloud.protocol.audit import generate_key_files

    generate_key_files(args.private, args.public)
    print(
        f"checkpoint key written to {args.private} (keep it away from the log), "
        f"public key to {args.public}"
    )
    return 0


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from encloud.protocol.audit import AuditLog, load_private_key

    log = AuditLog(
        args.log, checkpoint_key=load_private_key(args.key), checkpoints_path=args.checkpoints
    )
    record = log.checkpoint()
    if record is None:
        print("the log is empty: nothing to sign")
    else:
        print(f"checkpoint of entry {record['seq']} written to {log.checkpoints_path}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of PCR indices: {text!r}") from None


def _write_policy(path: Path, policy: object) -> None:
    obj = policy.to_obj()  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _attested_client(args: argparse.Namespace, out: TextIO | None = None) -> Iterator[Client]:
    """A client of the command's target whose attestation verified (summary and audit note
    to `out`, stdout by default) and whose data key is released; closed on exit."""
    from encloud.client import NO_AUDIT, Client
    from encloud.protocol.policy import load_policy

    out = sys.stdout if out is None else out
    credentials = channel_credentials(args)
    policy = load_policy(args.policy)
    audit_path = _audit_path(args)
    with Client(
        args.target,
        policy,
        audit_log=audit_path if audit_path is not None else NO_AUDIT,
        credentials=credentials,
    ) as client:
        with contextlib.redirect_stdout(out):
            try:
                attestation = client.attest()
            finally:
                if client.last_attempt is not None:
                    _say_audited(audit_path)
            print_summary(attestation, policy)
            client.release_key()
            print("Data key released; key confirmation verified.\n")
        yield client


def cmd_chat(args: argparse.Namespace) -> int:
    with _attested_client(args) as client:
        history: list[tuple[str, str]] = []
        prompts = [args.prompt] if args.prompt else _read_prompts()
        for prompt in prompts:
            history.append(("user", prompt))
            answer, _ = stream_to_terminal(client, history, args.max_new_tokens)
            history.append(("assistant", answer))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed texts through an attested session: one JSON line per text on stdout; the
    attestation summary on stderr, so the output pipes into other tools."""
    # One text per line, blank ones included, so output index i is input line i.
    texts = list(args.text) or sys.stdin.read().splitlines()
    if not texts:
        print(
            "encloud embed: no texts (give them as arguments or one per line on stdin)",
            file=sys.stderr,
        )
        return 2
    with _attested_client(args, out=sys.stderr) as client:
        result = client.embed(
            texts,
            dimensions=args.dimensions,
            normalize=not args.no_normalize,
            truncate=args.truncate,
        )
    for index, vector in enumerate(result.vectors):
        print(json.dumps({"index": index, "embedding": vector}))
    print(
        f"[{len(result.vectors)} vectors of {result.dimensions} dimensions; "
        f"{result.prompt_tokens} tokens; response bound to the request]",
        file=sys.stderr,
    )
    return 0


def cmd_seal(args: argparse.Namespace) -> int:
    """Seal a file at rest under a data key (docs/PROTOCOL.md, "Sealed files")."""
    import os

    from encloud.protocol import sealed_file

    sealed_file.check_key_id(args.key_id)
    if args.new_key is not None:
        if Path(args.new_key).exists():
            raise FileExistsError(17, "File exists", str(args.new_key))
        key = os.urandom(sealed_file.KEY_LENGTH)
    else:
        key = sealed_file.read_key_file(Path(args.key).read_bytes())
    with open(args.input, "rb") as source, _replacing(args.output) as sink:
        size = sealed_file.seal_stream(source, sink, key, args.key_id)
        if args.new_key is not None:  # the key is on disk before the file it opens
            _write_private(args.new_key, key.hex().encode("ascii") + b"\n", exclusive=True)
    made = f"; new key in {args.new_key} (mode 0600)" if args.new_key is not None else ""
    print(f"sealed {args.input} ({size} bytes) under key id {args.key_id} -> {args.output}{made}")
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    """Open a sealed file; the output appears only once every segment authenticated."""
    from encloud.protocol import sealed_file

    key = sealed_file.read_key_file(Path(args.key).read_bytes())
    manifest = _job_manifest(args.manifest) if args.manifest else None
    with open(args.input, "rb") as source, _replacing(args.output) as sink:
        checked = _CheckedAnswers(sink, manifest) if manifest else sink
        header = sealed_file.open_stream(
            source,
            checked,  # type: ignore[arg-type]
            key,
            expected_key_id=manifest.key_id if manifest else args.key_id,
        )
        if isinstance(checked, _CheckedAnswers):
            checked.finish()
        size = sink.tell()
    what = f"{manifest.records} answers of job {manifest.job_id.hex()}" if manifest else ""
    print(
        f"opened {args.input} (key id {header.key_id}, {size} bytes{', ' if what else ''}"
        f"{what}) -> {args.output}"
    )
    return 0


def _job_manifest(path: Path) -> Any:
    """The job manifest (its form; the owner signed it, Sentinel checked the signature)."""
    from encloud.protocol.job import parse_manifest

    manifest, _ = parse_manifest(Path(path).read_bytes())
    return manifest


class _CheckedAnswers:
    """A sink that refuses a job's answers out of place while they are written (their index,
    their job, the end line and its count: protocol/job.py AnswersChecker)."""

    def __init__(self, sink: BinaryIO, manifest: Any) -> None:
        from encloud.protocol.job import AnswersChecker

        self.sink = sink
        self.manifest = manifest
        self.checker = AnswersChecker(manifest.digest())

    def write(self, data: bytes) -> int:
        self.checker.feed(data)
        return self.sink.write(data)

    def finish(self) -> None:
        from encloud.protocol.job import AnswersFileError

        count = self.checker.finish()
        if count != self.manifest.records:
            raise AnswersFileError(
                f"the answers file holds {count} answers, the manifest {self.manifest.records}"
            )


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[BinaryIO]:
    """A private (0600) temporary file beside `path`, renamed onto it only when the block
    ends without an error; removed otherwise, so no half-written or unverified file stays."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_private(path: Path, data: bytes, *, exclusive: bool) -> None:
    import os

    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _read_prompts():
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return
        if line:
            yield line


def stream_to_terminal(
    client: object, messages: list[tuple[str, str]], max_new: int
) -> tuple[str, float | None]:
    """Print an answer as it streams; return its text and when its first piece came."""
    started = time.monotonic()
    first: float | None = None
    pieces: list[str] = []
    stream = client.stream(messages, max_new_tokens=max_new)  # type: ignore[attr-defined]
    print("assistant> ", end="", flush=True)
    for piece in stream:
        if first is None:
            first = time.monotonic()
        pieces.append(piece)
        print(piece, end="", flush=True)
    elapsed = time.monotonic() - started
    done = stream.completion
    rate = done.completion_tokens / elapsed if elapsed > 0 else 0.0
    ttft = (first - started) * 1000 if first is not None else float("nan")
    print(
        f"\n[{done.finish_reason}; {done.prompt_tokens} prompt + {done.completion_tokens} new "
        f"tokens; first token {ttft:.0f} ms; {rate:.1f} tok/s incl. first; transcript verified]"
    )
    return "".join(pieces), first


def cmd_tpm_start(args: argparse.Namespace) -> int:
    """A TPM 2.0 simulator outside the demo: swtpm on a state folder, until Ctrl-C."""
    import signal
    import threading

    from encloud.server.attestation.swtpm import Swtpm, SwtpmError

    try:
        swtpm = Swtpm(args.state).start()
    except SwtpmError as err:
        print(f"encloud tpm start: {err}", file=sys.stderr)
        return 1
    print(f"swtpm running (pid {swtpm.pid}), state in {Path(args.state).resolve()}")
    print(f"TCTI: {swtpm.tcti}")
    print(f"serve with: encloud serve --tpm '{swtpm.tcti}' --platform swtpm --model DIR")
    sys.stdout.flush()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        if not swtpm.running:
            print("encloud tpm start: swtpm exited", file=sys.stderr)
            return 1
    swtpm.stop()
    return 0


def cmd_tpm_ak(args: argparse.Namespace) -> int:
    """The AK public key of a swtpm state folder, as PEM: what a cloud's AK API returns for
    a VM's vTPM, for `policy from-image --ak-pin` before the VM boots. The server recreates
    the same AK from the TPM's endorsement seed at every start (encloud.server.attestation.tpm)."""
    from cryptography.hazmat.primitives import serialization

    from encloud.protocol.faults import TpmUnavailableError
    from encloud.protocol.tpm_structures import parse_public
    from encloud.server.attestation.swtpm import Swtpm, SwtpmError
    from encloud.server.attestation.tpm import Tpm

    if not Path(args.state).is_dir():
        print(f"encloud tpm ak: {args.state} is not a folder", file=sys.stderr)
        return 1
    swtpm = Swtpm(args.state)
    try:
        swtpm.start()
        with Tpm.open(swtpm.tcti) as tpm:
            key = parse_public(tpm.ak_public()).public_key()
    except (SwtpmError, TpmUnavailableError) as err:
        print(f"encloud tpm ak: {err}", file=sys.stderr)
        return 1
    finally:
        swtpm.stop()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    Path(args.output).write_bytes(pem)
    print(f"AK of {Path(args.state).resolve()} written to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from encloud.cli.demo import run_batch_demo, run_demo

    if args.batch:
        return run_batch_demo(max_new_tokens=min(args.max_new_tokens, 48))
    return run_demo(prompt=args.prompt, max_new_tokens=args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="encloud", description=__doc__)
    parser.add_argument("--version", action="version", version=f"encloud {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    attest = sub.add_parser("attest", help="attest a server and print the summary")
    _add_client_args(attest)
    attest.add_argument("--report", action="store_true", help="print every check")
    attest.add_argument("--save", type=Path, help="write an offline evidence bundle here")
    attest.add_argument(
        "--audit-checkpoint-key", type=Path, help="Ed25519 PEM key: sign audit checkpoints"
    )
    attest.add_argument(
        "--audit-checkpoints", type=Path, help="checkpoint file (default <audit log>.checkpoints)"
    )
    attest.set_defaults(func=cmd_attest)

    verify = sub.add_parser("verify", help="re-verify a saved evidence bundle offline")
    verify.add_argument("bundle", type=Path, help="bundle written by attest --save")
    verify.add_argument("--policy", type=Path, required=True, help="policy JSON file")
    verify.set_defaults(func=cmd_verify)

    policy = sub.add_parser("policy", help="write and check verification policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    fm = policy_sub.add_parser(
        "from-manifest", help="reference values computed offline from the exported model"
    )
    fm.add_argument("model_dir", type=Path, nargs="*", help="exported chat model folder(s)")
    fm.add_argument(
        "--embeddings-model",
        type=Path,
        action="append",
        default=[],
        help="exported embedding model folder (repeatable; --compute-runtime loads the first)",
    )
    fm.add_argument("-o", "--output", type=Path, required=True, help="policy file to write")
    fm.add_argument(
        "--runtime-event",
        type=Path,
        action="append",
        default=[],
        help="JSON runtime event published for the image (repeatable)",
    )
    fm.add_argument(
        "--compute-runtime",
        action="store_true",
        help="compute the runtime event by loading the engine here, with the server's "
        "ENCLOUD_* settings from this environment (needs encloud[server])",
    )
    fm.add_argument(
        "--ak-pin",
        type=Path,
        action="append",
        default=[],
        help="AK public key (PEM/DER SPKI or certificate) to pin (repeatable)",
    )
    fm.add_argument(
        "--ak-roots",
        type=Path,
        action="append",
        default=[],
        help="PEM file of root certificates for AK certificate chains (repeatable)",
    )
    fm.add_argument("--pcr-values", type=Path, help='JSON {"<index>": "<hex>"} to pin')
    fm.add_argument(
        "--pcr-selection", default="0,1,2,3,4,5,6,7,8,9,11,12,14,15", help="quoted PCRs"
    )
    fm.add_argument("--workload-pcr", type=int, default=15)
    fm.add_argument("--max-session-ttl", type=int, default=900, help="seconds")
    fm.set_defaults(func=cmd_policy_from_manifest)
    fi = policy_sub.add_parser(
        "from-image", help="boot PCRs predicted from the measured VM image, without booting it"
    )
    fi.add_argument("image_dir", type=Path, help="deploy/image/build-vm.sh's output folder")
    fi.add_argument("-o", "--output", type=Path, required=True, help="policy file to write")
    fi.add_argument(
        "--firmware-reference",
        type=Path,
        default=Path("deploy/image/ovmf-reference.json"),
        help="the firmware's PCRs from a recorded reference boot of the pinned OVMF build",
    )
    fi.add_argument(
        "--runtime-event",
        type=Path,
        action="append",
        default=[],
        help="JSON runtime event published for the image (repeatable)",
    )
    fi.add_argument("--ak-pin", type=Path, action="append", default=[], help="AK key to pin")
    fi.add_argument("--ak-roots", type=Path, action="append", default=[], help="AK roots (PEM)")
    fi.add_argument("--max-session-ttl", type=int, default=900, help="seconds")
    fi.set_defaults(func=cmd_policy_from_image)
    init = policy_sub.add_parser("init", help="DEV ONLY: a policy from a running server")
    add_target_args(init, required=True)
    init.add_argument("-o", "--output", type=Path, required=True, help="policy file to write")
    init.add_argument("--workload-pcr", type=int, default=15)
    init.add_argument(
        "--runtime-event-out",
        type=Path,
        help="also write the runtime event of the server's current start-up (a reference "
        "boot's event, for `policy from-image --runtime-event`)",
    )
    init.set_defaults(func=cmd_policy_init)
    check = policy_sub.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.add_argument(
        "--production-except-hardware",
        action="store_true",
        help="every production rule but the hardware report's (an emulated boot: no SEV-SNP)",
    )
    check.set_defaults(func=cmd_policy_check)

    audit = sub.add_parser("audit", help="the audit log: verify, keys, checkpoints")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    av = audit_sub.add_parser("verify", help="verify the chain and the signed checkpoints")
    av.add_argument("log", type=Path)
    av.add_argument("--checkpoints", type=Path, help="checkpoint file kept apart from the log")
    av.add_argument("--public-key", type=Path, help="Ed25519 public key (PEM)")
    av.set_defaults(func=cmd_audit_verify)
    kg = audit_sub.add_parser("keygen", help="a new Ed25519 checkpoint key pair")
    kg.add_argument("--private", type=Path, required=True)
    kg.add_argument("--public", type=Path, required=True)
    kg.set_defaults(func=cmd_audit_keygen)
    cp = audit_sub.add_parser("checkpoint", help="sign the log's current head now")
    cp.add_argument("log", type=Path)
    cp.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    cp.add_argument("--checkpoints", type=Path, help="default <log>.checkpoints")
    cp.set_defaults(func=cmd_audit_checkpoint)

    chat = sub.add_parser("chat", help="attest, release a key, chat encrypted")
    _add_client_args(chat)
    chat.add_argument("prompt", nargs="?", help="one prompt; without it, read lines")
    chat.add_argument("--max-new-tokens", type=positive_int, default=256)
    chat.set_defaults(func=cmd_chat)

    embed = sub.add_parser("embed", help="attest, release a key, embed texts encrypted")
    _add_client_args(embed)
    embed.add_argument("text", nargs="*", help="texts to embed; without them, one per line")
    embed.add_argument("--dimensions", type=positive_int, help="keep the first N components")
    embed.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    embed.add_argument(
        "--truncate", action="store_true", help="cut over-long texts instead of refusing them"
    )
    embed.set_defaults(func=cmd_embed)

    seal = sub.add_parser("seal", help="seal a file at rest (AES-256-GCM, Tink streaming format)")
    seal.add_argument("input", type=Path, help="the file to seal")
    seal.add_argument("-o", "--output", type=Path, required=True, help="the sealed file to write")
    seal.add_argument("--key-id", required=True, help="the data key's id, bound into the file")
    seal_key = seal.add_mutually_exclusive_group(required=True)
    seal_key.add_argument("--key", type=Path, help="key file: 32 raw bytes or 64 hex digits")
    seal_key.add_argument(
        "--new-key", type=Path, help="draw a fresh key, write it here (0600, never overwritten)"
    )
    seal.set_defaults(func=cmd_seal)
    from encloud.cli import jobs

    jobs.add_parser(sub)
    opener = sub.add_parser("open", help="open a sealed file (only a wholly verified one)")
    opener.add_argument("input", type=Path, help="the sealed file")
    opener.add_argument("-o", "--output", type=Path, required=True, help="the plaintext to write")
    opener.add_argument("--key", type=Path, required=True, help="key file (as for seal)")
    opener.add_argument("--key-id", help="refuse a file sealed under another key id")
    opener.add_argument(
        "--manifest",
        type=Path,
        help="a job's answers: refuse them unless every answer is this job's, in record "
        "order, none missing (the manifest names the key id too)",
    )
    opener.set_defaults(func=cmd_open)

    sub.add_parser("serve", help="run the server (see serve --help: flags, ENCLOUD_*, --config)")

    sub.add_parser("proxy", help="a local OpenAI-compatible proxy (see proxy --help)")
    sub.add_parser("sentinel", help="the key broker: serve it, register keys, sign release orders")
    sub.add_parser("export-model", help="convert a model to ONNX (see export-model --help)")
    sub.add_parser(
        "export-embeddings-model",
        help="the embedded all-MiniLM-L6-v2 to ONNX (see export-embeddings-model --help)",
    )
    sub.add_parser("loadgen", help="bounded load against a server (see loadgen --help)")

    tpm = sub.add_parser("tpm", help="a TPM 2.0 simulator (swtpm) for a server outside the demo")
    tpm_sub = tpm.add_subparsers(dest="tpm_command", required=True)
    tpm_start = tpm_sub.add_parser("start", help="run swtpm on a state folder until Ctrl-C")
    tpm_start.add_argument("--state", type=Path, required=True, help="swtpm state folder")
    tpm_start.set_defaults(func=cmd_tpm_start)
    tpm_ak = tpm_sub.add_parser("ak", help="write the AK public key of a swtpm state folder")
    tpm_ak.add_argument("--state", type=Path, required=True, help="swtpm state folder")
    tpm_ak.add_argument("-o", "--output", type=Path, required=True, help="PEM file to write")
    tpm_ak.set_defaults(func=cmd_tpm_ak)

    demo = sub.add_parser("demo", help="swtpm + server + encrypted chat, all local")
    demo.add_argument("--prompt", default="What is encryption? Answer briefly.")
    demo.add_argument("--max-new-tokens", type=positive_int, default=96)
    demo.add_argument(
        "--batch",
        action="store_true",
        help="the confidential batch flow instead: Sentinel, seal, sign, job, open",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:
        # The load generator owns its options too.
        from encloud.cli.loadgen import main as loadgen_main

        return loadgen_main(argv[1:])
    if argv[:1] == ["proxy"]:
        # The OpenAI-compatible proxy owns its options (encloud.proxy.main).
        from encloud.proxy.main import run as proxy

        return proxy(argv[1:])
    if argv[:1] == ["sentinel"]:
        # The key broker and its owner commands (encloud.cli.sentinel).
        from encloud.cli.sentinel import main as sentinel

        return sentinel(argv[1:])
    if argv[:1] == ["serve"]:
        # The server's flags are its settings (encloud.server.config).
        from encloud.server.app import run as serve

        return serve(argv[1:])
    if argv[:1] == ["export-model"]:
        # The exporter owns its options; hand them over untouched.
        from encloud.server.inference.export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["export-embeddings-model"]:
        from encloud.server.inference.embeddings_export import main as export_embeddings

        return export_embeddings(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EncloudError as error:
        print(f"encloud: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file named on the command line: missing, unreadable
        where = f": {error.filename}" if error.filename else ""
        print(f"encloud: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except ValueError as error:  # an argument combination (e.g. --cert without --key)
        print(f"encloud: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
