"""Peer records: what a daemon says about itself, signed so that no relay can change it.

A record travels as {"body": JSON text, "sig": base64 Ed25519 signature of that text}. The
body names its `sign_key`; the node id must be the CURVE form of that key (see
swarmd/identity.py), so a relay can neither edit a record nor sign one in another node's
name. Checks, in order, each with its own reason: shape, size, JSON, fields, key binding,
signature, timestamp not in the future."""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import asdict, dataclass, field

from libswarm.errors import ProtocolError
from swarmd.identity import NodeIdentity, is_key, node_id_of_sign_key, verify

MAX_RECORD_BYTES = 16 * 1024
MAX_CLOCK_SKEW_S = 30.0  # a record stamped further ahead than this is "from the future"
STATES = ("joining", "online", "draining", "offline")
MAX_ADDRESSES = 8
MAX_RTTS = 32


class RecordError(ProtocolError):
    """A record that is not accepted; the message says why."""


@dataclass(frozen=True)
class Record:
    node_id: str
    sign_key: str
    addresses: tuple[str, ...]
    state: str
    timestamp: float
    seq: int
    model_id: str | None = None
    span: tuple[int, int] | None = None
    throughput: float = 0.0  # one-token decode steps per second through the whole span
    forward_throughput: float = 0.0  # positions per second through the whole span, in large forwards
    cache_free_bytes: int = 0
    sessions: int = 0
    version: str = ""
    protocol: str = ""
    rtt_ms: dict[str, float] = field(default_factory=dict)  # short node id -> round trip, ms
    fingerprints: tuple[str, ...] = ()  # per block of the span, a prefix of its weights' fingerprint
    movable: bool = False  # serve.blocks: auto: placement may move it
    bandwidth_mbps: float = 0.0  # measured to its best peer lately (0: not measured yet)
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters it hosts (serve.adapters)

    @property
    def short_id(self) -> str:
        return self.node_id[:8]

    @property
    def version_key(self) -> tuple[float, int]:
        return self.timestamp, self.seq

    def to_json(self) -> dict:
        d = asdict(self)
        d["addresses"] = list(self.addresses)
        d["span"] = list(self.span) if self.span else None
        d["fingerprints"] = list(self.fingerprints)
        d["adapters"] = list(self.adapters)
        return d

    def sign(self, identity: NodeIdentity) -> dict:
        body = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return {"body": body, "sig": base64.b64encode(identity.sign(body.encode())).decode()}


def _type(d: dict, key: str, types, *, optional: bool = False):
    value = d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, types) or isinstance(value, bool):
        raise RecordError(f"record field {key!r} is missing or has the wrong type")
    return value


def decode_record(wire: object, now: float | None = None) -> Record:
    """A verified Record from its wire form, or RecordError saying what is wrong with it."""
    if not isinstance(wire, dict) or not isinstance(wire.get("body"), str) or not isinstance(wire.get("sig"), str):
        raise RecordError("malformed record (want {body, sig} strings)")
    body = wire["body"]
    if len(body) > MAX_RECORD_BYTES:
        raise RecordError(f"oversized record ({len(body)} bytes, limit {MAX_RECORD_BYTES})")
    try:
        d = json.loads(body)
    except ValueError:
        raise RecordError("record body is not JSON (truncated?)") from None
    if not isinstance(d, dict):
        raise RecordError("record body is not an object")
    node_id, sign_key = _type(d, "node_id", str), _type(d, "sign_key", str)
    if not is_key(node_id) or not is_key(sign_key):
        raise RecordError("record node_id or sign_key is not a Z85 key")
    if node_id_of_sign_key(sign_key) != node_id:
        raise RecordError(f"record of {node_id[:8]}: its signing key belongs to another node")
    try:
        sig = base64.b64decode(wire["sig"], validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(f"record of {node_id[:8]}: signature is not base64") from None
    if not verify(sign_key, sig, body.encode()):
        raise RecordError(f"record of {node_id[:8]}: bad signature")
    addresses = _type(d, "addresses", list)
    if not (1 <= len(addresses) <= MAX_ADDRESSES) or not all(
        isinstance(a, str) and a.startswith("tcp://") and len(a) < 256 for a in addresses
    ):
        raise RecordError(f"record of {node_id[:8]}: addresses must be 1..{MAX_ADDRESSES} tcp:// strings")
    state = _type(d, "state", str)
    if state not in STATES:
        raise RecordError(f"record of {node_id[:8]}: unknown state {state!r}")
    timestamp = float(_type(d, "timestamp", (int, float)))
    now = time.time() if now is None else now
    if timestamp > now + MAX_CLOCK_SKEW_S:
        raise RecordError(f"record of {node_id[:8]} is from the future ({timestamp - now:.0f} s ahead)")
    span = _type(d, "span", list, optional=True)
    if span is not None and not (
        len(span) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in span) and 0 <= span[0] < span[1]
    ):
        raise RecordError(f"record of {node_id[:8]}: span must be [start, end]")
    rtt = _type(d, "rtt_ms", dict, optional=True) or {}
    if len(rtt) > MAX_RTTS or not all(isinstance(v, (int, float)) for v in rtt.values()):
        raise RecordError(f"record of {node_id[:8]}: rtt_ms must map at most {MAX_RTTS} ids to numbers")
    fingerprints = _type(d, "fingerprints", list, optional=True) or []
    if not all(isinstance(f, str) for f in fingerprints):
        raise RecordError(f"record of {node_id[:8]}: fingerprints must be strings")
    return Record(
        node_id=node_id, sign_key=sign_key, addresses=tuple(addresses), state=state, timestamp=timestamp,
        seq=int(_type(d, "seq", int)),
        model_id=_type(d, "model_id", str, optional=True),
        span=(span[0], span[1]) if span else None,
        throughput=float(_type(d, "throughput", (int, float), optional=True) or 0.0),
        forward_throughput=float(_type(d, "forward_throughput", (int, float), optional=True) or 0.0),
        cache_free_bytes=int(_type(d, "cache_free_bytes", int, optional=True) or 0),
        sessions=int(_type(d, "sessions", int, optional=True) or 0),
        version=str(_type(d, "version", str, optional=True) or ""),
        protocol=str(_type(d, "protocol", str, optional=True) or ""),
        rtt_ms={str(k): float(v) for k, v in rtt.items()},
        fingerprints=tuple(fingerprints),
        movable=d.get("movable") is True,
        bandwidth_mbps=float(_type(d, "bandwidth_mbps", (int, float), optional=True) or 0.0),
        adapters=tuple(a for a in (_type(d, "adapters", list, optional=True) or []) if isinstance(a, str))[:64],
    )
