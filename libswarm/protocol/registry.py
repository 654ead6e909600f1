"""Every request of both planes, defined once as a frozen dataclass: its fields (with the type
each must have) and its tensors; and the fields of each reply, a TypedDict its handler
returns. The daemons decode a message into its request here, at the edge, and hand their
handlers typed values; tests compare these definitions with docs/protocol.md, so that neither
the code nor the spec can grow a message or a field the other lacks.

A request of a type not listed here is refused (`protocol`); one without a required field or
tensor, or with a field of the wrong type, is refused naming it, before any handler runs.

A field's annotation is its wire type: `str`, `int` (never a bool), `float` (an int too),
`list`, `dict`, `| None` when it may be absent, `object` when its handler reads it leniently
by design (`keep`, `push`, `pass`: anything but true / false / a kept pass id is the default)
or checks it with an error of its own. A field declared with `tensor()` is a tensor frame of
that name. Client-held trainables (lora_A.*, lora_B.*, deep_prompts) come by wire name, any
number, on forward and backward: they stay in the request's `msg.tensors`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Required, TypedDict, TypeVar

from libswarm.errors import ProtocolError, TensorError
from libswarm.protocol.messages import Message

if TYPE_CHECKING:
    from torch import Tensor

_KINDS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float), "list": list,
                                              "dict": dict}


def tensor(required: bool = False) -> Any:
    """A tensor of the request, by its field's name (optional unless `required`)."""
    if required:
        return field(metadata={"tensor": True})
    return field(default=None, metadata={"tensor": True})


def wire(name: str, default: Any = None) -> Any:
    """A field whose wire name is not a Python name (`from`, `pass`)."""
    return field(default=default, metadata={"wire": name})


@dataclass(frozen=True, kw_only=True)
class Request:
    """What every request carries beside its own fields: the message it was decoded from (its
    id, deadline, the sender's protocol version, and every tensor by name)."""
    msg: Message = field(repr=False, compare=False)


R = TypeVar("R", bound=Request)


@dataclass(frozen=True)
class Spec:
    """A request type as the wire sees it, derived from its dataclass."""
    name: str
    cls: type[Request]
    fields: tuple[str, ...] = ()  # required, by wire name
    optional: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()  # required
    optional_tensors: tuple[str, ...] = ()
    kinds: tuple[tuple[str, type | tuple[type, ...]], ...] = ()  # (wire name, type) checked
    plan: tuple[tuple[str, str, bool], ...] = ()  # (attribute, wire name, whether a tensor) of each field

    def parse(self, msg: Message) -> Request:
        """The typed request, or a one-line error naming what is missing or of the wrong type."""
        fields, tensors = msg.fields, msg.tensors
        for name in self.fields:
            if fields.get(name) is None:
                raise ProtocolError(f"{self.name}: field {name!r} is missing")
        for name, kind in self.kinds:
            value = fields.get(name)
            if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
                msg.require(name, kind)  # raises, naming the field and the type it must have
        for name in self.tensors:
            if name not in tensors:
                raise TensorError(f"{self.name}: tensor {name!r} is missing")
        # on the hot path (every step, on every hop): one pass over a plan made once, and the
        # values set at once (a frozen dataclass's __init__ sets each through object.__setattr__,
        # which costs more than the whole check above; the instance is as frozen after this)
        req = object.__new__(self.cls)
        req.__dict__.update({attr: (tensors if is_tensor else fields).get(key) for attr, key, is_tensor in self.plan},
                            msg=msg)
        return req


def _spec(name: str, cls: type[Request]) -> Spec:
    fields: list[str] = []
    optional: list[str] = []
    tensors: list[str] = []
    optional_tensors: list[str] = []
    kinds: list[tuple[str, type | tuple[type, ...]]] = []
    plan: list[tuple[str, str, bool]] = []
    for f in dataclasses.fields(cls):
        if f.name == "msg":
            continue
        wire_name = f.metadata.get("wire", f.name)
        plan.append((f.name, wire_name, bool(f.metadata.get("tensor"))))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        parts = [p.strip() for p in str(f.type).split("|")]
        if f.metadata.get("tensor"):
            (tensors if required else optional_tensors).append(wire_name)
            continue
        (fields if required else optional).append(wire_name)
        named = [p for p in parts if p not in ("None", "object", "Any")]
        if named:
            unknown = [p for p in named if p not in _KINDS]
            assert not unknown, f"{cls.__name__}.{f.name}: no wire type {unknown}"
            flat: list[type] = []
            for p in named:
                kind = _KINDS[p]
                flat.extend(kind if isinstance(kind, tuple) else (kind,))
            kinds.append((wire_name, flat[0] if len(flat) == 1 else tuple(flat)))
    return Spec(name, cls, tuple(fields), tuple(optional), tuple(tensors), tuple(optional_tensors), tuple(kinds),
                tuple(plan))


