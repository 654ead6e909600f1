"""Coverage: which servers hold each block of a model, where the gaps are and since when, and
which blocks have one server only. Pure over the peer table (what `swarmctl status` shows and
the daemon's coverage watch logs)."""

from __future__ import annotations

import time

from swarmd.discovery.records import Record
from swarmd.discovery.table import PeerTable
from swarmd.routing import ServerSpan, missing_blocks


def single_text(single: list[dict]) -> str:
    """"blocks 0:3 (on 1a2b3c4d), 3:6 (on 5e6f7a8b)" """
    return "blocks " + ", ".join(f"{x['blocks'][0]}:{x['blocks'][1]} (on {x['server']})" for x in single)


def coverage(table: PeerTable, own_model: str, own_layers: int, since: dict | None = None) -> list[dict]:
    """Per model (this daemon's own first): for each block, the online servers holding it and
    their summed throughput; runs of blocks nobody serves are listed as gaps, and under `missing`
    with the time this daemon first saw each of their blocks uncovered (kept in `since`,
    {(model, block): time}, and forgotten when covered again); runs held by one server only under
    `single`. Servers announced but not serving yet (joining, loading) are listed apart."""
    models: dict[str, list] = {own_model: []}
    coming: dict[str, list] = {}
    for e in table.entries():
        if not (e.record.model_id and e.record.span):
            continue
        state = table.state(e)
        if state == "online" and (e.is_self or e.verified):  # never reached: not a server of the swarm yet
            models.setdefault(e.record.model_id, []).append(e)
        elif state in ("joining", "loading"):
            coming.setdefault(e.record.model_id, []).append(
                {"server": e.record.short_id, "span": list(e.record.span), "state": state})
    since = {} if since is None else since
    now = time.time()
    out = []
    for model_id, entries in models.items():
        n = own_layers if model_id == own_model else max(e.record.span[1] for e in entries)
        blocks = []
        for b in range(n):
            holders = [e for e in entries if any(s[0] <= b < s[1] for s in _spans(e.record))]
            blocks.append({"block": b, "servers": [e.record.short_id for e in holders],
                           "throughput": round(sum(e.record.throughput for e in holders), 2)})
            if holders:
                since.pop((model_id, b), None)
            else:
                since.setdefault((model_id, b), now)
        gaps = [list(g) for g in missing_blocks([ServerSpan(e.address, *s) for e in entries for s in _spans(e.record)],
                                                n)]
        missing = []
        for start, end in gaps:
            first = min(since[model_id, b] for b in range(start, end))
            missing.append({"blocks": [start, end], "since": round(first, 3), "for_s": round(now - first, 1)})
        out.append({"model_id": model_id, "num_blocks": n, "blocks": blocks, "gaps": gaps,
                    "complete": not gaps, "missing": missing, "single": single_runs(blocks),
                    "coming": coming.get(model_id, [])})
    for key in [k for k in since if k[0] not in models]:  # a model whose servers all left
        del since[key]
    return out


def _spans(record: Record) -> tuple[tuple[int, int], ...]:
    """The spans a server serves: its own, and the one it holds beside it while trading places."""
    assert record.span is not None
    return (record.span, record.also) if record.also else (record.span,)


def single_runs(blocks: list[dict]) -> list[dict]:
    """Runs of consecutive blocks held by one and the same server."""
    runs: list[dict] = []
    for b in blocks:
        if len(b["servers"]) != 1:
            continue
        last = runs[-1] if runs else None
        if last is not None and last["blocks"][1] == b["block"] and last["server"] == b["servers"][0]:
            last["blocks"][1] = b["block"] + 1
        else:
            runs.append({"blocks": [b["block"], b["block"] + 1], "server": b["servers"][0]})
    return runs
