"""Forward and backward passes (training, and inference without a session): what `Passes`
alone decides is which trainables a pass runs with (a hosted adapter, or the client's own
LoRA and deep prompts, checked against the blocks asked for, never both), that a pass's
attention scratch is held in the cache budget while it runs, and whether a backward
differentiates the graph its forward kept (kept.py) or runs the forward again. The work itself
goes to the compute thread, behind steps."""

from __future__ import annotations

import contextlib

import torch

from libswarm.errors import CacheFullError, LimitError, ProtocolError, SessionError, TensorError
from libswarm.protocol.registry import Empty, Forwarded, PeerBackward, PeerForward, PeerPass
from swarmd.inputs import FLOAT_DTYPES, lean_backward_pass, span_inputs
from swarmd.peer.compute import PASS
from swarmd.peer.kept import Kept, KeptGraphs
from swarmd.peer.owner import Owner
from swarmd.peer.sessions import Sessions
from swarmd.runtime.span import DEEP_PROMPTS, Lora, Span, client_trainables


class Passes:
    def __init__(self, server: Owner, sessions: Sessions):
        self.server, self.sessions = server, sessions
        # forwards' graphs awaiting their backward, while their span is served (its own or the one beside it)
        self.kept = KeptGraphs(lambda span: span is server.span or span is server.also)

    def _checked(self, req: PeerPass, kind: str, hidden: torch.Tensor):
        srv = self.server
        self.sessions.check_model(req.model_id)
        first, last = self.sessions.check_blocks(kind, req.blocks)
        hidden, pos, mask = span_inputs(req.msg, hidden, srv.span.hidden_size, (srv.max_batch, srv.max_length))
        B, T, _ = hidden.shape
        if pos is None:
            pos = torch.arange(T).expand(B, T)
        return first, last, hidden, pos, mask

    def span_of(self, first: int, last: int) -> Span:
        """The span serving blocks checked by `_checked` (the current one, or the one held beside it)."""
        return self.sessions.span_for(first, last) or self.server.span

    def on_forward(self, req: PeerForward):
        first, last, hidden, pos, mask = self._checked(req, "forward", req.hidden)
        lora, deep = self.trainables(req, first, last, hidden)
        span = self.span_of(first, last)  # the one asked for, even if the server moves before the work runs
        keep = (self.server.current[2], _inputs(req)) if req.keep is True else None
        return self.server.defer(PASS, lambda: self.forward(span, hidden, pos, mask, first, last, lora, deep, keep),
                                 *self.server.current, req)

    def forward(self, span: Span, hidden: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, first: int,
                last: int, lora: Lora | None, deep: torch.Tensor | None,
                keep: tuple[str | None, tuple[dict[str, torch.Tensor], tuple]] | None = None,
                ) -> tuple[Forwarded, dict[str, torch.Tensor]]:
        """The blocks' output; with `keep` (the caller's key, and what it sent: _inputs), their
        activations are kept for the backward when there is room (the reply's `pass`)."""
        B, T, _ = hidden.shape
        if keep is None:
            with self.scratch(span, B, T, blocks=1, what="forward"):
                out = span.run(hidden, pos, mask, first, last, lora=lora, deep_prompts=deep)
            self.server.count(forwards=1)
            return {}, {"hidden": out}
        with self.scratch(span, B, T, blocks=last - first, what="forward"):  # autograd keeps every block's
            graph = span.graph(hidden, pos, mask, first, last, lora, deep)
        self.server.count(forwards=1)
        pass_id = self.kept.put(Kept(keep[0], (first, last), span, *keep[1], graph))
        return ({"pass": pass_id} if pass_id is not None else {}), {"hidden": graph.out.detach()}

    def on_backward(self, req: PeerBackward):
        """Gradient of blocks' input given their input and the gradient of their output: from the
        pass its forward kept here (`pass`), else by running the forward again. Without `hidden`
        (a lean backward), only from the kept pass, as it was kept."""
        if req.hidden is None:
            return self._lean_backward(req)
        first, last, hidden, pos, mask = self._checked(req, "backward", req.hidden)
        grad = _grad_output(req, hidden.shape)
        B, T, _ = hidden.shape
        lora, deep = self.trainables(req, first, last, hidden)
        span, owner, sent = self.span_of(first, last), self.server.current[2], _inputs(req)

        def work() -> tuple[Empty, dict[str, torch.Tensor]]:
            graph = self.kept.take(req.pass_, owner, (first, last), span, *sent)
            with self.scratch(span, B, T, blocks=last - first, what="backward"):
                if graph is None:
                    graph = span.graph(hidden, pos, mask, first, last, lora, deep)
                grad_input, lora_grads = graph.grad(grad)
            self.server.count(backwards=1)
            return {}, {"grad_input": grad_input, **lora_grads}
        return self.server.defer(PASS, work, *self.server.current, req)

    def _lean_backward(self, req: PeerBackward):
        """A backward that sent only `grad_output` and the kept pass's id: the pass is
        differentiated with the inputs and trainables its forward had; a `session` error when it
        is not kept here (any more) for this key and these blocks, so that the gateway sends the
        whole backward."""
        self.sessions.check_model(req.model_id)
        first, last = self.sessions.check_blocks("backward", req.blocks)
        pass_id = lean_backward_pass(req.msg, req.pass_, req.adapter, req.lora_scaling)
        span, owner = self.span_of(first, last), self.server.current[2]

        def work() -> tuple[Empty, dict[str, torch.Tensor]]:
            graph = self.kept.take(pass_id, owner, (first, last), span)
            if graph is None:
                raise SessionError(f"pass {pass_id[:16]} is not kept here for blocks {first}:{last}: "
                                   "send the backward with its inputs")
            B, T, _ = graph.out.shape
            grad = _grad_output(req, graph.out.shape)
            with self.scratch(span, B, T, blocks=last - first, what="backward"):
                grad_input, lora_grads = graph.grad(grad)
            self.server.count(backwards=1)
            return {}, {"grad_input": grad_input, **lora_grads}
        return self.server.defer(PASS, work, *self.server.current, req)

    @contextlib.contextmanager
    def scratch(self, span: Span, batch: int, length: int, blocks: int, what: str):
        """Hold the attention scratch of a forward or backward in the cache budget while it
        runs: it grows with length squared, and unaccounted one request could exhaust the
        server's memory (and the next one again)."""
        budget = self.server.budget
        nbytes = span.attention_scratch_bytes(batch, length, blocks)
        try:
            budget.reserve(nbytes)
        except CacheFullError:
            raise LimitError(f"{what} of batch {batch} x length {length} needs {nbytes / 2**20:.0f} MiB of attention "
                             f"memory; {budget.free_bytes / 2**20:.0f} MiB are free here: send smaller batches "
                             "or shorter sequences") from None
        try:
            yield
        finally:
            budget.release(nbytes)

    def trainables(self, req: PeerPass, first: int, last: int, hidden: torch.Tensor
                   ) -> tuple[Lora | None, torch.Tensor | None]:
        """The LoRA (a hosted adapter, or the client's own) and the client's deep prompts of a
        forward or backward, checked against these blocks."""
        span = self.span_of(first, last)
        hosted = self.sessions.hosted_adapter(req.adapter, first, last)
        tensors = client_trainables(req.msg.tensors)
        if hosted is not None:
            if tensors:
                raise ProtocolError("a hosted adapter and the client's own LoRA cannot be combined")
            return hosted, None
        deep = tensors.pop(DEEP_PROMPTS, None)
        if deep is not None:
            span.check_deep_prompts(deep, first, last)
            if deep.shape[-2] > hidden.shape[1]:
                raise TensorError("deep_prompts cover more positions than hidden has")
            if deep.ndim == 4 and deep.shape[1] != hidden.shape[0]:
                raise TensorError(f"deep_prompts given per sample are for batch {deep.shape[1]}, hidden has "
                                  f"{hidden.shape[0]}")
        if not tensors:
            return None, deep
        scaling = req.lora_scaling if req.lora_scaling is not None else 1.0
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
            raise ProtocolError("LoRA tensors need a numeric 'lora_scaling' (alpha / r)")
        lora = Lora(float(scaling), tensors)
        span.check_lora(lora, first, last)
        return lora, deep


def _grad_output(req: PeerBackward, shape: torch.Size) -> torch.Tensor:
    grad = req.grad_output
    if grad.dtype not in FLOAT_DTYPES or grad.shape != shape:
        raise TensorError(f"grad_output must be float {list(shape)} like hidden, got {str(grad.dtype)[6:]} "
                          f"{list(grad.shape)}")
    return grad


def _inputs(req: PeerPass) -> tuple[dict[str, torch.Tensor], tuple]:
    """What a pass computes from, for a backward to match its kept forward: every tensor sent
    (but a backward's output gradient), and the fields that change the computation."""
    tensors = {k: v for k, v in req.msg.tensors.items() if k != "grad_output"}
    return tensors, (req.adapter, req.lora_scaling if isinstance(req.lora_scaling, (int, float)) else None)
