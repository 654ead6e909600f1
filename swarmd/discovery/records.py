"""Peer records and heartbeats: what a daemon says about itself, signed so that no relay can
change it.

A record travels as {"body": JSON text, "sig": base64 Ed25519 signature of that text}. The
body names its `sign_key`; the node id must be the CURVE form of that key (see
swarmd/identity.py), so a relay can neither edit a record nor sign one in another node's
name. Checks, in order, each with its own reason: shape, size, JSON, fields, key binding,
signature, timestamp not in the future, every value within its bounds. Only `body` and `sig`
are kept and relayed: anything else a sender adds to the wire form is dropped.

A record is re-signed only when what it says changes. Liveness travels apart, as a beat: a
small signed stamp {"id", "inc", "beat", "sig"} that the node makes every gossip round. Both
are ordered by the node's incarnation (a number that grows with every start, kept in
state_dir) and a counter within it, never by its wall clock: a clock stepped backwards does
not make a node's news look old."""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import asdict, dataclass, field

from libswarm.errors import ProtocolError
from swarmd.config import KV_DTYPES, QUANT_MODES, is_endpoint
from swarmd.identity import NodeIdentity, is_key, node_id_of_sign_key, short_id, verify
from swarmd.transport.relay import relayed_address

MAX_RECORD_BYTES = 16 * 1024
MAX_CLOCK_SKEW_S = 30.0  # a record stamped further ahead than this is "from the future"
STATES = ("joining", "loading", "online", "draining", "offline")
MAX_ADDRESSES = 8
MAX_RTTS = 32
# Bounds on what a record may claim; each is far beyond any honest value (the largest models
# have ~100 blocks; a step of a block takes microseconds at best), and without them one record
# could hang every node (a span to 2^40 that coverage loops over) or win every route.
MAX_BLOCKS = 4096
MAX_THROUGHPUT = 1e6  # one-token steps per second through a span
MAX_FORWARD_THROUGHPUT = 1e9  # positions per second
MAX_BANDWIDTH_MBPS = 1e6
MAX_RTT_MS = 1e6
MAX_COUNT = 2**53  # cache bytes, sessions, sequence numbers, incarnations: exact in every JSON reader
MAX_NAMES = 64  # adapters
MAX_NAME_CHARS = 128  # model id, adapter names, version strings, fingerprints
MAX_RELAYS = 2  # a server that accepts no connections is reached through at most this many relays
REACHABLE = ("yes", "no", "unknown")


class RecordError(ProtocolError):
    """A record that is not accepted; the message says why."""


@dataclass(frozen=True)
class Record:
    node_id: str
    sign_key: str
    addresses: tuple[str, ...]
    state: str
    timestamp: float  # when it was signed (shown to operators; never used to order versions)
    seq: int  # grows with every new version within an incarnation
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
    incarnation: int = 0  # grows with every start of the node (state_dir/incarnation)
    reachable: str = "unknown"  # yes | no | unknown: whether peers can connect to its addresses
    relay: bool = False  # it relays for servers that accept no connections (network.relay)
    via: tuple[tuple[str, str], ...] = ()  # (node id, address) of the relays it is reached through
    quant: str = "none"  # none | int8 | int4 | nf4: its weights' quantization (serve.quant)
    kv_dtype: str = "auto"  # auto | int8: its KV cache (serve.cache.kv_dtype)
    capacity: int = 0  # blocks its memory holds beside its KV cache budget (0: not said; its span's length)
    also: tuple[int, int] | None = None  # a second span it serves while trading places (double-holding)

    @property
    def quantized(self) -> bool:
        """Its outputs carry quantization error (weights or KV cache)."""
        return self.quant != "none" or self.kv_dtype != "auto"

    @property
    def contact_addresses(self) -> tuple[str, ...]:
        """Where peers reach it: through its relays when it names any, else at its addresses."""
        if self.via:
            return tuple(relayed_address(address, self.node_id) for _, address in self.via)
        return self.addresses

    @property
    def short_id(self) -> str:
        return short_id(self.node_id)

    @property
    def version_key(self) -> tuple[int, int]:
        return self.incarnation, self.seq

    def to_json(self) -> dict:
        d = asdict(self)
        d["addresses"] = list(self.addresses)
        d["span"] = list(self.span) if self.span else None
        d["also"] = list(self.also) if self.also else None
        d["fingerprints"] = list(self.fingerprints)
        d["adapters"] = list(self.adapters)
        d["via"] = [list(v) for v in self.via]
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


