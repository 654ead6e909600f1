"""One step along an app session's route: sent to every hop at once with pushes between the
servers (or hop by hop, without), each hop's reply checked (its cache position, its output,
the input it says it ran on), and a failure named by where it happened: at a hop (HopFailure)
or in a push the gateway never saw (PushDispute). What to do about a failure (replace the
server, run the step again) is the gateway's."""

from __future__ import annotations

import logging
import time

import torch

from libswarm.errors import PeerUnavailableError, SessionError, SwarmError, WrongOutputError
from libswarm.protocol import Message
from libswarm.protocol.tensors import tensor_digest
from swarmd.gateway.resend import Resender
from swarmd.gateway.router import Router, hidden_of
from swarmd.gateway.sessions import GatewaySession, step_fields
from swarmd.routing import Hop
from swarmd.transport.connection import PeerConnection

log = logging.getLogger("swarmd.gateway")


class PushDispute(Exception):
    """Hop `index` ran on an input other than the one the hop before it returned to the gateway
    (a push the gateway never saw), or does not say what it ran on: its output and every later
    hop's are not to be used. `outputs` holds what the hops before it returned; `suspect` is the
    pusher to stop trusting with pushes, `blind` the hop that does not say what it ran on."""

    def __init__(self, index: int, outputs: dict[int, torch.Tensor], why: str, suspect: str | None = None,
                 blind: str | None = None):
        super().__init__(why)
        self.index, self.outputs, self.why, self.suspect, self.blind = index, outputs, why, suspect, blind


class HopFailure(Exception):
    """Hop `index` of a chain failed; `outputs` holds what the hops before it returned."""

    def __init__(self, index: int, outputs: dict[int, torch.Tensor], error: SwarmError):
        super().__init__(str(error))
        self.index, self.outputs, self.error = index, outputs, error


