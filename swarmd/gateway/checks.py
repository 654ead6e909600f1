"""Checking servers' outputs against other servers' (docs/security.md), as `swarm.verify` says:
with `sample`, now and then one hop of a session checked off the step's path (a spot check, on
a thread of its own); with `strict`, every hop's output for every step beside a shadow's (other
servers that hold the same blocks, fed the same inputs); an output outside its norm band, by a
second opinion. When two disagree, a third server decides which one lies, and that one is
distrusted. Counts the checks and their outcomes (`swarmctl status`)."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from libswarm.errors import NoRouteError, SwarmError, WrongOutputError
from swarmd.gateway.chain import StepChain
from swarmd.gateway.history import History
from swarmd.gateway.router import Router, retriable, route_text
from swarmd.gateway.sessions import GatewaySession, Shadow, step_fields
from swarmd.gateway.spans import SpanOpener
from swarmd.gateway.verify import disagreement
from swarmd.routing import Hop, missing_blocks

log = logging.getLogger("swarmd.gateway")

CHECK_TIMEOUT_S = 10.0  # a check that cannot find or use other servers this long gives up
MAX_QUEUED_CHECKS = 4  # spot checks waiting for the checking thread; more are skipped (counted)


class LieDetected(Exception):
    """A step's output was shown wrong after the whole route ran it: rebuild and run it again."""




