from __future__ import annotations

import argparse

from swarmd.commands.base import Command, table


def _quantized(p: dict) -> str:
    """What a server's outputs are quantized by, after its span: " nf4", " int8 KV", " int8+int8 KV"."""
    parts = [q for q in (p.get("quant", "none"),) if q != "none"]
    if p.get("kv_dtype", "auto") == "int8":
        parts.append("int8 KV")
    return (" " + "+".join(parts)) if parts else ""


def peer_rows(peers: list[dict]) -> str:
    rows = [
        [
            (p.get("short_id") or "-") + (" (self)" if p.get("is_self") else ""),
            p["address"],
            (f"{p['span'][0]}:{p['span'][1]}" if p.get("span") else "-")
            + (f" +{p['also'][0]}:{p['also'][1]}" if p.get("also") else "") + _quantized(p),
            p["state"],
            f"{p['throughput']:.1f}" if p.get("throughput") else "-",
            f"{p['rtt_ms']:.2f}" if p.get("rtt_ms") is not None else "-",
            f"{p['last_seen_s_ago']:.1f} s ago" if p.get("last_seen_s_ago") is not None else "never",
            (p.get("error") or "")[:60],
        ]
        for p in peers
    ]
    header = ["NODE", "ADDRESS", "SPAN", "STATE", "STEPS/S", "RTT MS", "LAST SEEN", "NOTE"]
    return table(rows, header) if rows else ""


class PeersCommand(Command):
    """List the peers this daemon knows, one row each (short node id, address, span, state,
    throughput, round trip, last seen). A server trading places shows the span it still holds
    beside its own after a plus: "8:16 +0:8"."""

    name = "peers"
    request_type = "peers"

    def format(self, r: dict, args: argparse.Namespace) -> str:
        return peer_rows(r["peers"]) or "no peers known"
