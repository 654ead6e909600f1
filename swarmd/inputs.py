"""Checks on the optional per-position tensors of a step or forward, shared by the server
(which must never trust them) and the gateway (which refuses them before any server runs,
so that a bad request cannot leave a route half-advanced)."""

from __future__ import annotations

import torch

from libswarm.errors import LimitError, ProtocolError, TensorError
from libswarm.protocol import Message


def positions_and_mask(msg: Message, B: int, T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """position_ids int64 [B, T] within 0..2^31 and key_mask bool [B, T], each optional."""
    pos = msg.tensor("position_ids", optional=True)
    if pos is not None:
        if pos.dtype != torch.int64 or list(pos.shape) != [B, T]:
            raise TensorError(f"position_ids must be int64 [{B}, {T}], got {str(pos.dtype)[6:]} {list(pos.shape)}")
        if T and (int(pos.min()) < 0 or int(pos.max()) >= 2**31):
            raise TensorError("position_ids must be within 0..2^31")
    mask = msg.tensor("key_mask", optional=True)
    if mask is not None and (mask.dtype != torch.bool or list(mask.shape) != [B, T]):
        raise TensorError(f"key_mask must be bool [{B}, {T}], got {str(mask.dtype)[6:]} {list(mask.shape)}")
    return pos, mask


def beam_order(msg: Message, B: int) -> torch.Tensor | None:
    """beam_order int64 [B], a permutation-with-repeats of the rows 0..B-1 (beam search keeps
    some beams twice and drops others), or None."""
    order = msg.tensor("beam_order", optional=True)
    if order is None:
        return None
    if order.dtype != torch.int64 or list(order.shape) != [B]:
        raise TensorError(f"beam_order must be int64 [{B}], got {str(order.dtype)[6:]} {list(order.shape)}")
    if int(order.min()) < 0 or int(order.max()) >= B:
        raise TensorError(f"beam_order must name rows 0..{B - 1}")
    return order


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def span_inputs(msg: Message, hidden: torch.Tensor, hidden_size: int, most: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A server's checks of what its blocks are given: hidden float [B, T, hidden_size], and
    its position_ids and key_mask; `most`: the largest (batch, length) a pass may have (a
    step is bounded by its session's cache instead)."""
    if hidden.dtype not in FLOAT_DTYPES or hidden.ndim != 3 or hidden.shape[2] != hidden_size:
        raise TensorError(f"hidden must be float [batch, length, {hidden_size}], got {str(hidden.dtype)[6:]} "
                          f"{list(hidden.shape)}")
    B, T, _ = hidden.shape
    if B == 0 or T == 0:
        raise TensorError("hidden has an empty batch or length")
    if most is not None and (B > most[0] or T > most[1]):
        raise LimitError(f"forward of batch {B} x length {T} exceeds {most[0]} x {most[1]}")
    pos, mask = positions_and_mask(msg, B, T)
    return hidden, pos, mask


def lean_backward_pass(msg: Message, pass_id: object, adapter: object, lora_scaling: object) -> str:
    """The kept pass a backward without `hidden` names (protocol 1.6, both planes): such a
    backward carries `grad_output` alone, since the forward's inputs and trainables are the
    kept pass's; anything else it sends is refused, lest it be taken for them."""
    extra = sorted(set(msg.tensors) - {"grad_output"})
    if extra or adapter is not None or lora_scaling is not None:
        raise ProtocolError("a backward without hidden (its kept pass's) takes grad_output alone, not "
                            + (", ".join(extra) if extra else "adapter or lora_scaling"))
    if not isinstance(pass_id, str):
        raise ProtocolError("a backward without hidden must name its kept pass ('pass')")
    return pass_id
