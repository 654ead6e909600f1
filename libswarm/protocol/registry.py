"""Every request type of both planes, with the fields and tensors it carries: one registry that
the servers dispatch by and that a test compares with docs/protocol.md, so that neither the
code nor the spec can grow a message the other lacks.

A request of a type not listed here is refused (`protocol`); one without a required field or
tensor is refused naming it, before any handler runs."""

from __future__ import annotations

from dataclasses import dataclass

from libswarm.errors import ProtocolError, TensorError
from libswarm.protocol.messages import Message


@dataclass(frozen=True)
class Spec:
    name: str
    fields: tuple[str, ...] = ()  # required
    optional: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()  # required
    optional_tensors: tuple[str, ...] = ()

    def check(self, msg: Message) -> None:
        """Required fields and tensors are there, and fields of a known type have it (the rest
        of their values are each handler's to check)."""
        for name in self.fields:
            if msg.fields.get(name) is None:
                raise ProtocolError(f"{self.name}: field {name!r} is missing")
        for name in (*self.fields, *self.optional):
            kind = FIELD_TYPES.get(name)
            if kind is not None and msg.fields.get(name) is not None:
                msg.require(name, kind)
        for name in self.tensors:
            if name not in msg.tensors:
                raise TensorError(f"{self.name}: tensor {name!r} is missing")


# The type a field must have wherever it appears (a wrong one is a `protocol` error naming it,
# before a handler could trip over it). Fields not listed are their handlers' to check, or are
# read leniently by design (`keep`, `push`, `pass`: anything but true / false / a kept pass id
# is the default).
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "model_id": str, "blocks": list, "max_length": int, "batch": int, "adapter": str, "session": str,
    "step": int, "from": str, "next": dict, "address": str, "nonce": str, "to": str, "open_id": str,
}

# Optional tensors beside `hidden` (shared conventions). Client-held trainables (lora_A.*,
# lora_B.*, deep_prompts) come by wire name, any number, on forward and backward.
INPUTS = ("position_ids", "key_mask")

# Server role: what peers send to a daemon's peer plane.
PEER = {s.name: s for s in (
    Spec("ping"),
    Spec("gossip", optional=("news", "records", "beats", "suspects", "sums")),
    Spec("open", fields=("model_id", "blocks", "max_length", "batch"), optional=("adapter", "open_id")),
    Spec("step", fields=("session",), optional=("step", "expect_push", "from", "next", "replay", "start"),
         optional_tensors=("hidden", *INPUTS, "beam_order")),
    Spec("push", fields=("session", "step"), tensors=("hidden",)),
    Spec("close", fields=("session",)),
    Spec("forward", fields=("model_id", "blocks"), optional=("adapter", "lora_scaling"), tensors=("hidden",),
         optional_tensors=INPUTS),
    Spec("backward", fields=("model_id", "blocks"), optional=("adapter", "lora_scaling"),
         tensors=("hidden", "grad_output"), optional_tensors=INPUTS),
    Spec("reach", fields=("address", "nonce")),
    Spec("reach_back", fields=("nonce",)),
    Spec("relay_register"),
    Spec("relay", fields=("to",), tensors=("sealed",)),
)}

# Gateway role: what apps and swarmctl send to their own daemon's local plane.
LOCAL = {s.name: s for s in (
    Spec("status"),
    Spec("peers"),
    Spec("model_info"),
    Spec("drain"),
    Spec("rebalance", optional=("dry_run",)),
    Spec("key"),
    Spec("open", fields=("model_id", "max_length", "batch"), optional=("route_timeout_s", "push", "adapter")),
    Spec("step", fields=("session",), optional=("start",), tensors=("hidden",),
         optional_tensors=(*INPUTS, "beam_order")),
    Spec("close", fields=("session",)),
    Spec("forward", fields=("model_id",), optional=("route_timeout_s", "keep", "adapter", "lora_scaling"),
         tensors=("hidden",), optional_tensors=INPUTS),
    Spec("backward", fields=("model_id",), optional=("route_timeout_s", "pass", "adapter", "lora_scaling"),
         tensors=("hidden", "grad_output"), optional_tensors=INPUTS),
)}


def check(plane: dict[str, Spec], msg: Message) -> None:
    """Refuse a request the plane does not define, or one lacking what its type requires."""
    spec = plane.get(msg.type)
    if spec is None:
        raise ProtocolError(f"unknown message type {msg.type!r}")
    spec.check(msg)