# --- server role: what peers send to a daemon's peer plane ------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Ping(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class Gossip(Request):
    # each read by membership, which checks every record and value it keeps
    news: object = None
    records: object = None
    beats: object = None
    suspects: object = None
    sums: object = None


@dataclass(frozen=True, kw_only=True)
class PeerOpen(Request):
    model_id: str
    blocks: list  # [first, last]: checked against the span by the server
    max_length: int
    batch: int
    adapter: str | None = None
    open_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class PeerStep(Request):
    session: str
    step: int | None = None
    expect_push: object = None  # true: `hidden` comes by push from the previous hop
    from_: str | None = wire("from")  # the previous hop's key, whose push alone is taken
    next: dict | None = None  # {address, key, session}: where to push the output
    replay: object = None
    start: object = None  # the position the step starts at (a cut-back): checked by the step
    hidden: Tensor | None = tensor()
    position_ids: Tensor | None = tensor()
    key_mask: Tensor | None = tensor()
    beam_order: Tensor | None = tensor()


@dataclass(frozen=True, kw_only=True)
class Push(Request):
    session: str
    step: int
    hidden: Tensor = tensor(required=True)


@dataclass(frozen=True, kw_only=True)
class PeerClose(Request):
    session: str


@dataclass(frozen=True, kw_only=True)
class PeerPass(Request):
    """What a peer-plane forward and backward share."""
    model_id: str
    blocks: list
    adapter: str | None = None
    lora_scaling: object = None  # checked only when LoRA tensors come, with its own error
    position_ids: Tensor | None = tensor()
    key_mask: Tensor | None = tensor()


@dataclass(frozen=True, kw_only=True)
class PeerForward(PeerPass):
    hidden: Tensor = tensor(required=True)
    keep: object = None  # true: the server keeps the pass's activations for its backward


@dataclass(frozen=True, kw_only=True)
class PeerBackward(PeerPass):
    pass_: object = wire("pass")  # the id a kept forward answered: its activations, if still kept
    grad_output: Tensor = tensor(required=True)
    # absent (a lean backward, since 1.6): the pass named is differentiated as it was kept
    hidden: Tensor | None = tensor()


@dataclass(frozen=True, kw_only=True)
class Reach(Request):
    address: str
    nonce: str


@dataclass(frozen=True, kw_only=True)
class ReachBack(Request):
    nonce: str