class StepChain:
    def __init__(self, router: Router, resender: Resender):
        self.router, self.resender = router, resender

    def run(self, sess: GatewaySession, start: int, x: torch.Tensor, small: dict[str, torch.Tensor],
            step: int, tokens: int, joined: frozenset[str] | set[str] = frozenset(),
            rollback: bool = False) -> dict[int, torch.Tensor]:
        """Step hops start.. of the route. With push, the gateway sends the step to every hop at
        once (hidden states only to the first), and each server pushes its output to the next
        and returns a copy here: n+1 network hops per token instead of 2n. Each hop says what
        input it ran on, which must be what the hop before returned here (raises PushDispute).
        With `rollback`, every hop first cuts its cache back to where the step starts. Returns
        each hop's output; raises HopFailure naming the first hop that failed."""
        hops, sids, n = sess.hops, sess.server_sessions, len(sess.hops)
        expect_position = sess.position + x.shape[1]
        outputs: dict[int, torch.Tensor] = {}
        if not sess.push:
            for k in range(start, n):
                try:
                    t0 = time.monotonic()
                    own = self.router.allowance_s(hops[k].address, tokens)
                    conn = self.router.pool.get(hops[k].address)
                    fields, tensors = step_fields(sess, k, step, rollback), {"hidden": x, **small}

                    def ask(conn=conn, fields=fields, tensors=tensors, own=own) -> tuple[PeerConnection, int]:
                        return conn, conn.send("step", fields, tensors, timeout_s=own)

                    reply, resends = self.resender.await_reply(hops[k].address, ask(), ask, t0, t0 + own, tokens)
                    check_consumed(hops, k, reply.get("consumed"), x, outputs, joined, could_be_pushed=False)
                    x = self.accept(hops[k], reply, expect_position, time.monotonic() - t0, tokens, x,
                                    timed=not resends)
                except SwarmError as e:
                    raise HopFailure(k, outputs, e) from None
                outputs[k] = x
            return outputs
        t0 = time.monotonic()
        keys = [self.router.pool.resolve_key(h.address) for h in hops]  # once per hop and step
        # pushes only over links the gateway can vouch for: from a server whose push was never
        # disputed, to one that says what it ran on. Over others the gateway hands the input over
        linked = [k > start and self.router.pushes.allowed(hops[k - 1].address, hops[k].address) for k in range(n)]
        sent: dict[int, tuple] = {}
        awaiting_push: set[int] = set()  # hops told to take their input from a push

        def send(k: int, hidden: torch.Tensor | None) -> None:
            fields = step_fields(sess, k, step, rollback)
            if hidden is None:  # its input is pushed by the previous hop, and by no other key
                fields["expect_push"], fields["from"] = True, keys[k - 1]
                awaiting_push.add(k)
            else:
                awaiting_push.discard(k)
            if k < n - 1 and linked[k + 1]:
                fields["next"] = next_hop(hops[k + 1], sids[k + 1], keys[k + 1])
            conn = self.router.pool.get(hops[k].address, keys[k])
            sent[k] = (conn, conn.send("step", fields, {"hidden": hidden, **small} if hidden is not None else small))

        send_failure = None
        for k in range(start, n):
            if k > start and not linked[k]:
                continue  # sent once the hop before has answered, with its output as the input
            try:
                send(k, x if k == start else None)
            except SwarmError as e:
                send_failure = HopFailure(k, outputs, e)
                break
        allowance, t_prev = 0.0, t0
        for k in range(start, n):
            if send_failure is not None and k >= send_failure.index:
                raise send_failure
            hop_input = x if k == start else outputs[k - 1]
            try:
                if k not in sent:
                    send(k, hop_input)
                conn, req_id = sent[k]
                own, added = self.router.allowances(hops[k].address, tokens)
                allowance += own if k == start else added
                # within the chain's allowance from the start, and within its own from when the hop
                # before answered (its input was pushed then): a hung hop after fast ones is not
                # given the others' unused time (for hops not measured yet, 10 s each)
                deadline = min(t0 + allowance, t_prev + own)
                waited_push, resends = k in awaiting_push, 0

                def resend(k: int = k, hop_input: torch.Tensor = hop_input) -> tuple[PeerConnection, int]:
                    send(k, hop_input)  # with its input: it replaces a step still waiting for a lost push
                    return sent[k]

                try:
                    reply, resends = self.resender.await_reply(hops[k].address, (conn, req_id), resend,
                                                               t0 if k == start else t_prev, deadline, tokens)
                    if waited_push and (k in awaiting_push or reply.get("repeated")):
                        self.router.pushes.delivered(hops[k - 1].address)
                    elif waited_push:  # answered once resent with its input: the push was lost, or never made
                        self.router.pushes.missed(hops[k - 1].address, f"its push to {hops[k].address} did not come")
                except PeerUnavailableError:
                    if k not in awaiting_push:
                        raise
                    send(k, hop_input)
                    reply = self._without_push(hops, k, sent[k], own)
                check_consumed(hops, k, reply.get("consumed"), hop_input, outputs, joined,
                               could_be_pushed=k in awaiting_push or bool(reply.get("repeated")),
                               repeated=bool(reply.get("repeated")))
                outputs[k] = self.accept(hops[k], reply, expect_position, time.monotonic() - t_prev, tokens,
                                         hop_input, timed=not resends)
            except SwarmError as e:
                if k in awaiting_push and e.peer is not None and e.consumed is not None:
                    # refused for its input: when that was not what the hop before returned here,
                    # the refusal is the pusher's doing (raises PushDispute)
                    check_consumed(hops, k, e.consumed, hop_input, outputs, joined, could_be_pushed=True)
                raise HopFailure(k, outputs, e) from None
            if reply.get("pushed") is False and k + 1 in sent:
                # the server could not reach the next one: hand the output over ourselves. If we
                # cannot reach it either, the next server is the one that failed, not this one
                # (blaming this one would replace a healthy server and then fail again on the
                # dead one: two failovers for one death)
                try:
                    send(k + 1, outputs[k])
                except SwarmError as e:
                    raise HopFailure(k + 1, outputs, e) from None
            t_prev = time.monotonic()
        if send_failure is not None:
            raise send_failure
        return outputs

    def _without_push(self, hops: list[Hop], k: int, resent: tuple, own_s: float) -> Message:
        """Hop k, told to take its input from the hop before's push, did not answer in time: the
        push may never have come (a hostile pusher saying it pushed, or a lost message), which
        is no fault of hop k's. The step goes to it again with its input (replacing the one
        waiting for the push); if it answers now, the pusher is not asked to push again, and hop
        k is blamed only if it fails this time too. `resent`: (connection, request id) of the
        step sent again with its input."""
        log.info("server %s: no answer while waiting for the push of %s; sent it its input", hops[k].address,
                 hops[k - 1].address)
        conn, req_id = resent
        reply = conn.receive(req_id, time.monotonic() + own_s, "step")
        self.router.pushes.suspect(hops[k - 1].address, f"its push to {hops[k].address} never arrived")
        return reply

    def accept(self, hop: Hop, reply: Message, expect_position: int, seconds: float, tokens: int,
               x: torch.Tensor, band: bool = True, timed: bool = True) -> torch.Tensor:
        """The hop's output, checked; with `timed`, its time counts in its server's pace (not when
        it was resent: the time then is this gateway's wait, not the server's)."""
        if reply.get("position") != expect_position:
            raise SessionError(f"server {hop.address} is at position {reply.get('position')}, "
                               f"the session at {expect_position}")
        out = self.router.check(hop, x, hidden_of(reply, hop.address), band)
        if timed and not reply.get("repeated"):
            self.router.step_times.record(hop.address, seconds, tokens, hop.last - hop.first)
        self.router.bans.succeeded(hop.address)
        return out


def check_consumed(hops: list[Hop], k: int, said: object, hop_input: torch.Tensor,
                   outputs: dict[int, torch.Tensor], joined: frozenset[str] | set[str],
                   could_be_pushed: bool, repeated: bool = False) -> None:
    """Hop k ran on `hop_input`, the input the gateway holds for it (what the hop before
    returned), as its reply's `consumed` (`said`) says; else raises PushDispute, when its
    input may have come by push, or WrongOutputError, when it came from the gateway alone
    (the server then says itself that it ran on something else)."""
    if said == tensor_digest(hop_input):
        return
    address = hops[k].address
    if not could_be_pushed or k == 0:
        if said is None:
            return  # a server older than protocol 1.5: it ran on what this gateway sent it
        raise WrongOutputError(f"server {address} says it ran on another input than the one it was sent")
    if said is None:
        raise PushDispute(k, outputs, f"server {address} does not say which input it ran on",
                          blind=address)
    pusher = hops[k - 1].address
    if repeated and pusher in joined:
        # it ran the step before, on the push of a server that failed since (and that the
        # gateway never heard from): nobody to suspect, the step runs again from our copy
        raise PushDispute(k, outputs, f"server {address} ran this step on a push of a server replaced since")
    raise PushDispute(k, outputs, f"server {address} ran on another input than the one {pusher} returned "
                                  f"(blocks {hops[k - 1].first}:{hops[k - 1].last})", suspect=pusher)


def next_hop(hop: Hop, sid: str, key: str | None) -> dict:
    """Where a server pushes its output: the next server's address, key and session."""
    if key is None:
        raise PeerUnavailableError(f"peer {hop.address}: its public key is not known")
    return {"address": hop.address, "key": key, "session": sid}
