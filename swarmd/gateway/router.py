"""What the gateway's inference sessions and training chains share: the swarm's servers as
chains of hops (planned from the peer table, avoiding servers that failed lately), how long a
hop may take, and the app's inputs as checked tensors."""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time

import torch

from libswarm.errors import (
    NoRouteError,
    PeerUnavailableError,
    ProtocolError,
    RemoteError,
    SessionError,
    SpanMovedError,
    SwarmError,
    TensorError,
    WrongModelError,
    WrongOutputError,
)
from libswarm.protocol import Message
from swarmd.discovery.membership import Membership
from swarmd.discovery.table import PeerTable
from swarmd.gateway.bans import Bans
from swarmd.gateway.history import StepTimes
from swarmd.gateway.verify import NormBands, Numerics, PushLinks, Reputation, Tolerance, check_output, pair_tolerance
from swarmd.inputs import beam_order, positions_and_mask
from swarmd.routing import Hop, ServerSpan, plan_chain
from swarmd.transport.connection import ConnectionPool

log = logging.getLogger("swarmd.gateway")

DEFAULT_ROUTE_TIMEOUT_S = 60.0  # how long a step or open may wait for servers to cover the blocks
MAX_ROUTE_TIMEOUT_S = 3600.0
STEP_DEADLINE_FLOOR_S = 1.0  # no hop is declared failed sooner than this
STEP_DEADLINE_FACTOR = 10.0  # ...nor before it took this many times its usual time
UNMEASURED_STEP_S = 30.0  # the allowance for a server whose speed is neither measured nor claimed
# A server not measured yet by this gateway is given what its record claims (10 times its
# advertised time for the step) plus this much for one-time costs of a first step; at most
# UNMEASURED_MAX_S, so that a claim of extreme slowness cannot hold a step for ever.
UNMEASURED_FLOOR_S = 10.0
UNMEASURED_MAX_S = 300.0
CLOSE_LATER_S = 5.0  # a failed server's session is closed from a thread of its own, waiting at most this...
MAX_CLOSING = 256  # ...with at most this many waiting their turn (more are left to idle out there)
# A server this gateway timed much slower than its record claims (a lying server, or one whose
# device is now shared with other work: a record's speed is measured once, at its first start)
# is routed by the time measured, for this long after its last timed step; then its claim is
# believed again, so that one that recovered is tried and timed anew. "Much": over 3 times its
# claim and over 100 ms more a one-token step through its span, well beyond noise.
MEASURED_FOR_S = 300.0
SLOWER_FACTOR = 3.0
SLOWER_MARGIN_S = 0.1
FALLBACK_PACE_S = 2.0  # a route through servers that all failed lately is tried at most this often
NEWS_PACE_S = 0.05  # a gateway waiting for a route looks at the table's news at most this often
# Errors after which another server may succeed: the server is gone, failed, lost the
# session or moved. Other errors are refusals (see refused) when a server answered them, and
# the request's own fault when raised here.
MAX_REMEMBERED = 4096  # servers whose output dtype is remembered (the oldest forgotten first)
RETRIABLE = (PeerUnavailableError, RemoteError, SessionError, SpanMovedError)


def refused(error: SwarmError) -> bool:
    """A server answered a request with an error of another kind (a limit, a protocol or tensor
    error, another model): requests reach servers checked by the gateway, so the fault may be
    the server's (its own limits or load, a broken or hostile server) or the request's (one no
    server takes). Another server is tried; when a second one refuses the same request with the
    same code, the refusal goes back to the app (docs/protocol.md, "Failure detection")."""
    return error.peer is not None and not isinstance(error, RETRIABLE)


def retriable(error: SwarmError) -> bool:
    """Whether another server may succeed where this one failed or refused."""
    return isinstance(error, RETRIABLE) or refused(error)


