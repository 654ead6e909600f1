from __future__ import annotations

import argparse

from swarmd.commands.base import Command, table


def peer_rows(peers: list[dict]) -> str:
    rows = [
        [
            p["address"] + (" (self)" if p.get("is_self") else ""),
            f"{p['span'][0]}:{p['span'][1]}" if p.get("span") else "-",
            p["state"],
            (p.get("model_id") or "-")[:24],
            f"{p['rtt_ms']:.2f}" if p.get("rtt_ms") is not None else "-",
            f"{p['last_seen_s_ago']:.1f} s ago" if p.get("last_seen_s_ago") is not None else "never",
        ]
        for p in peers
    ]
    return table(rows, ["ADDRESS", "SPAN", "STATE", "MODEL", "RTT MS", "LAST SEEN"]) if rows else ""


class PeersCommand(Command):
    """List the peers this daemon knows, one row each."""

    name = "peers"
    request_type = "peers"

    def format(self, r: dict, args: argparse.Namespace) -> str:
        return peer_rows(r["peers"]) or "no peers known"
