"""Relays: how a server that accepts no connections (behind NAT or a firewall) still serves.

Such a server N keeps an outgoing CURVE connection to one or two reachable daemons that opt in
(`network.relay: true`) and registers there; its record names them in `via`. A peer C that
wants N connects to a relay R as to any peer, and sends `relay` messages whose payload is the
request it would have sent N, sealed to N's key; R hands the payload to N over N's connection,
N's reply comes back the same way, sealed to C.

The seal: an X25519 exchange of the two nodes' CURVE keys (the same keys that CURVE itself
uses, so nothing new is learnt or trusted), HKDF-SHA256 to a key per ordered pair, and
ChaCha20-Poly1305 over the message's frames with a random nonce and both keys (sender first)
as associated data. R sees only who talks to whom and how much: it can neither read nor alter
a payload, nor turn one back to its sender. Each seal carries its time; a receiver refuses one
older than REPLAY_WINDOW_S, or one whose nonce it saw already, so R cannot replay a request
either. Both layers are libraries' (`cryptography`, which the daemon already needs for its
signatures, and ZeroMQ's CURVE): nothing here is hand-made cryptography.

Relayed addresses: a peer reaches N through R at "relay+tcp://R-host:R-port/N's node id", an
address derived from N's signed record, so the rest of the daemon (routes, pushes, gossip,
bans) treats N like any other peer at one more address."""

from __future__ import annotations

import itertools
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from libswarm.errors import LimitError, PeerUnavailableError, ProtocolError
from libswarm.protocol import Message, decode, encode
from libswarm.protocol.messages import FRAME_BYTES
from swarmd.identity import NodeIdentity, is_key, short_id
from swarmd.transport.prefixes import network_of
from swarmd.transport.relay_slots import Slot, make_room

if TYPE_CHECKING:
    import torch

log = logging.getLogger("swarmd.relay")

PREFIX = "relay+"
KEY_CHARS = 40
REPLAY_WINDOW_S = 600.0  # a seal older (or further ahead) than this is refused: clocks may differ by less
# seals remembered against replays, per sender (~100 bytes each; the oldest go first, raising that
# sender's floor), and senders remembered (the least recent go): ~100 MB at the very most
MAX_NONCES = 4096
MAX_SENDERS = 256
MAX_SEALED_BYTES = 2**31 - 1 - 1024  # ChaCha20-Poly1305 in `cryptography` takes less than 2 GiB at once
KEEPALIVE_S = 1.0  # a relayed server renews its registration this often...
EXPIRE_S = 3.5  # ...and a relay forgets one not renewed in this time
PAIR_TTL_S = 600.0  # a relayed server may answer a request through the relay this long after it
LINK_TIMEOUT_S = 3.0  # a relay that does not acknowledge a registration in this time is given up
_SEAL_INFO = b"swarm relay seal 1"
_nonce_ids = itertools.count()


# --- addresses ---------------------------------------------------------------------------------
def relayed_address(relay_address: str, node_id: str) -> str:
    """The address at which `node_id` is reached through the relay at `relay_address`."""
    return f"{PREFIX}{relay_address}/{node_id}"


def split_relayed(address: str) -> tuple[str, str] | None:
    """(relay's tcp:// address, relayed node id) of a relayed address, or None."""
    if not address.startswith(PREFIX) or len(address) < len(PREFIX) + KEY_CHARS + 8:
        return None
    relay, node_id = address[len(PREFIX):-KEY_CHARS - 1], address[-KEY_CHARS:]
    if address[-KEY_CHARS - 1] != "/" or not relay.startswith("tcp://") or not is_key(node_id):
        return None
    return relay, node_id


# --- sealing -----------------------------------------------------------------------------------
def pack(frames: Sequence) -> bytes:
    """Frames as one byte string: their count, their lengths, their bytes."""
    views = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames]
    head = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
    return b"".join([head, *views])