class OutputChecks:
    """The checks of one gateway, in the mode `swarm.verify` names ("off", "sample", "strict")."""

    def __init__(self, router: Router, opener: SpanOpener, chain: StepChain, mode: str, probability: float):
        self.router, self.opener, self.chain = router, opener, chain
        self.mode, self.probability = mode, probability
        self.counts = {"run": 0, "passed": 0, "failed": 0, "inconclusive": 0, "skipped": 0}
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._check_queue: queue.Queue = queue.Queue(MAX_QUEUED_CHECKS)
        self._checker: threading.Thread | None = None
        self.pending = 0  # spot checks queued or running: each holds sessions on the servers checking
        self._shadow_pool = ThreadPoolExecutor(8, thread_name_prefix="shadow") if mode == "strict" else None

    def sample(self, sess: GatewaySession) -> None:
        """sample: after a step, a spot check of the session with the mode's probability."""
        if self.mode == "sample" and self._rng.random() < self.probability:
            self._queue_check(sess)

    def _compute_elsewhere(self, first: int, last: int, replay: dict[str, torch.Tensor], avoid: frozenset[str],
                           batch: int, adapter: str | None) -> tuple[torch.Tensor, list[Hop]]:
        """Blocks [first, last) run on `replay` by servers other than `avoid`, in fresh sessions
        closed afterwards: the output, and the hops that computed it."""
        length = replay["hidden"].shape[1]
        hops, sids, _, _ = self.opener.open(first, last, max_length=length, batch=batch,
                                            deadline=time.monotonic() + CHECK_TIMEOUT_S, history=None,
                                            adapter=adapter, avoid=avoid)
        try:
            x = dict(replay)
            for hop, sid in zip(hops, sids):  # compared with another server's: no band needed
                x["hidden"] = self.opener.replay(hop, sid, x, band=False)
            return x["hidden"], hops
        finally:
            self.router.close_remote(list(zip(hops, sids)))

    def _judge(self, first: int, last: int, replay: dict[str, torch.Tensor], cut: int,
               claims: dict[str, tuple[torch.Tensor, list[str]]], avoid: frozenset[str], batch: int,
               adapter: str | None) -> str | None:
        """Two servers' outputs (`claims`: name -> its output from position `cut` on, and the
        addresses that computed it) differ: a third computes the same, and the one it
        contradicts while confirming the other is distrusted. Returns the name found lying, or
        None (no third, or no majority)."""
        try:
            third, hops = self._compute_elsewhere(first, last, replay, avoid, batch, adapter)
        except SwarmError as e:
            self._count("inconclusive")
            log.warning("blocks %d:%d: %s disagree and no third server settles it (%s)", first, last,
                        " and ".join(claims), e)
            return None
        third = third[:, cut:]
        judges = [h.address for h in hops]
        verdict = {a: disagreement(out, third, self.router.tolerance(chain, judges, last - first))
                   for a, (out, chain) in claims.items()}
        wrong = [a for a, why in verdict.items() if why is not None]
        if len(wrong) != 1:
            self._count("inconclusive")
            log.warning("blocks %d:%d: %s disagree and %s agrees with %s", first, last, " and ".join(claims),
                        route_text(hops), "neither" if wrong else "both")
            return None
        liar = wrong[0]
        self.router.bands.learn((first, last), replay["hidden"][:, cut:], third)  # two servers agree on it
        for a in claims:
            if a != liar:
                self.router.reputation.passed(a)
        self.router.reputation.offence(liar, f"blocks {first}:{last}: {verdict[liar]} "
                                              f"(contradicted by {' and '.join(a for a in claims if a != liar)} and "
                                              f"{route_text(hops)})")
        self.router.bans.ban(liar)
        return liar

    def cross_check(self, sess: GatewaySession, inputs: dict[int, torch.Tensor], small: dict[str, torch.Tensor],
                     step: int) -> None:
        """strict: each hop's output for this step computed again by a shadow (other servers
        holding its blocks, fed the same inputs every step), side by side; raises LieDetected
        when a hop's output was wrong (after distrusting its server)."""
        assert self._shadow_pool is not None
        jobs = [(hop, self._shadow_pool.submit(self._shadow_step, sess, hop, inputs[hop.first], small, step))
                for hop in sess.hops]
        for hop, job in jobs:
            shadow, theirs = job.result()
            ours = inputs[hop.last]
            why = self._compare(hop, inputs[hop.first], ours, theirs, shadow.hops)
            if why is None:
                continue
            # the third computes every position so far and this step's, from the history
            trial = History({b: list(v) for b, v in sess.history.inputs.items()}, list(sess.history.positions),
                            list(sess.history.masks))
            trial.append(inputs, [hop.first], small["position_ids"], small.get("key_mask"), small.get("beam_order"))
            replay = trial.replay_inputs(hop.first)
            liar = self._settle(sess, hop, ours, theirs, shadow.hops, replay, replay["hidden"].shape[1] - ours.shape[1])
            if liar == hop.address:
                raise LieDetected()
            self._close_shadow(sess, (hop.first, hop.last))
            if liar is None:
                raise WrongOutputError(f"blocks {hop.first}:{hop.last}: the servers' outputs disagree ({why}) and "
                                       "strict verification found no majority")

    def _shadow_step(self, sess: GatewaySession, hop: Hop, x: torch.Tensor, small: dict[str, torch.Tensor],
                     step: int) -> tuple[Shadow, torch.Tensor]:
        span = (hop.first, hop.last)
        shadow = sess.shadows.get(span)
        if shadow is not None and shadow.main != hop.address:
            self._close_shadow(sess, span)
            shadow = None
        deadline = time.monotonic() + sess.route_timeout_s
        for attempt in range(3):
            if shadow is None:
                try:
                    hops, sids, _, _ = self.opener.open(
                        hop.first, hop.last, max_length=sess.max_length, batch=sess.batch, deadline=deadline,
                        history=sess.history if sess.position else None, adapter=sess.adapter,
                        avoid=frozenset({hop.address}))
                except NoRouteError as e:
                    raise NoRouteError(f"strict verification needs a second server for blocks "
                                       f"{hop.first}:{hop.last}: {e}") from None
                shadow = sess.shadows[span] = Shadow(hop.address, hops, sids)
            try:
                out = x
                for h, sid in zip(shadow.hops, shadow.sids):
                    fields = step_fields(sess, 0, step)
                    fields["session"] = sid
                    t0 = time.monotonic()
                    tokens = out.shape[0] * out.shape[1]
                    reply = self.router.pool.get(h.address).request(
                        "step", fields, {"hidden": out, **small}, timeout_s=self.router.allowance_s(h.address, tokens))
                    out = self.chain.accept(h, reply, sess.position + x.shape[1], time.monotonic() - t0, tokens,
                                            out, band=False)  # compared with the hop's own
                return shadow, out
            except SwarmError as e:
                if retriable(e):
                    for h in shadow.hops:
                        if not self.router.bans.is_banned(h.address):
                            self.router.fail(h, e)
                self._close_shadow(sess, span)
                shadow = None
                if not retriable(e) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _close_shadow(self, sess: GatewaySession, span: tuple[int, int]) -> None:
        shadow = sess.shadows.pop(span, None)
        if shadow is not None:
            self.router.close_remote(list(zip(shadow.hops, shadow.sids)))

    def close_shadows(self, sess: GatewaySession) -> None:
        for span in list(sess.shadows):
            self._close_shadow(sess, span)

    def _queue_check(self, sess: GatewaySession) -> None:
        """sample: one hop of the session, picked at random, checked off the step's path. What
        is checked is a copy of the history, so the app goes on meanwhile."""
        if sess.checking:
            self._count("skipped")
            return
        k = self._rng.randrange(len(sess.hops))
        hop, since = sess.hops[k], min(sess.since[k], sess.position)
        if since >= sess.position:
            return
        others = [s for s in self.router.table.servers_for(self.router.model_id, sess.adapter)
                  if s.address != hop.address and not self.router.bans.is_banned(s.address)
                  and not self.router.reputation.is_distrusted(s.address)]
        if missing_blocks(others, hop.last, hop.first):  # nobody else holds those blocks now: nothing to compare
            self._count("skipped")
            return
        replay = sess.history.replay_inputs(hop.first)
        expected = torch.cat(sess.history.inputs[hop.last], dim=1)[:, since:]
        with self._lock:
            try:
                self._check_queue.put_nowait((sess, hop, replay, since, expected))
            except queue.Full:
                self.counts["skipped"] += 1
                return
            self.pending += 1
        sess.checking = True
        if self._checker is None:
            self._checker = threading.Thread(target=self._check_loop, name="checks", daemon=True)
            self._checker.start()

    def _check_loop(self) -> None:
        while True:
            sess, hop, replay, since, expected = self._check_queue.get()
            try:
                self._spot_check(sess, hop, replay, since, expected)
            except Exception as e:  # a check must never take the gateway down
                self._count("inconclusive")
                log.warning("spot check of %s on blocks %d:%d: %s", hop.address, hop.first, hop.last, e)
            finally:
                sess.checking = False
                with self._lock:
                    self.pending -= 1

    def _spot_check(self, sess: GatewaySession, hop: Hop, replay: dict[str, torch.Tensor], since: int,
                    expected: torch.Tensor) -> None:
        """Positions `since`.. of the session as the hop's server computed them, against other
        servers given the same inputs (every position, to rebuild the cache)."""
        try:
            theirs, checkers = self._compute_elsewhere(hop.first, hop.last, replay,
                                                       frozenset({hop.address}),
                                                       sess.batch, sess.adapter)
        except SwarmError as e:
            self._count("inconclusive")
            log.info("spot check of %s on blocks %d:%d: no other server to check it (%s)", hop.address, hop.first,
                     hop.last, e)
            return
        theirs = theirs[:, since:]
        if self._compare(hop, replay["hidden"][:, since:], expected, theirs, checkers) is None:
            return
        if self._settle(sess, hop, expected, theirs, checkers, replay, since) == hop.address:
            # its wrong outputs are in the session's caches and history: the next step rebuilds
            # the route from the app's own inputs, through servers that did not lie
            sess.broken = True

    def _compare(self, hop: Hop, x: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor,
                 checkers: list[Hop]) -> str | None:
        """A check of the hop's output `ours` for the input `x` against the checkers' (counted):
        why they differ, or None (then every server involved passed, and the span's norm band
        learns from the output two servers agree on)."""
        tol = self.router.tolerance([hop.address], [h.address for h in checkers], hop.last - hop.first)
        why = disagreement(ours, theirs, tol)
        self._count("run")
        self._count("failed" if why is not None else "passed")
        if why is None:
            for a in {hop.address, *(h.address for h in checkers)}:
                self.router.reputation.passed(a)
            self.router.bands.learn((hop.first, hop.last), x, ours)
        return why

    def second_opinion(self, sess: GatewaySession, hop: Hop, x: torch.Tensor, out: torch.Tensor,
                        small: dict[str, torch.Tensor], why: str) -> str:
        """The hop's output `out` for this step's input `x` is outside the norm band: other
        servers run its blocks on every position so far and this step's, at once. Returns
        "confirmed" (they agree, or a third sided with the hop), "liar" (a third sided with
        them: the hop's server is distrusted) or "unsettled" (no other server, no majority)."""
        log.warning("server %s on blocks %d:%d: %s; asking another server", hop.address, hop.first, hop.last, why)
        trial = History({b: list(v) for b, v in sess.history.inputs.items()}, list(sess.history.positions),
                        list(sess.history.masks))
        trial.append({hop.first: x}, [hop.first], small["position_ids"], small.get("key_mask"), small.get("beam_order"))
        replay = trial.replay_inputs(hop.first)
        cut = replay["hidden"].shape[1] - out.shape[1]
        try:
            theirs, checkers = self._compute_elsewhere(hop.first, hop.last, replay,
                                                       frozenset({hop.address}),
                                                       sess.batch, sess.adapter)
        except SwarmError as e:
            self._count("inconclusive")
            log.warning("blocks %d:%d: no other server to confirm %s's output (%s)", hop.first, hop.last,
                        hop.address, e)
            return "unsettled"
        theirs = theirs[:, cut:]
        if self._compare(hop, x, out, theirs, checkers) is None:
            return "confirmed"
        liar = self._settle(sess, hop, out, theirs, checkers, replay, cut)
        return "unsettled" if liar is None else "liar" if liar == hop.address else "confirmed"

    def _settle(self, sess: GatewaySession, hop: Hop, ours: torch.Tensor, theirs: torch.Tensor, checkers: list[Hop],
                replay: dict[str, torch.Tensor], cut: int) -> str | None:
        """The hop and its checkers disagree: a third settles it (_judge). A chain of checkers
        is one claim: its wrong answer cannot be pinned on one of its servers."""
        chain = [h.address for h in checkers]
        claims = {hop.address: (ours, [hop.address]),
                  chain[0] if len(chain) == 1 else route_text(checkers): (theirs, chain)}
        avoid = frozenset({hop.address, *chain})
        return self._judge(hop.first, hop.last, replay, cut, claims, avoid, sess.batch, sess.adapter)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def status(self) -> dict:
        with self._lock:
            counts, pending = dict(self.counts), self.pending
        return {"mode": self.mode, "probability": self.probability if self.mode == "sample" else None,
                "checks": counts, "pending": pending, "servers": self.router.reputation.to_json(),
                "push_suspects": self.router.pushes.to_json()}

