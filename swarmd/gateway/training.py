"""The gateway's training chains: `forward` and `backward` passes through every block, with no
cache on the servers, each re-routed around failed hops.

A backward pass needs each hop's input. A forward asked with `keep` leaves them here (keyed
by a pass id the app gets back, bounded in bytes, dropped on backward or after
KEEP_TIMEOUT_S), so that its backward sends them straight to the servers, and asks each server
to keep its activations (peer `forward` with `keep`): a backward that names the server's kept
pass differentiates it, so each block runs forward once per training step, as locally. A
server that did not keep it (no room, expired, moved) recomputes the forward from the input
sent along; to a server that speaks 1.6 the backward sends only the gradient and the pass's
id, and the whole request only if that server no longer holds the pass. A backward without a
kept pass, or whose kept route fails, runs the chain forward again first."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from libswarm.errors import ProtocolError, RemoteError, SessionError, SwarmError, TensorError, WrongOutputError
from libswarm.protocol import registry
from libswarm.protocol.messages import LEAN_BACKWARD_SINCE, Message, speaks
from swarmd.gateway.router import UNMEASURED_STEP_S, Router, hidden_of, refused, retriable, route_timeout
from swarmd.gateway.verify import check_gradient
from swarmd.inputs import lean_backward_pass
from swarmd.routing import Hop, forward_seconds, missing_blocks
from swarmd.runtime.span import client_trainables

log = logging.getLogger("swarmd.gateway")

# A batch expected (from the servers' measured forward throughput) to take longer than this is
# split into at most MAX_SPLIT_PARTS parts run at once: each takes its own speed-weighted chain
# (spreading over the swarm), and the parts pipeline through the hops of one chain. With no
# measurement yet, a batch of SPLIT_MIN_TOKENS positions is split. Not with a single server:
# its parts would queue there, each streaming every weight again (1.23x slower, measured).
SPLIT_MIN_S = 0.02
SPLIT_MIN_TOKENS = 512
MAX_SPLIT_PARTS = 4
KEEP_MAX_BYTES = 512 * 2**20  # hop inputs kept for backward passes, over all apps; the oldest go first
KEEP_TIMEOUT_S = 300.0  # a kept pass whose backward has not come by then is dropped



class ServerPass(NamedTuple):
    """What a hop's server kept of a forward for its backward: the id it answered, and whether
    it speaks protocol 1.6 (a backward may then name the pass alone, without its inputs)."""
    id: str
    lean: bool


# the hops of a pass, in order, each with its input and what its server kept of it
Chain = list[tuple[Hop, torch.Tensor, ServerPass | None]]


@dataclass
class KeptPass:
    parts: list[Chain]  # one chain per part of a split batch
    lora: dict[str, torch.Tensor]  # the app's LoRA tensors of the forward: the backward must send the same
    nbytes: int
    created: float = field(default_factory=time.monotonic)
    # the forward's own input tensors (hidden, positions, mask) and fields: a backward that sends
    # none (protocol 1.6) is run from these, as if it had sent them
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    fields: dict = field(default_factory=dict)


class KeptPasses:
    """Forwards' hop inputs awaiting their backward; thread-safe (apps' requests run at once)."""

    def __init__(self, max_bytes: int = KEEP_MAX_BYTES, timeout_s: float = KEEP_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.timeout_s, self.clock = max_bytes, timeout_s, clock
        self._passes: OrderedDict[str, KeptPass] = OrderedDict()
        self.nbytes = 0
        self.dropped = 0  # passes dropped unused (timeout or room): their backward recomputes
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._passes)

    def put(self, parts: list[Chain], lora: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor] | None = None,
            fields: dict | None = None) -> str | None:
        """Keep a forward's chains (and its inputs and fields); its id, or None when it alone
        exceeds the bound."""
        kept = [x for chain in parts for _, x, _ in chain]
        shared = {x.data_ptr() for x in kept}  # the first hop's input is often the app's hidden itself
        nbytes = sum(x.nbytes for x in kept) + sum(x.nbytes for x in (inputs or {}).values()
                                                   if x.data_ptr() not in shared)
        if nbytes > self.max_bytes:
            return None
        pass_id = secrets.token_hex(12)
        with self._lock:
            self._expire()
            while self._passes and self.nbytes + nbytes > self.max_bytes:
                self._drop(next(iter(self._passes)))
            self._passes[pass_id] = KeptPass(parts, lora, nbytes, self.clock(), dict(inputs or {}), dict(fields or {}))
            self.nbytes += nbytes
        return pass_id

    def take(self, pass_id: object) -> KeptPass | None:
        with self._lock:
            self._expire()
            kept = self._passes.pop(pass_id, None) if isinstance(pass_id, str) else None
            if kept is not None:
                self.nbytes -= kept.nbytes
            return kept

    def expire(self) -> None:
        with self._lock:
            self._expire()

    def _expire(self) -> None:
        now = self.clock()
        while self._passes:
            pass_id, kept = next(iter(self._passes.items()))
            if now - kept.created <= self.timeout_s:
                break
            self._drop(pass_id)

    def _drop(self, pass_id: str) -> None:
        kept = self._passes.pop(pass_id)
        self.nbytes -= kept.nbytes
        self.dropped += 1


class TrainingChains:
    def __init__(self, router: Router, kept: KeptPasses | None = None):
        self.router = router
        self.kept = kept or KeptPasses()
        self._split_pool = ThreadPoolExecutor(MAX_SPLIT_PARTS, thread_name_prefix="split")

    def on_forward(self, req: registry.Forward) -> tuple[registry.Forwarded, dict[str, torch.Tensor]]:
        """A batch through every block with no cache; a failed hop is re-routed and retried.
        A large batch is split across several chains run at once. With `keep`, each hop's input
        stays here for the backward of this pass (its id comes back as `pass`)."""
        self.router.check_model(req.model_id)
        tensors = self.router.tensors(req.msg)
        deadline = time.monotonic() + route_timeout(req.route_timeout_s)
        lora, fields = self._lora(req)
        keep = req.keep is True
        chunks = self._chunks(tensors, self._parts(tensors["hidden"], lora, fields.get("adapter")))
        outs = self._run_parts(chunks, lambda part: self._forward_chain(part, lora, fields, deadline, keep))
        reply: registry.Forwarded = {}
        if keep:
            pass_id = self.kept.put([chain for _, chain in outs], lora, tensors, fields)
            if pass_id is not None:
                reply["pass"] = pass_id
        return reply, {"hidden": torch.cat([x for x, _ in outs])}

    def _forward_chain(self, tensors: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], fields: dict,
                       deadline: float, keep: bool = False) -> tuple[torch.Tensor, Chain]:
        """The last block's output, and the chain that computed it with each hop's input (and,
        with `keep`, the id of what each server kept of it)."""
        x, first = tensors["hidden"], 0
        small = {k: v for k, v in tensors.items() if k != "hidden"}
        tokens = x.shape[0] * x.shape[1]
        suspects: dict[Hop, SwarmError] = {}
        chain: Chain = []
        while first < self.router.num_layers:
            for hop in self.router.plan(first, self.router.num_layers, deadline, spread=True,
                                        adapter=fields.get("adapter"), exclude={h.address for h in suspects}):
                x = self._wire(x, hop.address)
                try:
                    out, kept = self._forward_hop(hop, x, small, lora, fields, tokens, keep)
                except SwarmError as e:
                    self._hop_failed(hop, e, suspects, fields.get("adapter"))
                    if time.monotonic() > deadline:  # servers exist but keep failing
                        raise
                    break
                chain.append((hop, x, kept))
                x, first = out, hop.last
        self._convict(suspects)
        return x, chain

    def _hop_failed(self, hop: Hop, error: SwarmError, suspects: dict[Hop, SwarmError], adapter: str | None) -> None:
        """A hop of a forward or backward pass failed (an error no other server could avoid
        is raised again). A server that failed while computing (RemoteError) or refused (see
        router.refused) may have been handed a request that no server can compute or takes (a
        query of death): it is only suspected and routed around; if a second server fails the
        same request in the same way (the same error code), or no other server holds its
        blocks, the request goes back to the caller and nobody is banned. The suspects are
        banned once another server has computed what they could not."""
        if not retriable(error):
            raise error
        if not (isinstance(error, RemoteError) or refused(error)):
            self.router.fail(hop, error)
            return
        others = [s for s in self.router.table.servers_for(self.router.model_id, adapter)
                  if s.address != hop.address and s.address not in {h.address for h in suspects}
                  and not self.router.reputation.is_distrusted(s.address)]
        if any(e.code == error.code for e in suspects.values()) or missing_blocks(others, hop.last, hop.first):
            raise error
        suspects[hop] = error

    def _convict(self, suspects: dict[Hop, SwarmError]) -> None:
        for hop, error in suspects.items():
            self.router.fail(hop, error)

    def _forward_hop(self, hop: Hop, x: torch.Tensor, small: dict, lora: dict[str, torch.Tensor], fields: dict,
                     tokens: int, keep: bool = False) -> tuple[torch.Tensor, ServerPass | None]:
        """One hop's `forward` request: its blocks of the stack, without cache; with `keep`, the
        server is asked to keep its activations for the backward (the id it answered, if any)."""
        asked = {**fields, "blocks": [hop.first, hop.last], **({"keep": True} if keep else {})}
        reply = self.router.pool.get(hop.address).request(
            "forward", asked, {"hidden": x, **small, **_slice(lora, hop)},
            timeout_s=max(UNMEASURED_STEP_S, self.router.allowance_s(hop.address, tokens)))
        out = hidden_of(reply, hop.address)
        self.router.check(hop, x, out)
        self.router.bans.succeeded(hop.address)
        kept = reply.fields.get("pass")
        if not (isinstance(kept, str) and 0 < len(kept) <= 64):
            return out, None
        return out, ServerPass(kept, speaks(reply.version, LEAN_BACKWARD_SINCE))

    def on_backward(self, req: registry.Backward) -> tuple[registry.Empty, dict[str, torch.Tensor]]:
        """The gradient of the whole model's block stack w.r.t. its input, given its input and
        the gradient of its output, hop by hop in reverse from each hop's input: kept by the
        forward named in `pass`, else computed by running the chain forward again. Any failed
        hop bans its server and the whole pass is re-planned and redone, until the caller's
        deadline. A large batch is split across several chains run at once; LoRA gradients are
        summed. Without `hidden` (1.6), the kept pass's own inputs and trainables are used."""
        self.router.check_model(req.model_id)
        parts: list[Chain] | None
        if req.hidden is None:
            kept = self._kept_whole(req)
            tensors, lora, fields, parts = kept.inputs, kept.lora, kept.fields, kept.parts
        else:
            tensors = self.router.tensors(req.msg)
            lora, fields = self._lora(req)
            taken = self.kept.take(req.pass_) if req.pass_ is not None else None
            parts = taken.parts if taken is not None and _same_pass(taken, tensors["hidden"], lora) else None
        grad = req.grad_output
        if grad.shape != tensors["hidden"].shape:
            raise ProtocolError(f"grad_output must have the shape of hidden {list(tensors['hidden'].shape)}, "
                                f"got {list(grad.shape)}")
        if not bool(torch.isfinite(grad).all()):
            raise TensorError("grad_output holds NaN or infinite values")
        deadline = time.monotonic() + route_timeout(req.route_timeout_s)
        n = len(parts) if parts is not None else self._parts(tensors["hidden"], lora, fields.get("adapter"))
        chunks = self._chunks({**tensors, "grad_output": grad}, n)
        jobs = [(chunk, parts[i] if parts is not None else None) for i, chunk in enumerate(chunks)]
        outs = self._run_parts(jobs, lambda job: self._backward_chain(job[0], lora, fields, deadline, job[1]))
        result = {"grad_input": torch.cat([o["grad_input"] for o in outs])}
        for k in outs[0]:
            if k != "grad_input":
                result[k] = torch.stack([o[k] for o in outs]).sum(0)
        return {}, result

    def _kept_whole(self, req: registry.Backward) -> KeptPass:
        """The kept pass of a backward that sent only `grad_output` (its inputs are the forward's);
        a `session` error when it is not kept (any more), so that the app sends the whole one."""
        pass_id = lean_backward_pass(req.msg, req.pass_, req.adapter, req.lora_scaling)
        kept = self.kept.take(pass_id)
        if kept is None or "hidden" not in kept.inputs:
            raise SessionError(f"pass {pass_id[:16]} is not kept by this daemon (expired, or dropped for room): "
                               "send the backward with its inputs")
        return kept

    def _backward_chain(self, tensors: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], fields: dict,
                        deadline: float, kept: Chain | None) -> dict[str, torch.Tensor]:
        grad = tensors["grad_output"]
        small = {k: v for k, v in tensors.items() if k not in ("hidden", "grad_output")}
        tokens = tensors["hidden"].shape[0] * tensors["hidden"].shape[1]
        suspects: dict[Hop, SwarmError] = {}
        while True:
            if kept is not None:
                chain: Chain | None = kept
                kept = None  # one try: after a failure the pass is re-planned
            else:
                chain = self._chain_inputs(tensors["hidden"], small, lora, fields, deadline, tokens, suspects)
            if chain is None:
                continue
            hop = chain[-1][0]
            try:
                g = grad
                lora_grads: dict[str, list[torch.Tensor]] = {f"grad_{k}": [] for k in lora}
                for hop, x_in, kept_pass in reversed(chain):
                    g = self._wire(g, hop.address)
                    reply = self._backward_hop(hop, x_in, g, kept_pass, small, lora, fields, tokens)
                    g_in = reply.tensors.get("grad_input")
                    if g_in is None or any(k not in reply.tensors for k in lora_grads):
                        raise WrongOutputError(f"server {hop.address} answered a backward without grad_input or "
                                               "a LoRA gradient")
                    check_gradient(g_in, tuple(x_in.shape))
                    for k in lora:  # the app's trainables: a hostile server must not poison them
                        check_gradient(reply.tensors[f"grad_{k}"], (hop.last - hop.first, *lora[k].shape[1:]))
                    g = g_in
                    self.router.bans.succeeded(hop.address)
                    for k, parts in lora_grads.items():
                        parts.insert(0, reply.tensors[k])  # hops come back last first
                self._convict(suspects)
                return {"grad_input": g, **{k: torch.cat(v) for k, v in lora_grads.items()}}
            except SwarmError as e:
                self._hop_failed(hop, e, suspects, fields.get("adapter"))
                if time.monotonic() > deadline:
                    raise

    def _backward_hop(self, hop: Hop, x_in: torch.Tensor, g: torch.Tensor, kept: ServerPass | None, small: dict,
                      lora: dict[str, torch.Tensor], fields: dict, tokens: int) -> Message:
        """One hop's `backward` request. To a server that kept the pass and speaks 1.6, only the
        gradient goes, with the pass's id (its input and the trainables are there already); if
        the pass is not kept there any more (a `session` error), the whole backward follows."""
        conn = self.router.pool.get(hop.address)
        timeout_s = max(UNMEASURED_STEP_S, 3 * self.router.allowance_s(hop.address, tokens))
        blocks = [hop.first, hop.last]
        if kept is not None and kept.lean:
            try:
                return conn.request("backward", {"model_id": fields["model_id"], "blocks": blocks, "pass": kept.id},
                                    {"grad_output": g}, timeout_s=timeout_s)
            except SessionError:
                pass  # dropped there (room, time, a move): it recomputes from the inputs
        asked = {**fields, "blocks": blocks, **({"pass": kept.id} if kept is not None else {})}
        return conn.request("backward", asked, {"hidden": x_in, "grad_output": g, **small, **_slice(lora, hop)},
                            timeout_s=timeout_s)

    def _chain_inputs(self, hidden: torch.Tensor, small: dict, lora: dict[str, torch.Tensor], fields: dict,
                      deadline: float, tokens: int, suspects: dict[Hop, SwarmError]) -> Chain | None:
        """A planned chain run forward, keeping each hop's input and asking its server to keep its
        activations (the last hop's output is not needed: it runs inside its backward); None when
        a hop failed (it is dealt with: plan again)."""
        hops = self.router.plan(0, self.router.num_layers, deadline, spread=True, adapter=fields.get("adapter"),
                                exclude={h.address for h in suspects})
        chain: Chain = []
        x = hidden
        for hop in hops[:-1]:
            x = self._wire(x, hop.address)
            try:
                out, kept = self._forward_hop(hop, x, small, lora, fields, tokens, keep=True)
            except SwarmError as e:
                self._hop_failed(hop, e, suspects, fields.get("adapter"))
                if time.monotonic() > deadline:
                    raise
                return None
            chain.append((hop, x, kept))
            x = out
        return [*chain, (hops[-1], self._wire(x, hops[-1].address), None)]  # its forward runs in its backward

    def _wire(self, x: torch.Tensor, address: str) -> torch.Tensor:
        """`x` (a hop's input, or the gradient of its output) in the dtype the server at `address`
        computes in, when that is a narrower float: it converts what it receives to it anyway, so
        sending it so loses nothing and halves the bytes (known from its outputs, after its first
        reply)."""
        dtype = self.router.output_dtype(address)
        if dtype in (torch.bfloat16, torch.float16) and x.dtype == torch.float32:
            return x.to(dtype)
        return x

    def _parts(self, hidden: torch.Tensor, lora: dict[str, torch.Tensor], adapter: str | None) -> int:
        """Into how many parts to split a batch (see SPLIT_MIN_S)."""
        B, T = hidden.shape[:2]
        if B == 1 or any(v.ndim == 4 for v in lora.values()):  # deep prompts given per sample: keep whole
            return 1
        servers = self.router.table.servers_for(self.router.model_id, adapter)
        if len(servers) == 1:  # parts would only queue there, each streaming all its weights again
            return 1
        expected_s = forward_seconds(servers, self.router.num_layers, B * T)
        big = expected_s > SPLIT_MIN_S if expected_s is not None else B * T >= SPLIT_MIN_TOKENS
        return min(B, MAX_SPLIT_PARTS) if big else 1

    @staticmethod
    def _chunks(tensors: dict[str, torch.Tensor], parts: int) -> list[dict]:
        if parts == 1:
            return [tensors]
        return [dict(zip(tensors, vals)) for vals in zip(*(v.tensor_split(parts) for v in tensors.values()))]

    def _run_parts(self, jobs: list, run) -> list:
        if len(jobs) == 1:
            return [run(jobs[0])]
        return list(self._split_pool.map(run, jobs))

    def _lora(self, req: registry.Forward | registry.Backward) -> tuple[dict[str, torch.Tensor], dict]:
        """The app's LoRA tensors ([num_layers, ...] each, sliced per hop) and the fields that go
        with every hop's request."""
        num_layers = self.router.num_layers
        lora = client_trainables(req.msg.tensors)
        fields: dict = {"model_id": self.router.model_id}
        adapter = adapter_name(req.adapter)
        if adapter is not None:
            fields["adapter"] = adapter
        if lora:
            bad = [k for k, v in lora.items() if v.ndim not in (3, 4) or v.shape[0] != num_layers]
            if bad:
                raise TensorError(f"LoRA tensors and deep prompts must be [{num_layers} blocks, ...]: "
                                  f"{bad[0]} is not")
            self._check_deep_prompts(lora.get("deep_prompts"), req.hidden)
            fields["lora_scaling"] = req.lora_scaling if req.lora_scaling is not None else 1.0
        return lora, fields

    def _check_deep_prompts(self, deep: torch.Tensor | None, hidden: torch.Tensor | None) -> None:
        """Deep prompts fit the hidden states: checked here, so that a request no server could
        compute is refused before any server is asked (and blamed)."""
        if deep is None or hidden is None:
            return
        B, T, H = hidden.shape
        per_sample = deep.ndim == 4
        if deep.shape[-1] != H or deep.shape[-2] > T or (per_sample and deep.shape[1] != B):
            n = self.router.num_layers
            want = f"[{n}, {B}, prompt <= {T}, {H}]" if per_sample else f"[{n}, prompt <= {T}, {H}]"
            raise TensorError(f"deep_prompts must be {want} for hidden {list(hidden.shape)}, got {list(deep.shape)}")


def _same_pass(kept: KeptPass, hidden: torch.Tensor, lora: dict[str, torch.Tensor]) -> bool:
    """Whether a backward sends the input and LoRA tensors of the forward that was kept (anything
    else would differentiate another computation than the one asked for: recompute then)."""
    first_inputs = [chain[0][1] for chain in kept.parts]  # each part's, as sent (in its first server's dtype)
    sent = hidden.tensor_split(len(first_inputs)) if len(first_inputs) > 1 else (hidden,)
    return (all(x.shape == f.shape and torch.equal(x.to(f.dtype), f) for x, f in zip(sent, first_inputs))
            and kept.lora.keys() == lora.keys()
            and all(torch.equal(kept.lora[k], v) for k, v in lora.items()))


def adapter_name(name: str | None) -> str | None:
    """A request's `adapter` (a str, by the registry), of a length an adapter's name has."""
    if name is not None and not 0 < len(name) <= 64:
        raise ProtocolError("adapter must be an adapter name (a string)")
    return name


def _slice(lora: dict[str, torch.Tensor], hop: Hop) -> dict[str, torch.Tensor]:
    return {k: v[hop.first:hop.last] for k, v in lora.items()}