def unpack(blob: memoryview) -> list[memoryview]:
    if blob.nbytes < 4:
        raise ProtocolError("sealed payload too short")
    (n,) = struct.unpack_from("<I", blob)
    if not 1 <= n <= 8192 or blob.nbytes < 4 + 8 * n:
        raise ProtocolError("sealed payload has a bad frame count")
    sizes = struct.unpack_from(f"<{n}Q", blob, 4)
    at = 4 + 8 * n
    if at + sum(sizes) != blob.nbytes:
        raise ProtocolError("sealed payload's frame sizes do not add up")
    out = []
    for size in sizes:
        out.append(blob[at:at + size])
        at += size
    return out


class Sealer:
    """Seals frames to a peer's key and opens what peers sealed to this node's key."""

    MAX_KEYS = 4096  # derived pair keys kept (one exchange and one HKDF each)

    def __init__(self, identity: NodeIdentity, clock=time.time):
        self.own_key = identity.public_key
        self._secret = X25519PrivateKey.from_private_bytes(z85.decode(identity.secret_key.encode()))
        self._keys: OrderedDict[str, ChaCha20Poly1305] = OrderedDict()
        # per sender: nonce -> seal time, and the floor below which its seals are refused (their
        # nonces may have been forgotten). Per sender, so that one key filling its cache (or
        # forgetting a seal stamped far ahead) shuts out only itself, never the others
        self._seen: OrderedDict[str, OrderedDict[bytes, float]] = OrderedDict()
        self._floor: dict[str, float] = {}
        self._lock = threading.Lock()  # several threads seal (gateway, pushes) and open (serving)
        self._clock = clock

    def _aead(self, peer_key: str) -> ChaCha20Poly1305:
        with self._lock:
            aead = self._keys.get(peer_key)
            if aead is not None:
                self._keys.move_to_end(peer_key)
                return aead
        if not is_key(peer_key):
            raise ProtocolError("sealed to or from something that is not a node id")
        try:
            shared = self._secret.exchange(X25519PublicKey.from_public_bytes(z85.decode(peer_key.encode())))
        except ValueError:  # a low-order point: no key agreed with it
            raise ProtocolError(f"no key can be agreed with {short_id(peer_key)}") from None
        aead = ChaCha20Poly1305(HKDF(hashes.SHA256(), 32, salt=None, info=_SEAL_INFO).derive(shared))
        with self._lock:
            self._keys[peer_key] = aead
            while len(self._keys) > self.MAX_KEYS:
                self._keys.popitem(last=False)
        return aead

    def seal(self, peer_key: str, frames: Sequence) -> bytes:
        blob = pack(frames)
        if len(blob) > MAX_SEALED_BYTES:
            raise ProtocolError(f"a relayed message of {len(blob)} bytes is over the {MAX_SEALED_BYTES} a seal takes")
        stamp = struct.pack("<d", self._clock())
        nonce = os.urandom(12)
        aad = f"{self.own_key}>{peer_key}".encode() + stamp
        return nonce + stamp + self._aead(peer_key).encrypt(nonce, blob, aad)

    def open(self, peer_key: str, sealed: memoryview | bytes) -> list[memoryview]:
        """The frames `peer_key` sealed to this node; ProtocolError when they were not (forged,
        altered, replayed, too old, or sealed to another node)."""
        sealed = memoryview(sealed)
        if sealed.nbytes < 12 + 8 + 16:
            raise ProtocolError("sealed payload too short")
        nonce, stamp = bytes(sealed[:12]), bytes(sealed[12:20])
        (when,) = struct.unpack("<d", stamp)
        now = self._clock()
        if not abs(now - when) <= REPLAY_WINDOW_S:
            raise ProtocolError(f"sealed payload from {short_id(peer_key)} is stamped {now - when:.0f} s off this "
                                "node's clock")
        if when < self._floor.get(peer_key, 0.0):
            raise ProtocolError(f"sealed payload from {short_id(peer_key)} is older than the seals remembered "
                                "against replays")
        aad = f"{peer_key}>{self.own_key}".encode() + stamp
        try:  # authenticated before anything is remembered: only the key's holder fills its cache
            blob = self._aead(peer_key).decrypt(nonce, sealed[20:], aad)
        except InvalidTag:
            raise ProtocolError(f"sealed payload from {short_id(peer_key)} fails authentication") from None
        with self._lock:
            seen = self._seen.get(peer_key)
            if seen is None:
                seen = self._seen[peer_key] = OrderedDict()
            self._seen.move_to_end(peer_key)
            if nonce in seen:
                raise ProtocolError(f"sealed payload from {short_id(peer_key)} was received before (a replay)")
            seen[nonce] = when
            while seen and (len(seen) > MAX_NONCES or next(iter(seen.values())) < now - 2 * REPLAY_WINDOW_S):
                _, forgotten = seen.popitem(last=False)
                if len(seen) >= MAX_NONCES:  # forgotten before its window closed: its older seals are refused
                    self._floor[peer_key] = max(self._floor.get(peer_key, 0.0), forgotten)
            self._forget_senders(now)
        return unpack(memoryview(blob))

    def _forget_senders(self, now: float) -> None:
        """Senders beyond MAX_SENDERS: the least recent goes, its floor raised to its newest seal
        (any seal of it still within the window is then refused: it must seal anew)."""
        while len(self._seen) > MAX_SENDERS:
            key, seen = self._seen.popitem(last=False)
            if seen:
                self._floor[key] = max(self._floor.get(key, 0.0), max(seen.values()))
        if len(self._floor) > 4 * MAX_SENDERS:  # floors past the window protect nothing
            for key in [k for k, f in self._floor.items() if f < now - 2 * REPLAY_WINDOW_S]:
                del self._floor[key]


