from __future__ import annotations

import argparse

from swarmd.commands.base import Command, human_bytes
from swarmd.commands.peers import peer_rows


class StatusCommand(Command):
    """Show this daemon's model, blocks, sessions, cache and the peers it knows."""

    name = "status"
    request_type = "status"

    def format(self, r: dict, args: argparse.Namespace) -> str:
        m, s, c = r["model"], r["serve"], r["cache"]
        blocks = f"{s['blocks'][0]}:{s['blocks'][1]}" if s["blocks"] else "none (gateway only)"
        lines = [
            f"swarmd {r['version']} (protocol {r['protocol']}), {r['state']}, up {r['uptime_s']:.0f} s, "
            f"node {r['node_id'][:8]}",
            f"model     {m['id']}  ({m['architecture']}, {m['num_layers']} blocks, {m['path']})",
            f"serving   blocks {blocks} on {s['device']} as {s['dtype']}"
            + (f" at {r['address']}" if r["address"] else ""),
            f"sessions  {r['sessions']['server']} served, {r['sessions']['gateway']} from local apps",
            f"cache     {human_bytes(c['used_bytes'])} used, {human_bytes(c['free_bytes'])} free "
            f"of {human_bytes(c['max_bytes'])}",
            f"peers     {len(r['peers'])}",
        ]
        rows = peer_rows(r["peers"])
        if rows:
            lines.append(rows)
        return "\n".join(lines)
