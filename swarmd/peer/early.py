"""Pushes that arrive before their step ("early pushes"): held, charged and bounded.

A server pushes its output straight to the next hop's session (protocol.md, `push`); the
gateway's `step` for that session may come after it, and the push waits for it here. What
waits is memory a peer chose to send, so it is held like a session's KV cache is:

- charged to the server's cache budget while it waits (a push that does not fit is dropped:
  nothing is held that the budget does not count), and to the pushing key's share of that
  budget together with the sessions the key opened here (serve.limits.cache_share_per_key):
  one key pins no more than it could by opening sessions;
- per session, at most one step over all its positions left, in float32 (the largest input
  an honest previous hop can send: the session's own KV charge can be smaller, e.g. one
  block with grouped-query attention), and at most MAX_EARLY_PUSHES_PER_SESSION pushes of
  one key;
- once a step names the session's previous hop (`from`), pushes from any other key are let
  go at once, and another key may hold one push per session: the only honest case is a new
  previous hop (after a route change) whose first push beats the step that names it.

Beyond a bound a push is dropped (pushes are never answered) with a LimitError saying which
bound, for the server's rate-limited log. All of it runs on the serving thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from libswarm.errors import CacheFullError, LimitError
from swarmd.peer.limits import KeyLimits
from swarmd.runtime.cache import CacheBudget

if TYPE_CHECKING:
    from swarmd.peer.records import ServerSession

# A route has one previous hop; a few steps of slack cover a resend after a failure
MAX_EARLY_PUSHES_PER_SESSION = 4
# A key other than the previous hop a step named: one push per session (see the docstring)
MAX_EARLY_PUSHES_OTHER_KEY = 1
WIRE_ITEMSIZE = 4  # the widest float a push may carry (float32), for a session's bound


@dataclass(eq=False)  # compared by identity (a tensor has no truth value)
class EarlyPush:
    session: str
    step: int
    hidden: torch.Tensor  # [batch, length, hidden]
    sender: str | None
    arrived: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.hidden.nbytes


def session_bound_bytes(s: ServerSession) -> int:
    """The most a session's early pushes may hold together: one float32 step over every
    position it has left."""
    c = s.cache
    return c.batch * (c.max_length - c.length) * s.span.hidden_size * WIRE_ITEMSIZE


class EarlyPushes:
    def __init__(self, budget: CacheBudget, limits: KeyLimits, kv_bytes_of: Callable[[str | None], int]):
        """`kv_bytes_of(key)`: the KV cache of the sessions `key` opened here (its share holds both)."""
        self.budget = budget  # SpanServer.attach replaces it
        self.limits, self.kv_bytes_of = limits, kv_bytes_of
        self._by_session: dict[str, list[EarlyPush]] = {}  # oldest first
        self._by_key: dict[str | None, int] = {}  # bytes held per pushing key
        # kept as counts, not summed: the status reads them from another thread
        self.count, self.nbytes, self.refused = 0, 0, 0

    def held_by(self, key: str | None) -> int:
        return self._by_key.get(key, 0)

    def keep(self, s: ServerSession, step: int, hidden: torch.Tensor, sender: str | None) -> None:
        """Hold `hidden`, pushed by `sender` for step `step` of session `s` before that step
        came; beyond a bound, raises LimitError and holds nothing new (older pushes it was to
        replace may be gone)."""
        pushes = self._by_session.get(s.id, [])
        named = s.prev_hop is None or sender == s.prev_hop
        mine = [p for p in pushes if p.sender == sender]
        slots = MAX_EARLY_PUSHES_PER_SESSION if named else MAX_EARLY_PUSHES_OTHER_KEY
        # a resend of a push replaces it, and a key's oldest goes to make room for its newest
        gone = [p for p in mine if p.step == step] or mine[:max(0, len(mine) + 1 - slots)]
        # within the session's bound, the previous hop's push goes before other keys' pushes,
        # then its own older ones; another key's only before its own
        bound = session_bound_bytes(s)
        room = bound - sum(p.nbytes for p in pushes if p not in gone)
        for p in (sorted(pushes, key=lambda p: p.sender == sender) if named else mine):
            if room >= hidden.nbytes:
                break
            if p not in gone:
                gone.append(p)
                room += p.nbytes
        if room < hidden.nbytes:
            self._refuse(f"{_size(hidden.nbytes)} do not fit session {s.id[:8]}: it holds {_size(bound - room)} "
                         f"of early pushes of other keys, of at most {_size(bound)} (one float32 step over its "
                         "positions left)")
        for p in gone:
            self._release(p)
        self._charge(sender, hidden.nbytes)
        self._by_session.setdefault(s.id, []).append(EarlyPush(s.id, step, hidden, sender))

    def take(self, s: ServerSession, step: object, expected: str | None) -> torch.Tensor | None:
        """Step `step`'s input, if its previous hop (`expected`; None: any key) pushed it already."""
        for p in self._by_session.get(s.id, ()):
            if p.step == step and (expected is None or p.sender == expected):
                self._release(p)
                return p.hidden
        return None

    def named(self, s: ServerSession, prev_hop: str) -> None:
        """A step named the session's previous hop: other keys' pushes cannot be its input."""
        s.prev_hop = prev_hop
        for p in [p for p in self._by_session.get(s.id, ()) if p.sender != prev_hop]:
            self._release(p)

    def forget(self, sid: str) -> None:
        for p in list(self._by_session.get(sid, ())):
            self._release(p)

    def expire(self, older_than: float, live: Callable[[str], bool]) -> None:
        """Let go of pushes that arrived before monotonic time `older_than`, or whose session is gone."""
        for sid, pushes in list(self._by_session.items()):
            for p in [p for p in pushes if p.arrived < older_than or not live(sid)]:
                self._release(p)

    def _charge(self, sender: str | None, nbytes: int) -> None:
        try:
            self.budget.reserve(nbytes)
        except CacheFullError:
            self._refuse(f"{_size(nbytes)} do not fit the {_size(self.budget.free_bytes)} of KV cache budget "
                         "free here")
        try:
            self.limits.admit_push(sender, self.kv_bytes_of(sender) + self.held_by(sender), nbytes,
                                   self.budget.max_bytes)
        except LimitError:
            self.budget.release(nbytes)
            self.refused += 1
            raise
        self._by_key[sender] = self.held_by(sender) + nbytes
        self.count += 1
        self.nbytes += nbytes

    def _refuse(self, why: str) -> None:
        self.refused += 1
        raise LimitError(why)

    def _release(self, p: EarlyPush) -> None:
        pushes = self._by_session[p.session]
        pushes.remove(p)
        if not pushes:
            del self._by_session[p.session]
        left = self._by_key[p.sender] - p.nbytes
        if left:
            self._by_key[p.sender] = left
        else:
            del self._by_key[p.sender]
        self.count -= 1
        self.nbytes -= p.nbytes
        self.budget.release(p.nbytes)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"
