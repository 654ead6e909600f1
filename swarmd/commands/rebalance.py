from __future__ import annotations

import argparse

from swarmd.commands.base import Command


def _span(s: list[int] | None) -> str:
    return f"{s[0]}:{s[1]}" if s else "-"


class RebalanceCommand(Command):
    """Show the span this daemon would move to and the swarm's predicted throughput before
    and after; without --dry-run, move now."""

    name = "rebalance"
    request_type = "rebalance"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="only print the plan")

    def fields(self, args: argparse.Namespace) -> dict:
        return {"dry_run": args.dry_run}

    def format(self, r: dict, args: argparse.Namespace) -> str:
        head = f"current blocks {_span(r['current'])}, swarm throughput {r['before']:.1f} steps/s"
        if r["proposed"] is None:
            return f"{head}\nno move: {r.get('reason', '')}"
        gain = f"({r['after'] / r['before']:.2f}x)" if r["before"] > 0 else "(covers blocks nobody serves now)"
        plan = f"proposed blocks {_span(r['proposed'])}, predicted swarm throughput {r['after']:.1f} steps/s {gain}"
        tail = ("dry run: nothing moved" if args.dry_run else
                "moving now: the new blocks load first, then sessions on the old ones drain (swarmctl status)")
        return f"{head}\n{plan}\n{tail}"
