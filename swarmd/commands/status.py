from __future__ import annotations

import argparse

from swarmd.commands.base import Command, human_bytes
from swarmd.commands.peers import peer_rows
from swarmd.coverage import single_text
from swarmd.identity import short_id


def coverage_line(cov: dict) -> str:
    """Runs of blocks with the same servers: "0:2 x2 (31.0 steps/s)  2:3 GAP  3:4 x1 (9.5 steps/s)"."""
    parts, blocks = [], cov["blocks"]
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1]["servers"] == blocks[i]["servers"]:
            j += 1
        n = len(blocks[i]["servers"])
        parts.append(f"{i}:{j + 1} " + (f"x{n} ({blocks[i]['throughput']:.1f} steps/s)" if n else "GAP"))
        i = j + 1
    line = "  ".join(parts)
    if not cov["complete"]:
        line += "  (incomplete: " + ", ".join(
            f"{m['blocks'][0]}:{m['blocks'][1]} missing for {m['for_s']:.0f} s" for m in cov.get("missing", [])) + ")"
    coming = cov.get("coming", [])
    if coming:
        line += "  coming: " + ", ".join(f"{c['server']} {c['span'][0]}:{c['span'][1]} ({c['state']})"
                                         for c in coming)
    return line


class StatusCommand(Command):
    """Show this daemon's model, blocks, sessions, cache and the peers it knows."""

    name = "status"
    request_type = "status"

    def format(self, r: dict, args: argparse.Namespace) -> str:
        m, s, c = r["model"], r["serve"], r["cache"]
        blocks = f"{s['blocks'][0]}:{s['blocks'][1]}" if s["blocks"] else "none (gateway only)"
        if s.get("also"):  # trading places: the old span (or one bridged for another server) serves too
            blocks += f" and {s['also'][0]}:{s['also'][1]} until others cover it"
        lines = [
            f"swarmd {r['version']} (protocol {r['protocol']}), {r['state']}, up {r['uptime_s']:.0f} s, "
            f"node {short_id(r['node_id'])}",
            f"model     {m['id']}  ({m['architecture']}, {m['num_layers']} blocks, {m['path']})",
            f"serving   blocks {blocks} on {s['device']} as {s['dtype']}"
            + (f", {s['quant']} weights" if s.get("quant", "none") != "none" else "")
            + (f" ({human_bytes(s['weight_bytes'])})" if s.get("weight_bytes") else "")
            + (f" at {r['address']}" if r["address"] else ""),
            f"sessions  {r['sessions']['server']} served, {r['sessions']['gateway']} from local apps",
            f"cache     {human_bytes(c['used_bytes'])} used, {human_bytes(c['free_bytes'])} free "
            f"of {human_bytes(c['max_bytes'])}"
            + (f" ({c['kv_dtype']}: {c['free_tokens']:,} of {c['capacity_tokens']:,} tokens free)"
               if c.get("bytes_per_token") else ""),
            f"swarm     {r['membership']['access']}, "
            f"{sum(p['state'] == 'online' for p in r['peers'])} of {len(r['peers'])} peers online"
            + (f", {r['membership']['refused_handshakes']} handshakes refused"
               if r["membership"]["refused_handshakes"] else "")
            + (f", {r['membership']['rejected_records']} records rejected"
               if r["membership"]["rejected_records"] else ""),
        ]
        net = r.get("network")
        if net:
            via = ", ".join(f"{short_id(v['node_id'])} at {v['address']}" for v in net["via"])
            relay = net["relay"]
            lines.append(f"network   reachable: {net['reachable']}" + (f", through relays {via}" if via else "")
                         + (f"; relaying for {len(relay['servers'])} servers" if relay.get("enabled") else ""))
        for cov in r["coverage"]:
            lines.append(f"coverage  {cov['model_id']}: " + coverage_line(cov))
            if cov.get("single"):
                lines.append(f"warning   {single_text(cov['single'])}: one server only; if it stops, requests wait "
                             "until it is back (overlap the spans, serve.blocks: auto, or a spare)")
        rows = peer_rows(r["peers"])
        if rows:
            lines.append(rows)
        return "\n".join(lines)
