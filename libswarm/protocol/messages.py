"""Message framing: one JSON header frame, then one raw frame per tensor.

Header (a JSON object, at most MAX_HEADER_BYTES):
    v        protocol version; a peer refuses a major version it does not speak
    type     message type ("step", "ok", "error", ...)
    id       request id chosen by the caller, echoed in the reply
    deadline optional unix time (seconds) after which the caller no longer waits
    tensors  list of {"name", "dtype", "shape"}, one per following frame, in order
    ...      the message's own fields (see docs/protocol.md)
"""

from __future__ import annotations

import builtins
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from libswarm.errors import LimitError, ProtocolError, SwarmError, TensorError, error_to_wire

if TYPE_CHECKING:
    import torch

# torch is imported only when a message carries tensors, so that swarmctl starts in a blink

PROTOCOL_VERSION = "1.6"
PROTOCOL_MAJOR = 1
MAX_HEADER_BYTES = 64 * 1024
# The replies of a daemon to its own apps (the local plane) may carry larger headers: `status`
# and `peers` list every node of the swarm, ~550 bytes each (10,000 at most, and records are
# bounded). Requests, and every message between peers, keep MAX_HEADER_BYTES.
LOCAL_REPLY_HEADER_BYTES = 64 * 2**20
MAX_TENSORS = 64
MAX_FRAMES = 8192  # frames of one tensor (its spec's `frames`)
# Since 1.4 a tensor's bytes may come in several consecutive frames (its spec's `frames`): CURVE
# encrypts each frame on its own, and a 32 MiB frame goes at half the speed of 1 MiB ones.
FRAME_BYTES = 2**20
CHUNKED_SINCE = (1, 4)
# Since 1.6 a peer `backward` that names a kept pass may leave out its inputs (hidden, positions,
# mask, trainables): the server differentiates the pass as it kept it.
LEAN_BACKWARD_SINCE = (1, 6)
_RESERVED = ("v", "type", "id", "deadline", "tensors")


@dataclass
class Message:
    type: str
    id: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    deadline: float | None = None
    version: str = PROTOCOL_VERSION  # the sender's

    @property
    def chunked(self) -> bool:
        """Whether the sender reads tensors cut into several frames (its replies may be)."""
        return speaks(self.version, CHUNKED_SINCE)

    @property
    def frame_bytes(self) -> int:
        """How a reply to this request may cut its tensors into frames (0: whole, for a 1.3 sender)."""
        return FRAME_BYTES if self.chunked else 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str, kind: builtins.type | tuple[builtins.type, ...]) -> Any:
        """A field that must be present with the given type; a ProtocolError names it otherwise."""
        value = self.fields.get(key)
        if value is None or not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ProtocolError(f"{self.type}: field {key!r} must be {names}, got {_short(value)}")
        return value

    def tensor(self, name: str, optional: bool = False) -> torch.Tensor | None:
        t = self.tensors.get(name)
        if t is None and not optional:
            raise TensorError(f"{self.type}: tensor {name!r} is missing")
        return t