def _number(d: dict, key: str, high: float, *, integer: bool = False) -> float:
    """An optional finite number in [0, high] (0 when absent)."""
    value = _type(d, key, int if integer else (int, float), optional=True)
    if value is None:
        return 0
    if not (math.isfinite(value) and 0 <= value <= high):
        raise RecordError(f"record field {key!r} must be within 0..{high:g}, got {str(value)[:32]}")
    return value


def _names(d: dict, key: str, limit: int) -> tuple[str, ...]:
    values = _type(d, key, list, optional=True) or []
    if len(values) > limit or not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS for v in values):
        raise RecordError(f"record field {key!r} must be at most {limit} strings of 1..{MAX_NAME_CHARS} characters")
    return tuple(values)


def _short_string(d: dict, key: str) -> str | None:
    value = _type(d, key, str, optional=True)
    if value is not None and len(value) > MAX_NAME_CHARS:
        raise RecordError(f"record field {key!r} is longer than {MAX_NAME_CHARS} characters")
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
    except RecursionError:  # parsed before its signature is checked: anyone can send one
        raise RecordError("record body is nested too deeply") from None
    if not isinstance(d, dict):
        raise RecordError("record body is not an object")
    node_id, sign_key = _type(d, "node_id", str), _type(d, "sign_key", str)
    if not is_key(node_id) or not is_key(sign_key):
        raise RecordError("record node_id or sign_key is not a Z85 key")
    if node_id_of_sign_key(sign_key) != node_id:
        raise RecordError(f"record of {short_id(node_id)}: its signing key belongs to another node")
    try:
        sig = base64.b64decode(wire["sig"], validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(f"record of {short_id(node_id)}: signature is not base64") from None
    if not verify(sign_key, sig, body.encode()):
        raise RecordError(f"record of {short_id(node_id)}: bad signature")
    addresses = _type(d, "addresses", list)
    if not (1 <= len(addresses) <= MAX_ADDRESSES) or not all(is_endpoint(a) for a in addresses):
        # ZeroMQ refuses to connect to anything else, and that refusal must not come at gossip time
        raise RecordError(f"record of {short_id(node_id)}: addresses must be 1..{MAX_ADDRESSES} tcp://host:port")
    state = _type(d, "state", str)
    if state not in STATES:
        raise RecordError(f"record of {short_id(node_id)}: unknown state {state[:24]!r}")
    timestamp = float(_type(d, "timestamp", (int, float)))
    now = time.time() if now is None else now
    if not math.isfinite(timestamp) or timestamp > now + MAX_CLOCK_SKEW_S:
        raise RecordError(f"record of {short_id(node_id)} is from the future ({timestamp - now:.0f} s ahead)")
    try:
        return _fields(d, node_id, sign_key, addresses, state, timestamp)
    except RecordError as e:
        raise RecordError(f"record of {short_id(node_id)}: {str(e).removeprefix('record ')}") from None


def _span(d: dict, key: str) -> tuple[int, int] | None:
    span = _type(d, key, list, optional=True)
    if span is None:
        return None
    if not (len(span) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
            and 0 <= span[0] < span[1] <= MAX_BLOCKS):
        raise RecordError(f"{key} must be [start, end] with 0 <= start < end <= {MAX_BLOCKS}")
    return span[0], span[1]


def _fields(d: dict, node_id: str, sign_key: str, addresses: list, state: str, timestamp: float) -> Record:
    span, also = _span(d, "span"), _span(d, "also")
    if also is not None and span is None:
        raise RecordError("also (a span held beside another) without a span")
    rtt = _type(d, "rtt_ms", dict, optional=True) or {}
    if len(rtt) > MAX_RTTS or not all(
            isinstance(k, str) and len(k) <= 16 and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and 0 <= v <= MAX_RTT_MS for k, v in rtt.items()):
        raise RecordError(f"rtt_ms must map at most {MAX_RTTS} short ids to round trips in 0..{MAX_RTT_MS:g} ms")
    reachable = _short_string(d, "reachable") or "unknown"
    if reachable not in REACHABLE:
        raise RecordError(f"reachable must be one of {', '.join(REACHABLE)}")
    via = _type(d, "via", list, optional=True) or []
    if len(via) > MAX_RELAYS or not all(
            isinstance(v, list) and len(v) == 2 and is_key(v[0]) and v[0] != node_id and isinstance(v[1], str)
            and is_endpoint(v[1]) for v in via):
        raise RecordError(f"via must list at most {MAX_RELAYS} [relay node id, tcp:// address] pairs")
    quant = _short_string(d, "quant") or "none"
    kv_dtype = _short_string(d, "kv_dtype") or "auto"
    if quant not in QUANT_MODES or kv_dtype not in KV_DTYPES:
        raise RecordError(f"quant must be one of {', '.join(QUANT_MODES)} and kv_dtype one of {', '.join(KV_DTYPES)}")
    fingerprints = _names(d, "fingerprints", MAX_BLOCKS)
    if span is not None and len(fingerprints) > span[1] - span[0]:
        raise RecordError("more fingerprints than blocks in its span")
    return Record(
        node_id=node_id, sign_key=sign_key, addresses=tuple(addresses), state=state, timestamp=timestamp,
        seq=int(_number(d, "seq", MAX_COUNT, integer=True)),
        incarnation=int(_number(d, "incarnation", MAX_COUNT, integer=True)),
        model_id=_short_string(d, "model_id"),
        span=span,
        also=also,
        capacity=int(_number(d, "capacity", MAX_BLOCKS, integer=True)),
        throughput=float(_number(d, "throughput", MAX_THROUGHPUT)),
        forward_throughput=float(_number(d, "forward_throughput", MAX_FORWARD_THROUGHPUT)),
        cache_free_bytes=int(_number(d, "cache_free_bytes", MAX_COUNT, integer=True)),
        sessions=int(_number(d, "sessions", MAX_COUNT, integer=True)),
        version=_short_string(d, "version") or "",
        protocol=_short_string(d, "protocol") or "",
        rtt_ms={k: float(v) for k, v in rtt.items()},
        fingerprints=fingerprints,
        movable=d.get("movable") is True,
        bandwidth_mbps=float(_number(d, "bandwidth_mbps", MAX_BANDWIDTH_MBPS)),
        adapters=_names(d, "adapters", MAX_NAMES),
        reachable=reachable,
        relay=d.get("relay") is True,
        via=tuple((v[0], v[1]) for v in via),
        quant=quant,
        kv_dtype=kv_dtype,
    )


# --- beats ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Beat:
    """A node's liveness stamp: its `incarnation` and a counter that grows every gossip round."""

    node_id: str
    incarnation: int
    beat: int
    sig: bytes

    @staticmethod
    def signed(identity: NodeIdentity, incarnation: int, beat: int) -> dict:
        text = _beat_text(identity.public_key, incarnation, beat)
        return {"id": identity.public_key, "inc": incarnation, "beat": beat,
                "sig": base64.b64encode(identity.sign(text)).decode()}

    def verify(self, sign_key: str) -> bool:
        return verify(sign_key, self.sig, _beat_text(self.node_id, self.incarnation, self.beat))

    def wire(self) -> dict:
        """Rebuilt from the checked fields: nothing a sender added travels on."""
        return {"id": self.node_id, "inc": self.incarnation, "beat": self.beat,
                "sig": base64.b64encode(self.sig).decode()}


def _beat_text(node_id: str, incarnation: int, beat: int) -> bytes:
    return f"swarm-beat:{node_id}:{incarnation}:{beat}".encode()


def decode_beat(wire: object) -> Beat:
    """A well-formed beat (its signature is checked by the holder of the node's record)."""
    if not isinstance(wire, dict):
        raise RecordError("malformed beat (want {id, inc, beat, sig})")
    node_id, inc, beat, sig = wire.get("id"), wire.get("inc"), wire.get("beat"), wire.get("sig")
    if not (isinstance(node_id, str) and is_key(node_id)):
        raise RecordError("beat without a node id")
    if not (_is_count(inc) and _is_count(beat)):
        raise RecordError(f"beat of {short_id(node_id)}: inc and beat must be counts")
    assert isinstance(inc, int) and isinstance(beat, int)
    if not isinstance(sig, str) or len(sig) > 128:
        raise RecordError(f"beat of {short_id(node_id)}: malformed signature")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(f"beat of {short_id(node_id)}: signature is not base64") from None
    return Beat(node_id, inc, beat, raw)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_COUNT
