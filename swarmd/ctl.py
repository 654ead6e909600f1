"""`swarmctl [--socket PATH] [--json] COMMAND`: talk to the local swarmd."""

from __future__ import annotations

import argparse
import json
import sys

from libswarm.client import SwarmClient
from libswarm.errors import SwarmError
from swarmd.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarmctl", description="control and inspect the local swarmd")
    p.add_argument("--socket", help="swarmd's Unix socket (default: $SWARMD_SOCKET, /run/swarmd/swarmd.sock, "
                                    "$XDG_RUNTIME_DIR/swarmd.sock)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for swarmd (default 30)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, cls in COMMANDS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        sp = sub.add_parser(name, help=doc, description=doc)
        cls().add_arguments(sp)
    return p


def reply(args: argparse.Namespace) -> dict:
    """The reply to the parsed command: worked out here (local commands) or swarmd's. Raises
    SwarmError."""
    cmd = COMMANDS[args.command]()
    if cmd.local:
        return cmd.run(args)
    with SwarmClient(socket=args.socket, timeout_s=args.timeout) as client:
        return client.request(cmd.request_type, cmd.fields(args)).fields


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        answer = reply(args)
    except SwarmError as e:
        print(f"swarmctl: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(COMMANDS[args.command]().format(answer, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