class Router:
    def __init__(self, *, model_id: str, num_layers: int, hidden_size: int, pool: ConnectionPool, table: PeerTable,
                 membership: Membership):
        self.model_id, self.num_layers, self.hidden_size = model_id, num_layers, hidden_size
        self.pool, self.table, self.membership = pool, table, membership
        self.bans = Bans()
        self.step_times = StepTimes()
        self.bands = NormBands()
        self.pushes = PushLinks()
        self._dtypes: dict[str, str] = {}  # address -> the dtype of its latest output
        self.reputation = Reputation(key_of=lambda a: self.pool.resolve_key(a),
                                     distrust=lambda key, why, s: self.table.set_distrust(key, why, s))
        self._rng = random.Random()
        self._closing: queue.Queue[tuple[str, str]] = queue.Queue(MAX_CLOSING)
        self._closer: threading.Thread | None = None
        self._closer_lock = threading.Lock()

    def plan(self, first: int, last: int, deadline: float, exclude: frozenset[str] | set[str] = frozenset(),
             spread: bool = False, adapter: str | None = None) -> list[Hop]:
        """A chain over blocks [first, last) avoiding banned servers (unless, after a refresh of
        the table, only banned ones cover a block), waiting (with capped doubling backoff,
        refreshing the peer table) until `deadline` for one to exist. The lowest-latency chain,
        or with `spread` (forward batches) a random one weighted by speed."""
        backoff_s, t0, refreshed = 0.2, time.monotonic(), 0
        next_refresh = t0
        while True:
            seen = self.table.version()
            # a server caught computing wrong outputs is never used, not even as a last resort
            candidates = [self._as_measured(s) for s in self.table.servers_for(self.model_id, adapter)
                          if s.address not in exclude and not self.reputation.is_distrusted(s.address)]
            banned = self.bans.banned()
            servers = [s for s in candidates if s.address not in banned]
            try:
                try:
                    hops = plan_chain(servers, last, self.model_id, start=first, rng=self._rng if spread else None)
                except NoRouteError:
                    if not refreshed or len(servers) == len(candidates):
                        raise
                    # only servers that failed lately cover some block: a ban is a preference, and a
                    # server that failed (often one that restarted, under churn) beats no route. It
                    # is paced by its ban (at most FALLBACK_PACE_S), so that one failing fast is
                    # not asked again in a tight loop
                    hops = plan_chain(candidates, last, self.model_id, start=first,
                                      rng=self._rng if spread else None)
                    wait_s = max((self.bans.remaining_s(h.address) for h in hops), default=0.0)
                    time.sleep(max(0.0, min(wait_s, FALLBACK_PACE_S, deadline - time.monotonic())))
                if refreshed:
                    log.info("route for blocks %d:%d found after %.2f s and %d table refreshes", first, last,
                             time.monotonic() - t0, refreshed)
                return hops
            except NoRouteError as e:
                if refreshed:  # the table was fresh and still no route: wait for servers to come
                    left_s = deadline - time.monotonic()
                    if left_s <= 0:
                        hosting = f" hosting adapter {adapter!r}" if adapter else ""
                        raise NoRouteError(f"{e}{hosting} (waited {time.monotonic() - t0:.1f} s)") from None
                    # until news in the table (a server that comes back is routed at once), or the
                    # backoff: a ban that ends is no news. News is looked at without asking the
                    # peers again; they are asked once the backoff is over
                    self.table.wait_news(seen, min(next_refresh - time.monotonic(), left_s))
                    if time.monotonic() < next_refresh:
                        time.sleep(NEWS_PACE_S)  # a burst of news is looked at once
                        continue
                    backoff_s = min(backoff_s * 2, 2.0)
                # ask the peers again (a server may have just come back); banned ones, maybe
                # hung, would only stall the refresh
                self.membership.refresh(skip=self.bans.banned())
                refreshed += 1
                next_refresh = time.monotonic() + backoff_s

    def _as_measured(self, s: ServerSpan) -> ServerSpan:
        """`s` with its measured speed in place of its record's claim when it claims none or is
        much slower."""
        measured = self.step_times.block_s(s.address, s.rtt_s or 0.0, MEASURED_FOR_S)
        if measured is None:
            return s
        if s.block_s is not None and (measured <= SLOWER_FACTOR * s.block_s
                                      or (measured - s.block_s) * (s.end - s.start) <= SLOWER_MARGIN_S):
            return s
        return dataclasses.replace(s, block_s=measured)

    def annotate(self, rows: list[dict]) -> list[dict]:
        """Peer-table rows (`swarmctl peers`) with what this gateway timed: `step_ms`, a one-token
        step measured lately (None if never), and a note on a server routed by that rather than
        its claim."""
        for row in rows:
            address, span = row.get("address"), row.get("span")
            expected = self.step_times.expected_s(address, 1) if address else None
            row["step_ms"] = round(expected * 1000, 3) if expected is not None else None
            if address is None or expected is None or not span or row.get("is_self"):
                continue
            blocks = span[1] - span[0]
            claim = ServerSpan(address, span[0], span[1], block_s=(1.0 / (row["throughput"] * blocks)
                                                                  if row.get("throughput") else None),
                               rtt_s=row["rtt_ms"] / 1000 if row.get("rtt_ms") is not None else None)
            if claim.block_s is not None and self._as_measured(claim) != claim and not row.get("error"):
                row["error"] = (f"slower than it claims: {claim.block_s * blocks * 1000:.1f} ms a step, "
                                f"{expected * 1000:.1f} measured")
        return rows

    def allowance_s(self, address: str, tokens: int) -> float:
        """How long a hop may take before it is called failed."""
        return self.allowances(address, tokens)[0]

    def allowances(self, address: str, tokens: int) -> tuple[float, float]:
        """(How long a hop may take before it is called failed, what it adds to a chain's
        allowance after the chain's first hop: the hops of a chain share one floor.)"""
        expected = self.step_times.expected_s(address, tokens)
        if expected is None:
            # not measured by this gateway yet: as fast as its record claims, with a margin. A
            # claim of speed that the server does not keep (a wedged device, a hostile server)
            # fails it in seconds rather than a flat half minute; an honest slow server's long
            # prefill gets the time its claim says it needs
            claimed = self.table.claimed_step_s(address, tokens)
            own = UNMEASURED_STEP_S if claimed is None else min(
                UNMEASURED_MAX_S, UNMEASURED_FLOOR_S + STEP_DEADLINE_FACTOR * claimed)
            return own, own
        return STEP_DEADLINE_FLOOR_S + STEP_DEADLINE_FACTOR * expected, STEP_DEADLINE_FACTOR * expected

    def check(self, hop: Hop, x: torch.Tensor, out: torch.Tensor, band: bool = True) -> torch.Tensor:
        """A hop's output for the input `x`, checked (shape, dtype, finite, and with `band`,
        norms in the band of its span: not for an output that is compared with another server's
        anyway)."""
        check_output(x, out, (hop.first, hop.last), self.bands if band else None)
        dtype = str(out.dtype).removeprefix("torch.")
        if self._dtypes.get(hop.address) != dtype:
            self._dtypes.pop(hop.address, None)
            self._dtypes[hop.address] = dtype
            while len(self._dtypes) > MAX_REMEMBERED:
                del self._dtypes[next(iter(self._dtypes))]
        return out

    def output_dtype(self, address: str) -> torch.dtype | None:
        """The dtype of the latest output of the server at `address` (None before its first)."""
        name = self._dtypes.get(address)
        dtype = getattr(torch, name, None) if name is not None else None
        return dtype if isinstance(dtype, torch.dtype) else None

    def numerics(self, address: str) -> Numerics:
        """How the server at `address` computes: the dtype of its outputs, and its weights' and KV
        cache's quantization as its record says. Self-declared: a server that claims a coarser
        one gets the looser tolerance an honest one of that kind needs, and nothing more."""
        quant, kv = self.table.numerics(address)
        return Numerics(self._dtypes.get(address, "float32"), quant, kv)

    def tolerance(self, a: list[str], b: list[str], blocks: int) -> Tolerance:
        """How far the outputs of two chains of servers (`a`, `b`: addresses) over the same
        `blocks` blocks may honestly differ: as the coarsest server of each computes."""
        def coarsest(chain: list[str]) -> Numerics:
            return max((self.numerics(x) for x in chain), key=lambda n: n.error(blocks))
        return pair_tolerance(coarsest(a), coarsest(b), blocks)

    def fail(self, hop: Hop, error: SwarmError) -> None:
        if isinstance(error, WrongOutputError):
            self.reputation.offence(hop.address, str(error))
        banned_s = self.bans.ban(hop.address)
        self.pool.drop(hop.address)
        log.warning("server %s failed on blocks %d:%d (%s); avoiding it for %.1f s", hop.address, hop.first,
                    hop.last, error, banned_s)

    def close_remote(self, opened: list[tuple[Hop, str]]) -> None:
        """Close server sessions (best effort: a server frees idle sessions itself). One on a
        server that failed (banned) is closed from a thread of its own: the server may hang,
        and the caller must not wait on it; or it may be alive and only slow (a step or replay
        past its allowance on a loaded machine), and then its session would hold cache there
        until the server's idle timeout (10 minutes by default)."""
        for hop, sid in opened:
            if self.bans.is_banned(hop.address):
                self._close_later(hop.address, sid)
                continue
            try:
                self.pool.get(hop.address).request("close", {"session": sid}, timeout_s=2.0)
            except SwarmError as e:
                log.info("closing session on %s: %s", hop.address, e)

    def _close_later(self, address: str, sid: str) -> None:
        try:
            self._closing.put_nowait((address, sid))
        except queue.Full:  # a burst of failures: these sessions idle out on their servers
            return
        with self._closer_lock:
            if self._closer is None:
                self._closer = threading.Thread(target=self._close_loop, name="closer", daemon=True)
                self._closer.start()

    def _close_loop(self) -> None:
        while True:
            address, sid = self._closing.get()
            try:
                self.pool.get(address).request("close", {"session": sid}, timeout_s=CLOSE_LATER_S)
            except SwarmError as e:
                log.info("closing session %s on failed server %s: %s", sid[:8], address, e)
            finally:
                self.pool.drop(address)  # no connection kept here to a server that failed

    def check_model(self, asked: str) -> None:
        if asked != self.model_id:
            raise WrongModelError(
                f"this swarmd serves model {self.model_id}; the app asked for {asked} "
                "(is the app's model directory the same checkpoint as the daemon's `model`?)"
            )

    def tensors(self, msg: Message) -> dict[str, torch.Tensor]:
        """The app's hidden states with their position ids (and key mask, beam order), checked."""
        hidden = msg.tensor("hidden")
        assert hidden is not None
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise ProtocolError(f"hidden must be [batch, length, {self.hidden_size}], got {list(hidden.shape)}")
        if not bool(torch.isfinite(hidden).all()):  # no server is to be blamed for what it was given
            raise TensorError("hidden holds NaN or infinite values")
        B, T, _ = hidden.shape
        out = {"hidden": hidden}
        pos, mask = positions_and_mask(msg, B, T)
        out["position_ids"] = pos if pos is not None else torch.arange(T).expand(B, T)
        if mask is not None:
            out["key_mask"] = mask
        order = beam_order(msg, B)
        if order is not None:  # every hop reorders its cache with the step, and the history follows
            out["beam_order"] = order
        return out


def route_timeout(value: object) -> float:
    """A request's `route_timeout_s` (None: the default), checked."""
    value = DEFAULT_ROUTE_TIMEOUT_S if value is None else value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= MAX_ROUTE_TIMEOUT_S:
        raise ProtocolError(f"route_timeout_s must be a number of seconds within 0..{MAX_ROUTE_TIMEOUT_S:.0f}")
    return float(value)


def route_json(hops: list[Hop]) -> list[list]:
    return [[h.address, h.first, h.last] for h in hops]


def route_text(hops: list[Hop]) -> str:
    return " -> ".join(f"{h.address}[{h.first}:{h.last})" for h in hops)


def hidden_of(reply: Message, address: str) -> torch.Tensor:
    """A step's or forward's output in the reply of the server at `address`."""
    hidden = reply.tensors.get("hidden")
    if hidden is None:  # an impossible reply, as an output of the wrong shape
        raise WrongOutputError(f"server {address} answered without its output")
    return hidden