def encode(
    msg_type: str,
    req_id: int,
    fields: Mapping[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    deadline: float | None = None,
    frame_bytes: int = 0,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> list:
    """The frames of a message. With `frame_bytes` (for a receiver that speaks 1.4), a larger
    tensor goes in frames of at most that many bytes."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg_type, "id": req_id}
    if deadline is not None:
        header["deadline"] = deadline
    frames: list = [b""]
    if tensors:
        from libswarm.protocol.tensors import tensor_to_buffer

        specs = []
        for name, t in tensors.items():
            spec, buf = tensor_to_buffer(t)
            spec["name"] = name
            specs.append(spec)
            if frame_bytes and buf.nbytes > frame_bytes:
                raw = buf.cast("B")
                parts = [raw[i:i + frame_bytes] for i in range(0, raw.nbytes, frame_bytes)]
                spec["frames"] = len(parts)
                frames.extend(parts)
            else:
                frames.append(buf)
        header["tensors"] = specs
    if fields:
        header.update(fields)
    frames[0] = json.dumps(header, separators=(",", ":")).encode()
    if len(frames[0]) > max_header_bytes:  # every receiver would refuse it: say so here, at once
        raise ProtocolError(f"{msg_type}: header of {len(frames[0])} bytes exceeds the limit of {max_header_bytes}")
    return frames


def decode(frames: Sequence, max_bytes: int = 0, max_header_bytes: int = MAX_HEADER_BYTES) -> Message:
    """Parse a multipart message (bytes, memoryviews or zmq.Frame) into a Message; one of more
    than `max_bytes` (0: no limit) in all, or with a header of more than `max_header_bytes`,
    is refused before any tensor is built.

    Raises ProtocolError, TensorError or LimitError with a one-line reason; never anything
    else. Once the header is read, the error carries the message's id (`req_id`)."""
    try:
        return _decode(frames, max_bytes, max_header_bytes)
    except (ProtocolError, TensorError, LimitError):
        raise
    except RecursionError:  # JSON nested deeper than the interpreter's stack
        raise ProtocolError("header is nested too deeply") from None
    except (TypeError, ValueError, OverflowError, MemoryError) as e:  # a check missed below: still one line
        raise ProtocolError(f"malformed message ({type(e).__name__})") from None


def _decode(frames: Sequence, max_bytes: int, max_header_bytes: int) -> Message:
    if not frames:
        raise ProtocolError("empty message")
    head = _buffer(frames[0])
    if len(head) > max_header_bytes:
        raise ProtocolError(f"header of {len(head)} bytes exceeds the limit of {max_header_bytes}")
    try:
        header = json.loads(bytes(head))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    version = header.get("v")
    if not isinstance(version, str) or version.split(".")[0] != str(PROTOCOL_MAJOR):
        raise ProtocolError(f"protocol version {version!r} not supported (this peer speaks {PROTOCOL_VERSION})")
    msg_type, req_id = header.get("type"), header.get("id")
    if not isinstance(msg_type, str) or not isinstance(req_id, int) or isinstance(req_id, bool):
        raise ProtocolError("header needs a string 'type' and an integer 'id'")
    try:
        return _decode_rest(frames, header, msg_type, req_id, version, max_bytes)
    except SwarmError as e:
        e.req_id = req_id
        raise


def _decode_rest(frames: Sequence, header: dict, msg_type: str, req_id: int, version: str,
                 max_bytes: int) -> Message:
    deadline = header.get("deadline")
    if deadline is not None and not (isinstance(deadline, (int, float)) and not isinstance(deadline, bool)
                                     and abs(deadline) < 1e12 and math.isfinite(deadline)):
        # NaN (JSON lets it through) would never be shed; 10**400 overflows where it is used
        raise ProtocolError("'deadline' must be a finite number (unix seconds)")
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise ProtocolError(f"'tensors' must be a list of at most {MAX_TENSORS} specs")
    counts = [_frame_count(spec) for spec in specs]
    if sum(counts) != len(frames) - 1:
        raise ProtocolError(f"header announces {sum(counts)} tensor frames but {len(frames) - 1} follow")
    if max_bytes:
        # ZeroMQ bounds each frame (MAXMSGSIZE), not how many a message has: the whole is checked
        # here, before a tensor's frames are joined into one more copy
        size = sum(len(_buffer(f)) for f in frames)
        if size > max_bytes:
            raise LimitError(f"{msg_type}: message of {size} bytes is over the receiver's limit of {max_bytes} "
                             "(network.max_message_bytes)")
    tensors: dict[str, torch.Tensor] = {}
    if specs:
        from libswarm.protocol.tensors import tensor_from_buffer
    at = 1
    for spec, n in zip(specs, counts):
        name = spec.get("name")
        if not isinstance(name, str) or name in tensors:
            raise ProtocolError("each tensor spec needs a unique string 'name'")
        # a tensor in several frames is joined (one copy; its frames went through CURVE faster)
        buf = _buffer(frames[at]) if n == 1 else memoryview(b"".join(_buffer(f) for f in frames[at:at + n]))
        tensors[name] = tensor_from_buffer(spec, buf)
        at += n
    fields = {k: v for k, v in header.items() if k not in _RESERVED}
    return Message(msg_type, req_id, fields, tensors, deadline, version)


def _short(value: object, n: int = 60) -> str:
    """A peer's value quoted in an error: its repr, cut to `n` characters."""
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def speaks(version: str, since: tuple[int, int]) -> bool:
    """Whether a peer of protocol `version` ("1.4") has what came with version `since`."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= since


def _frame_count(spec: object) -> int:
    if not isinstance(spec, dict):
        raise ProtocolError("each tensor spec must be an object")
    n = spec.get("frames", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_FRAMES:
        raise ProtocolError(f"a tensor's 'frames' must be a count in 1..{MAX_FRAMES}")
    return n


def ok_reply(req_id: int, fields: Mapping[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None,
             frame_bytes: int = 0, max_header_bytes: int = MAX_HEADER_BYTES):
    return encode("ok", req_id, fields, tensors, frame_bytes=frame_bytes, max_header_bytes=max_header_bytes)


def error_reply(req_id: int, exc: BaseException) -> list:
    code, message = error_to_wire(exc)  # at most 1000 characters: the header stays under its limit
    fields = {"code": code, "message": message}
    consumed = getattr(exc, "consumed", None)
    if isinstance(consumed, str):
        fields["consumed"] = consumed
    return encode("error", req_id, fields)


def _error_of(msg: Message) -> Exception:
    """The exception for an error reply (built here, not in the raising frame, so that no
    reference cycle through that frame keeps its caller's sockets alive)."""
    from libswarm.errors import error_from_wire

    e = error_from_wire(str(msg.get("code", "error")), str(msg.get("message", "unknown error")))
    consumed = msg.get("consumed")
    if isinstance(consumed, str):
        e.consumed = consumed[:64]
    return e


def raise_if_error(msg: Message) -> Message:
    """Turn an error reply into the matching exception; pass an ok reply through."""
    if msg.type == "error":
        raise _error_of(msg)
    if msg.type != "ok":
        raise ProtocolError(f"unexpected reply type {msg.type!r}")
    return msg




# the header as `encode` writes it begins with the version, then the type: a type is read there
# only, never further on (`{"v": "1.4", "id": 1, "x": "\"type\": \"status\"", "type": "open"}` is an
# `open` disguised as a status request). A duplicate "type" key still fools a peek (JSON keeps the
# last): whoever routes by a peeked type checks the decoded one.
_LEADING_TYPE = re.compile(rb'\A\s*\{\s*"v"\s*:\s*"[0-9.]{1,16}"\s*,\s*"type"\s*:\s*"([a-z_]{1,32})"')


def peek_type(frame) -> str | None:
    """A message's type read from its header frame without decoding it, where `encode` puts it
    (right after the version); None otherwise: where a message goes is decided before it is
    parsed, and the decoded type must still be checked where that matters."""
    head = _buffer(frame)
    if len(head) > 256:
        head = head[:256]
    m = _LEADING_TYPE.match(bytes(head))
    return m.group(1).decode() if m else None


def _buffer(frame) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame
        return frame.buffer
    return memoryview(frame)


__all__ = [
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "Message",
    "SwarmError",
    "decode",
    "encode",
    "error_reply",
    "ok_reply",
    "raise_if_error",
]