@dataclass(frozen=True, kw_only=True)
class RelayRegister(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class Relay(Request):
    to: str
    sealed: Tensor = tensor(required=True)


# --- gateway role: what apps and swarmctl send to their own daemon's local plane ---------------------
@dataclass(frozen=True, kw_only=True)
class Status(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class Peers(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class ModelInfo(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class Drain(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class Rebalance(Request):
    dry_run: object = None  # true: the plan only


@dataclass(frozen=True, kw_only=True)
class Key(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class Open(Request):
    model_id: str
    max_length: int
    batch: int
    route_timeout_s: object = None  # checked by the gateway (a positive number)
    push: object = None  # anything but false: servers push to each other
    adapter: str | None = None


@dataclass(frozen=True, kw_only=True)
class Step(Request):
    session: str
    start: object = None
    hidden: Tensor = tensor(required=True)
    position_ids: Tensor | None = tensor()
    key_mask: Tensor | None = tensor()
    beam_order: Tensor | None = tensor()


@dataclass(frozen=True, kw_only=True)
class Close(Request):
    session: str


@dataclass(frozen=True, kw_only=True)
class Forward(Request):
    model_id: str
    route_timeout_s: object = None
    keep: object = None  # true: the gateway keeps the pass for its backward
    adapter: str | None = None
    lora_scaling: object = None
    hidden: Tensor = tensor(required=True)
    position_ids: Tensor | None = tensor()
    key_mask: Tensor | None = tensor()


@dataclass(frozen=True, kw_only=True)
class Backward(Request):
    model_id: str
    route_timeout_s: object = None
    pass_: object = wire("pass")  # a kept forward's id: its route and its inputs on each hop
    adapter: str | None = None
    lora_scaling: object = None
    hidden: Tensor | None = tensor()  # absent (since 1.6): the kept pass's own inputs
    grad_output: Tensor = tensor(required=True)
    position_ids: Tensor | None = tensor()
    key_mask: Tensor | None = tensor()


# --- replies: the fields of each answer, a TypedDict the handler returns (mypy checks that it
# builds them), diffed against docs/protocol.md like the requests. Tensors of a reply are named
# in its comment. The control requests' replies (status, peers, key, drain, rebalance) and
# gossip's are documents whose many keys docs/protocol.md lists; they stay dicts.
class Empty(TypedDict):
    """ping, reach_back; forward (tensor `hidden`) and backward (`grad_input`, `grad_<name>`)."""


class Opened(TypedDict):
    """A server's `open`."""
    session: str
    cache_bytes: int


class Stepped(TypedDict, total=False):
    """A server's `step`; tensor `hidden`."""
    position: Required[int]
    consumed: Required[str]
    repeated: bool
    pushed: bool


class Closed(TypedDict):
    closed: bool


class Reached(TypedDict, total=False):
    calling: Required[bool]
    why: str


class Registered(TypedDict):
    keepalive_s: float


class ModelInfoReply(TypedDict):
    model_id: str
    num_layers: int
    hidden_size: int


class SessionOpened(TypedDict):
    """The local plane's `open`."""
    session: str
    route: list  # [[address, first, last], ...]


class SessionStepped(TypedDict):
    """The local plane's `step`; tensor `hidden`."""
    position: int
    route: list


# `pass` is a Python keyword: the functional form
Forwarded = TypedDict("Forwarded", {"pass": str}, total=False)  # tensor `hidden`

PEER = {s.name: s for s in (
    _spec("ping", Ping), _spec("gossip", Gossip), _spec("open", PeerOpen), _spec("step", PeerStep),
    _spec("push", Push), _spec("close", PeerClose), _spec("forward", PeerForward),
    _spec("backward", PeerBackward), _spec("reach", Reach), _spec("reach_back", ReachBack),
    _spec("relay_register", RelayRegister), _spec("relay", Relay),
)}

LOCAL = {s.name: s for s in (
    _spec("status", Status), _spec("peers", Peers), _spec("model_info", ModelInfo), _spec("drain", Drain),
    _spec("rebalance", Rebalance), _spec("key", Key), _spec("open", Open), _spec("step", Step),
    _spec("close", Close), _spec("forward", Forward), _spec("backward", Backward),
)}


# Reply fields of each request type with a reply of its own (the others: documents, above)
PEER_REPLIES: dict[str, type] = {"ping": Empty, "open": Opened, "step": Stepped, "close": Closed, "forward": Forwarded,
                                 "backward": Empty, "reach": Reached, "reach_back": Empty,
                                 "relay_register": Registered}
LOCAL_REPLIES: dict[str, type] = {"model_info": ModelInfoReply, "open": SessionOpened, "step": SessionStepped,
                                  "close": Closed, "forward": Forwarded, "backward": Empty}


def parse(plane: dict[str, Spec], msg: Message) -> Request:
    """The typed request `msg` is on this plane; refused if the plane does not define its
    type, or it lacks (or mistypes) what its type requires."""
    spec = plane.get(msg.type)
    if spec is None:
        raise ProtocolError(f"unknown message type {msg.type!r}")
    return spec.parse(msg)


def typed(cls: type[R], req: Request) -> R:
    """`req` as the request type a handler takes (a dispatch table maps each type to its
    handler, so a mismatch is a bug here, never a peer's doing)."""
    assert isinstance(req, cls), f"{type(req).__name__} handed to a handler of {cls.__name__}"
    return req
