"""Who may talk to this daemon's peer plane: pyzmq's ZAP authenticator in front of every CURVE
handshake, asking this module about each key.

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
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator

from swarmd.identity import is_key, short_id

log = logging.getLogger("swarmd.access")

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
        self._auth: ThreadAuthenticator | None = None
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
    def start(self, zctx: zmq.Context) -> None:
        """Put pyzmq's authenticator (its own thread) in front of every CURVE handshake on
        `zctx`: it asks `callback` about each key. Call before the peer plane binds."""
        self._auth = ThreadAuthenticator(zctx, log=logging.getLogger("swarmd.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def callback(self, domain: str, key: bytes) -> bool:
        """Whether the peer with this CURVE key (Z85) may finish its handshake. pyzmq's
        authenticator then makes the key the connection's User-Id, which the servers read."""
        text = key.decode("ascii", errors="replace")
        if self.allows(text):
            return True
        self.refusals += 1
        now = time.monotonic()
        if now - self._last_refusal_log.get(text, -1e9) >= REFUSAL_LOG_INTERVAL_S:
            if len(self._last_refusal_log) >= 4096:
                self._last_refusal_log.clear()
            self._last_refusal_log[text] = now
            log.warning("refused peer %s (%s): its key is not in %s (private swarm)", short_id(text), text,
                        self.keys_dir)
        return False
