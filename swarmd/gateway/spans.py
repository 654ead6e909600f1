"""Opening sessions for a span of blocks on the servers that cover it, and rebuilding their
caches from a session's history. Decides which servers end up holding the span: one without
room for the session (or beyond its limits) is passed over but not banned, since it works; one
that fails is banned and replaced, until the deadline; and a replay must leave each server at
the history's position."""

from __future__ import annotations

import secrets
import time

import torch

from libswarm.errors import CacheFullError, LimitError, RemoteError, SessionError, SwarmError
from libswarm.protocol import Message
from swarmd.gateway.history import History
from swarmd.gateway.resend import Resender
from swarmd.gateway.router import Router, hidden_of, retriable
from swarmd.routing import Hop, missing_blocks
from swarmd.transport.connection import PeerConnection

OPEN_TIMEOUT_S = 10.0


class SpanOpener:
    def __init__(self, router: Router, resender: Resender):
        self.router, self.resender = router, resender

    def open(self, first: int, last: int, *, max_length: int, batch: int, deadline: float,
             history: History | None, adapter: str | None = None, avoid: frozenset[str] = frozenset()
             ) -> tuple[list[Hop], list[str], dict[int, torch.Tensor], float]:
        """Open sessions on servers covering [first, last); with a history, replay it into them.
        Returns the hops, their session ids, the replay's output at each new inner boundary, and
        the seconds spent replaying. A server that fails here is banned and another one is
        tried, until `deadline`."""
        replay_s = 0.0
        full: set[str] = set()  # servers without room for this session (not banned: they work)
        while True:
            hops = self.router.plan(first, last, deadline, exclude=full | avoid, adapter=adapter)
            opened: list[tuple[Hop, str]] = []
            outputs: dict[int, torch.Tensor] = {}
            hop = hops[0]
            try:
                replay = history.replay_inputs(first) if history is not None else None
                for hop in hops:
                    conn = self.router.pool.get(hop.address)
                    fields = {"model_id": self.router.model_id, "blocks": [hop.first, hop.last],
                              "max_length": max_length, "batch": batch}
                    if adapter is not None:
                        fields["adapter"] = adapter
                    sid = self._open_one(hop, conn, fields).get("session")
                    if not isinstance(sid, str):
                        raise RemoteError(f"server {hop.address} opened a session without naming it")
                    opened.append((hop, sid))
                    if replay is not None:
                        t0 = time.monotonic()
                        replay["hidden"] = self.replay(hop, opened[-1][1], replay)
                        replay_s += time.monotonic() - t0
                        if hop.last < last:
                            outputs[hop.last] = replay["hidden"]
                return hops, [sid for _, sid in opened], outputs, replay_s
            except SwarmError as e:
                if isinstance(e, (CacheFullError, LimitError)) and e.peer is not None:
                    # no room there, or the session is beyond that server's limits (length, batch,
                    # its share per key, its rate): it works, it is not banned; another may take it
                    self.router.close_remote(opened)
                    full.add(hop.address)
                    candidates = [s for s in self.router.table.servers_for(self.router.model_id, adapter)
                                  if s.address not in full | avoid and not self.router.bans.is_banned(s.address)]
                    if missing_blocks(candidates, last, first):  # nobody else could take it: say so now
                        raise
                    continue
                # what the gateway asks to open is checked here: any other refusal is the server's
                if not retriable(e):
                    raise
                self.router.fail(hop, e)
                self.router.close_remote(opened)  # the failed one's too, if it opened (from another thread)
                if time.monotonic() > deadline:  # servers exist but keep failing
                    raise

    def _open_one(self, hop: Hop, conn: PeerConnection, fields: dict) -> Message:
        """`open` at one server. A server this gateway has timed is asked again when it does not
        answer within its resend allowance (as a step is): the open or its answer was lost. Both
        carry one `open_id`: a server that got the first answers the resend with the same session."""
        t0 = time.monotonic()
        fields = {**fields, "open_id": secrets.token_hex(8)}  # a resend is answered with the same session

        def ask() -> tuple[PeerConnection, int]:
            return conn, conn.send("open", fields, timeout_s=OPEN_TIMEOUT_S)

        return self.resender.await_reply(hop.address, ask(), ask, t0, t0 + OPEN_TIMEOUT_S, 1, "open")[0]

    def replay(self, hop: Hop, sid: str, replay: dict[str, torch.Tensor], band: bool = True) -> torch.Tensor:
        """One step that feeds a fresh session every position so far; returns its output."""
        length = replay["hidden"].shape[1]
        tokens = replay["hidden"].shape[0] * length
        t0 = time.monotonic()
        reply = self.router.pool.get(hop.address).request(
            "step", {"session": sid, "replay": True}, replay, timeout_s=self.router.allowance_s(hop.address, tokens)
        )
        if reply.get("position") != length:
            raise SessionError(f"server {hop.address} replayed to position {reply.get('position')}, not {length}")
        self.router.step_times.record(hop.address, time.monotonic() - t0, tokens, hop.last - hop.first)
        return self.router.check(hop, replay["hidden"], hidden_of(reply, hop.address), band)