def sealed_message(msg_type: str, req_id: int, fields: dict, sealed: bytes | memoryview | torch.Tensor) -> list:
    """A `relay` message carrying `sealed` as its one uint8 tensor, in FRAME_BYTES frames."""
    import torch

    t = sealed if isinstance(sealed, torch.Tensor) else torch.frombuffer(bytearray(sealed), dtype=torch.uint8)
    return encode(msg_type, req_id, fields, {"sealed": t}, frame_bytes=FRAME_BYTES)


def sealed_bytes(msg: Message) -> memoryview:
    import torch

    t = msg.tensor("sealed")
    assert t is not None
    if t.dtype != torch.uint8 or t.ndim != 1:
        raise ProtocolError("relay: tensor 'sealed' must be 1-d uint8")
    return t.numpy().data.cast("B")


# --- the relay's side --------------------------------------------------------------------------
MAX_PENDING = 65_536  # requests a relay remembers awaiting their answer (~100 bytes each)
MAX_OUTER_ID = 2**31 - 1  # the ids a relay gives forwarded requests cycle below this


@dataclass(frozen=True)
class Pending:
    ident: bytes  # the asking connection, here
    req_id: int  # the id it asked under
    client: str  # its key
    server: str  # the relayed server asked
    at: float


class RelayService:
    """What a relay keeps: the servers registered with it (their connections' identities) and
    the requests each may answer; a byte budget over all it forwards. Used on the serving
    thread only."""

    def __init__(self, enabled: bool, max_bytes_per_s: int, max_servers: int, clock=time.monotonic,
                 vouch: Callable[[str], bool] = lambda key: False):
        """`vouch(key)`: whether a signed record says that `key` is a server needing a relay
        (relay_slots.py); it decides who keeps a slot when more want one than fit."""
        self.enabled, self.max_bytes_per_s, self.max_servers = enabled, max_bytes_per_s, max_servers
        self._clock, self._vouch = clock, vouch
        self.servers: dict[str, Slot] = {}  # relayed node id -> its registration
        # requests forwarded and not answered yet, under the id the relay gave each: an answer goes
        # to the connection that asked, under that request's own id (one key may hold many
        # connections, one per thread, whose ids overlap), and only once
        self.pending: OrderedDict[int, Pending] = OrderedDict()
        self._by_client_id: dict[tuple[str, str, int], int] = {}  # (server, client, its id) -> relay's id
        self._ids = itertools.count(1)
        self._tokens, self._at = float(max_bytes_per_s), clock()
        self.forwarded_bytes = 0
        self.refused = 0
        self.evicted = 0  # registrations that gave their slot to a newcomer that ranked higher

    def register(self, server: str | None, ident: bytes, host: str | None = None) -> None:
        """A registration (or its renewal) from `server` at `ident`, connected from `host`."""
        if not self.enabled:
            raise ProtocolError("this daemon does not relay (network.relay: false)")
        if server is None:
            raise ProtocolError("relay_register needs a CURVE key")
        self.expire()  # the server has answered the waiting clients of lapsed ones (none left here)
        now, vouched = self._clock(), self._vouch(server)
        slot = self.servers.get(server)
        if slot is not None:
            slot.ident, slot.renewed, slot.vouched = ident, now, vouched
            return
        network = network_of(host)
        try:
            victim = make_room(self.servers, self.max_servers, network, vouched, now)
        except LimitError:
            self.refused += 1
            raise
        if victim is not None:
            del self.servers[victim]
            self.evicted += 1
            log.info("no longer relaying for %s: its slot went to %s, which ranks higher (relay_slots.py)",
                     short_id(victim), short_id(server))
        log.info("relaying for %s", short_id(server))
        self.servers[server] = Slot(ident, now, now, network, vouched)

    def expire(self) -> list[Pending]:
        """Forget registrations not renewed in EXPIRE_S, and requests older than PAIR_TTL_S.
        Returns the requests forwarded to a server whose registration lapsed and not answered:
        their clients are told at once (they would otherwise wait out their own deadlines for
        an answer that cannot come this way)."""
        now = self._clock()
        lapsed = set()
        for key, slot in list(self.servers.items()):
            if now - slot.renewed > EXPIRE_S:
                del self.servers[key]
                lapsed.add(key)
                log.info("no longer relaying for %s (its registration lapsed)", short_id(key))
        orphans = []
        if lapsed:
            for outer, p in list(self.pending.items()):
                if p.server in lapsed:
                    del self.pending[outer]
                    self._forget_index(p)
                    orphans.append(p)
        while self.pending and next(iter(self.pending.values())).at < now - PAIR_TTL_S:
            _, old = self.pending.popitem(last=False)
            self._forget_index(old)
        return orphans

    def route(self, sender: str | None, to: str, ident: bytes, nbytes: int,
              req_id: int = 0) -> tuple[bytes, int] | None:
        """Where a `relay` message from `sender` (at `ident`, with outer id `req_id`) to `to`
        goes: (the identity to send it to, the outer id to send it under); None to drop it
        silently (an answer to no request forwarded here, or a second answer to one);
        PeerUnavailableError when a request cannot go through (the client routes elsewhere)."""
        if not self.enabled:
            raise PeerUnavailableError("this daemon does not relay (network.relay: false)")
        if sender is None:
            raise ProtocolError("relay needs a CURVE key")
        now = self._clock()
        if sender in self.servers:  # a relayed server speaks only to answer
            outer = req_id
            asked = self.pending.get(outer)
            if asked is None or asked.server != sender or asked.client != to:
                # a server before 1.5 answers under the client's own id: the latest such request
                outer = self._by_client_id.get((sender, to, req_id), 0)
                asked = self.pending.get(outer)
                if asked is None:
                    return None  # nobody asked it this: dropped, and no byte of the budget spent on it
            del self.pending[outer]
            self._by_client_id.pop((asked.server, asked.client, asked.req_id), None)
            self.servers[sender].active = now  # only an answer to a request counts as use
            self._spend(nbytes, now)
            return asked.ident, asked.req_id
        target = self.servers.get(to)
        if target is None or now - target.renewed > EXPIRE_S:
            raise PeerUnavailableError(f"{short_id(to)} is not relayed here (it left, or moved to another relay)")
        if not self._spend(nbytes, now, strict=True):
            self.refused += 1
            raise PeerUnavailableError(f"relay over its limit of {self.max_bytes_per_s} bytes/s "
                                       "(network.relay_max_bytes_per_s)")
        outer = next(self._ids) % MAX_OUTER_ID + 1
        self.pending[outer] = Pending(ident, req_id, sender, to, now)
        self._by_client_id[(to, sender, req_id)] = outer
        while len(self.pending) > MAX_PENDING:
            _, old = self.pending.popitem(last=False)
            self._forget_index(old)
        target.active = now
        return target.ident, outer

    def _forget_index(self, p: Pending) -> None:
        key = (p.server, p.client, p.req_id)
        if (asked := self.pending.get(self._by_client_id.get(key, 0))) is None or asked is p:
            self._by_client_id.pop(key, None)

    def _spend(self, nbytes: int, now: float, strict: bool = False) -> bool:
        """Take `nbytes` from the budget (a burst of one second's worth). Answers always go (a
        dropped one would only make its client wait out a deadline); requests wait for room."""
        rate = float(self.max_bytes_per_s)
        self._tokens = min(rate, self._tokens + (now - self._at) * rate)
        self._at = now
        if strict and self._tokens < min(nbytes, rate):
            return False
        self._tokens -= nbytes
        self.forwarded_bytes += nbytes
        return True

    def info(self) -> dict:
        return {"enabled": self.enabled, "servers": sorted(short_id(k) for k in self.servers),
                "forwarded_bytes": self.forwarded_bytes, "refused": self.refused, "evicted": self.evicted}


