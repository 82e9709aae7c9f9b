"""The `encloud` command line.

Client commands (attest, chat) need only the client package; server commands
(serve, export-model, demo) import the server package when they run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from encloud.client.errors import EncloudError, VerificationError


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--policy", type=Path, required=True, help="policy JSON file")
    parser.add_argument(
        "--audit-log", type=Path, default=Path(".encloud/audit.jsonl"), help="audit log"
    )


def print_summary(attestation: object, policy: object, out=sys.stdout) -> None:
    """The verification summary a user reads before trusting the server."""
    a = attestation
    dev = getattr(policy, "dev_only", False)
    print("Attestation verified", file=out)
    print(f"  AK fingerprint (SHA-256 of SPKI): {a.ak_fingerprint}", file=out)  # type: ignore[attr-defined]
    print(
        f"  workload PCR {a.workload_pcr}: {a.workload_pcr_value.hex()}",  # type: ignore[attr-defined]
        file=out,
    )
    print(f"  model digest: {a.model_digest.hex()}", file=out)  # type: ignore[attr-defined]
    print(f"  workload events replayed: {len(a.events)}", file=out)  # type: ignore[attr-defined]
    print("  outcome: PASS (every check of the policy)", file=out)
    if dev:
        print(
            "  WARNING: DEV-ONLY policy (trust on first use, written by the server itself)",
            file=out,
        )


def cmd_attest(args: argparse.Namespace) -> int:
    from encloud.client.policy import load_policy
    from encloud.client.session import EncloudClient
    from encloud.client.verifier import format_report

    policy = load_policy(args.policy)
    with EncloudClient(args.target, policy, audit_log=args.audit_log) as client:
        try:
            attestation = client.attest()
        except VerificationError:
            if args.report:
                print(format_report(client.last_report))
            raise
        if args.report:
            print(format_report(client.last_report))
        print_summary(attestation, policy)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from encloud.client.policy import load_policy
    from encloud.client.session import EncloudClient

    policy = load_policy(args.policy)
    with EncloudClient(args.target, policy, audit_log=args.audit_log) as client:
        attestation = client.attest()
        print_summary(attestation, policy)
        client.release_key()
        print("Data key released; key confirmation verified.\n")
        history: list[tuple[str, str]] = []
        prompts = [args.prompt] if args.prompt else _read_prompts()
        for prompt in prompts:
            history.append(("user", prompt))
            answer, _ = stream_to_terminal(client, history, args.max_new_tokens)
            history.append(("assistant", answer))
    return 0


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


def cmd_serve(_: argparse.Namespace) -> int:
    from encloud.server.app import main as serve_main

    serve_main()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from encloud.server.demo import run_demo

    return run_demo(prompt=args.prompt, max_new_tokens=args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="encloud", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    attest = sub.add_parser("attest", help="attest a server and print the summary")
    _add_client_args(attest)
    attest.add_argument("--report", action="store_true", help="print every check")
    attest.set_defaults(func=cmd_attest)

    chat = sub.add_parser("chat", help="attest, release a key, chat encrypted")
    _add_client_args(chat)
    chat.add_argument("prompt", nargs="?", help="one prompt; without it, read lines")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="run the server (settings from ENCLOUD_* env)")
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("export-model", help="convert a model to ONNX (see export-model --help)")

    demo = sub.add_parser("demo", help="swtpm + server + encrypted chat, all local")
    demo.add_argument("--prompt", default="What is encryption? Answer briefly.")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export-model"]:
        # The exporter owns its options; hand them over untouched.
        from encloud.server.inference.export import main as export_main

        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EncloudError as error:
        print(f"encloud: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
