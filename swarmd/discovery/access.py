"""Who may talk to this daemon's peer plane: a ZAP handler in front of every CURVE handshake.

- open: any key may connect (traffic is still encrypted, and every peer is known by its key);
- private: only the keys in `swarm.allowed_keys_dir` (one file per peer, holding its node id,
  as `swarmctl key` prints it) and this node's own. A refused key cannot connect at all, so it
  can neither read records nor run a step. Refusals are logged with the key and address.

The same list filters what this daemon accepts from gossip and whom it connects to.
`reload()` (SIGHUP) re-reads the directory without touching open connections."""

from __future__ import annotations

import logging
import os
import re
import threading
import time

import zmq
from zmq.utils import z85

from swarmd.identity import is_key

log = logging.getLogger("swarmd.access")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "swarmd"
REFUSAL_LOG_INTERVAL_S = 60.0  # a refused peer retries every second; say so once a minute
MAX_KEY_FILE_BYTES = 4096
_CERT_LINE = re.compile(r'^\s*public-key\s*=\s*"(.{40})"\s*$')


def read_key_file(path: str) -> str:
    """The node id in a peers.d file: a line holding the 40-character key (other lines empty or
    # comments), or a ZeroMQ certificate's `public-key = "..."` line. ValueError says what is wrong."""
    with open(path, "rb") as f:
        raw = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ValueError("not text") from None
    lines = [line.strip() for line in text.splitlines()]
    keys = [m.group(1) for m in map(_CERT_LINE.match, lines) if m]  # a ZeroMQ certificate
    if not keys:
        for n, line in enumerate(lines, 1):
            if is_key(line):  # checked first: '#' is a Z85 character, a key may start with it
                keys.append(line)
            elif line and not line.startswith("#"):
                raise ValueError(f"line {n} is neither a key nor a # comment")
    if len(keys) != 1 or not is_key(keys[0]):
        raise ValueError("does not hold exactly one 40-character public key")
    return keys[0]


class AccessControl:
    def __init__(self, mode: str, keys_dir: str, own_key: str):
        self.mode, self.keys_dir, self.own_key = mode, keys_dir, own_key
        self.allowed: frozenset[str] = frozenset()
        self.refusals = 0
        self._last_refusal_log: dict[str, float] = {}
        if mode == "private":
            self.reload()

    @property
    def private(self) -> bool:
        return self.mode == "private"

    def reload(self) -> None:
        if not self.private:
            return
        keys: set[str] = set()
        try:
            names = sorted(os.listdir(self.keys_dir))
        except OSError as e:
            log.error("swarm.allowed_keys_dir %s cannot be read (%s): keeping the %d keys known before",
                      self.keys_dir, e.strerror, len(self.allowed))
            return
        for name in names:
            path = os.path.join(self.keys_dir, name)
            if name.startswith(".") or not os.path.isfile(path):
                continue
            try:
                keys.add(read_key_file(path))
            except (OSError, ValueError) as e:
                log.warning("allowed key file %s ignored: %s", path, getattr(e, "strerror", None) or e)
        self.allowed = frozenset(keys)
        log.info("private swarm: %d allowed keys from %s", len(keys), self.keys_dir)

    def allows(self, key: str | None) -> bool:
        if not self.private:
            return True
        return key is not None and (key == self.own_key or key in self.allowed)

    # --- the ZAP handler -----------------------------------------------------------------------
    def serve(self, zctx: zmq.Context, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Answer ZAP requests until `stop` (runs in its own thread)."""
        sock = zctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)
        if ready is not None:
            ready.set()
        try:
            while not stop.is_set():
                if not sock.poll(200):
                    continue
                frames = sock.recv_multipart()
                sock.send_multipart(self._answer(frames))
        finally:
            sock.close(0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        if mechanism != b"CURVE" or len(frames) < 7 or len(frames[6]) != 32:
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        key = z85.encode(frames[6]).decode()
        if self.allows(key):
            return [version, request_id, b"200", b"OK", key.encode(), b""]
        self.refusals += 1
        now = time.monotonic()
        if now - self._last_refusal_log.get(key, -1e9) >= REFUSAL_LOG_INTERVAL_S:
            self._last_refusal_log[key] = now
            log.warning("refused peer %s from %s: its key is not in %s (private swarm)", key,
                        address.decode(errors="replace"), self.keys_dir)
        return [version, request_id, b"400", b"key not allowed in this private swarm", b"", b""]