# --- the relayed server's side -----------------------------------------------------------------
class RelayLink:
    """A relayed server's outgoing connection to one relay (on the serving thread only)."""

    def __init__(self, zctx: zmq.Context, identity: NodeIdentity, relay_id: str, address: str):
        self.relay_id, self.address = relay_id, address
        self.sock = zctx.socket(zmq.DEALER)
        self.sock.curve_secretkey = identity.secret_key.encode()
        self.sock.curve_publickey = identity.public_key.encode()
        self.sock.curve_serverkey = relay_id.encode()
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 500)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2000)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.sock.connect(address)
        self.registered = False
        self.failed: str | None = None
        self.created = time.monotonic()
        self.renewed = 0.0  # monotonic: the last acknowledged registration
        self.sent = 0.0
        self._register_id = 0

    def tick(self) -> None:
        """Register (again) when due; notice a lost connection or a relay that stopped answering."""
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())["event"]
            self.failed = "its connection dropped" if event == zmq.EVENT_DISCONNECTED else "it refused the handshake"
        now = time.monotonic()
        if self.failed is None and now - max(self.renewed, self.created) > LINK_TIMEOUT_S + KEEPALIVE_S:
            self.failed = "it stopped acknowledging the registration"
        if self.failed is None and now - self.sent >= KEEPALIVE_S:
            self._register_id = next(_nonce_ids) + 1
            try:
                self.sock.send_multipart(encode("relay_register", self._register_id, {}), zmq.NOBLOCK)
            except zmq.Again:
                pass  # not connected yet: tried again next tick
            self.sent = now

    def on_reply(self, msg: Message) -> None:
        if msg.type == "ok":
            if not self.registered:
                log.info("relayed by %s at %s", short_id(self.relay_id), self.address)
            self.registered, self.renewed = True, time.monotonic()
        elif msg.type == "error" and msg.id == self._register_id:
            self.failed = f"it refused: {msg.get('message')}"

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


def is_relay_ident(ident: bytes) -> bool:
    return ident.startswith(b"R|")


def relay_ident(relay_id: str, client: str, outer_id: int = 0) -> bytes:
    """The identity under which a relayed request's reply is routed back (never a ZeroMQ one:
    those start with a zero byte): the relay, the client, and the outer id the relay gave the
    request, which the answer must carry for the relay to find the connection that asked."""
    return f"R|{relay_id}|{client}|{outer_id}".encode()


def split_relay_ident(ident: bytes) -> tuple[str, str, int]:
    text = ident.decode()
    return text[2:2 + KEY_CHARS], text[3 + KEY_CHARS:3 + 2 * KEY_CHARS], int(text[4 + 2 * KEY_CHARS:] or 0)


def open_relayed(sealer: Sealer, frames: list) -> tuple[str, list[memoryview], int]:
    """A `relay` message as a relayed server receives it: (the client's key, the inner frames,
    the outer id its answer goes back under)."""
    msg = decode(frames)
    sender = msg.get("from")
    if msg.type != "relay" or not is_key(sender):
        raise ProtocolError("relay: a forwarded message needs 'from', a node id")
    return sender, sealer.open(sender, sealed_bytes(msg)), msg.id
