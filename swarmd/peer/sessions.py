"""Who may open, use and close a session on a span server: `Sessions` alone decides whether
an open is admitted (model, blocks, sizes, the cache budget and each key's share of it), which
session a request names (only its owner's), and when an idle or unused one is freed. The
records themselves are in records.py."""

from __future__ import annotations

import logging
import secrets
import time

from libswarm.errors import LimitError, ProtocolError, SessionError, SpanMovedError, WrongModelError
from libswarm.protocol.registry import Closed, Opened, PeerClose, PeerOpen
from swarmd.identity import short_id
from swarmd.peer.limits import shared_network
from swarmd.peer.owner import Owner
from swarmd.peer.records import ServerSession
from swarmd.runtime.adapters import slice_lora
from swarmd.runtime.span import Lora, Span

log = logging.getLogger("swarmd.peer")

MAX_OPEN_ID = 64  # characters of an open's open_id
MAX_OPEN_IDS = 4096  # open_ids remembered (the oldest forgotten first)


class Sessions:
    """Opening, finding and closing sessions on the serving thread (other threads read the
    table under the owner's `sessions_lock`)."""

    def __init__(self, server: Owner):
        self.server = server

    def check_model(self, asked: str) -> None:
        if asked != self.server.model_id:
            raise WrongModelError(f"this server serves model {self.server.model_id}, not {asked}")

    def check_blocks(self, kind: str, blocks: list) -> tuple[int, int]:
        """[first, last] within a span served now (`span_for`); blocks this server moved away
        from are `span_moved` (the gateway reroutes), others a limit."""
        if len(blocks) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
            raise ProtocolError(f"{kind}: 'blocks' must be [first, last]")
        first, last = blocks
        span = self.server.span
        if self.span_for(first, last) is None:
            if self.server.moved_from(first, last) or self.server.next_span is not None:
                raise SpanMovedError(f"this server moved to blocks {span.start}:{span.end}")
            raise LimitError(f"blocks {first}:{last} are not served here (this server has {span.start}:{span.end})")
        return first, last

    def span_for(self, first: int, last: int) -> Span | None:
        """The span that serves blocks [first, last): the current one, or while this server
        trades places the one it holds beside it (a request within both goes to the current)."""
        for span in (self.server.span, self.server.also):
            if span is not None and span.start <= first < last <= span.end:
                return span
        return None

    def hosted_adapter(self, name: str | None, first: int, last: int) -> Lora | None:
        if name is None:
            return None
        span = self.span_for(first, last) or self.server.span
        adapters = self.server.also_adapters if span is self.server.also else self.server.adapters
        if name not in adapters:
            raise LimitError(f"adapter {name!r} is not hosted here (this server has {sorted(adapters)})")
        return slice_lora(adapters[name], span.start, first, last)

    def on_open(self, req: PeerOpen) -> tuple[Opened, None]:
        srv = self.server
        if srv.draining:
            raise SpanMovedError("this server is draining (stopping): open the session elsewhere")
        self.check_model(req.model_id)
        first, last = self.check_blocks("open", req.blocks)
        max_length, batch = req.max_length, req.batch
        if not 0 < max_length <= srv.max_length:
            raise LimitError(f"max_length {max_length} is outside 1..{srv.max_length} allowed by this server")
        if not 0 < batch <= srv.max_batch:
            raise LimitError(f"batch {batch} is outside 1..{srv.max_batch} allowed by this server")
        owner, open_id = srv.current[2], req.open_id
        if open_id is not None and len(open_id) > MAX_OPEN_ID:
            raise ProtocolError(f"open: open_id longer than {MAX_OPEN_ID} characters")
        again = srv.opened.get((owner, open_id)) if open_id is not None else None
        if again is not None and again in srv.sessions:
            # a resend of an open that came (its answer was lost): the same session, nothing more held
            return {"session": again, "cache_bytes": srv.sessions[again].cache.nbytes}, None
        lora = self.hosted_adapter(req.adapter, first, last)  # before reserving: a refusal must hold nothing
        span = self.span_for(first, last) or srv.span  # check_blocks found one
        nbytes = span.cache_bytes(first, last, batch, max_length)
        network = shared_network(srv.peer_host, srv.access.private)
        with srv.sessions_lock:
            held = [x.cache.nbytes for x in srv.sessions.values() if x.owner == owner]
            held_network = [x.cache.nbytes for x in srv.sessions.values() if network and x.network == network]
        srv.budget.reserve(nbytes)  # a session that fits nowhere here is cache_full, before any per-key limit
        try:
            srv.key_limits.admit_session(owner, held, nbytes, srv.budget.max_bytes,
                                         pushed_bytes=srv.early.held_by(owner), network=network,
                                         network_held=held_network)
            cache = span.new_cache(first, last, batch, max_length)
        except BaseException:
            srv.budget.release(nbytes)
            raise
        sid = secrets.token_hex(12)
        with srv.sessions_lock:
            srv.sessions[sid] = ServerSession(sid, cache, span, owner, lora, network=network)
        srv.count(sessions_opened=1)
        if open_id is not None:
            srv.opened[(owner, open_id)] = sid
            while len(srv.opened) > MAX_OPEN_IDS:
                srv.opened.popitem(last=False)
        return {"session": sid, "cache_bytes": nbytes}, None

    def kv_bytes_of(self, key: str | None) -> int:
        """The KV cache of the sessions `key` opened here (on the serving thread, which alone
        changes them)."""
        return sum(x.cache.nbytes for x in self.server.sessions.values() if x.owner == key)

    def of_caller(self, sid: str) -> ServerSession:
        """The caller's session: another key (the previous hop, which learns the id to push to
        it) gets the same answer as for a session that does not exist."""
        s = self.server.sessions.get(sid)
        if s is None or s.owner != self.server.current[2]:
            raise SessionError(f"unknown or expired session {sid[:32]!r}")
        s.last_used = time.monotonic()
        return s

    def on_close(self, req: PeerClose) -> tuple[Closed, None]:
        s = self.server.sessions.get(req.session)
        closed = s is not None and s.owner == self.server.current[2] and self.server.drop(s.id)
        return {"closed": bool(closed)}, None

    def expire_idle(self, now: float) -> None:
        """Free the cache of sessions idle past serve.idle_timeout_s, and of those reserved but
        never used past serve.limits.unused_session_timeout_s (limits.py)."""
        srv = self.server
        unused_s = srv.key_limits.limits.unused_session_timeout_s
        for sid, s in list(srv.sessions.items()):
            if now - s.last_used > srv.idle_timeout_s:
                log.info("session %s idle for %.0f s: freeing its cache", sid[:8], now - s.last_used)
                srv.drop(sid)
            elif s.cache.length == 0 and now - s.last_used > unused_s:
                srv.quiet_log.info(("unused", s.owner), "session %s of %s held no position for %.0f s: freeing "
                                   "its cache (serve.limits.unused_session_timeout_s)", sid[:8],
                                   short_id(s.owner) if s.owner else "?", now - s.last_used)
                srv.drop(sid)
