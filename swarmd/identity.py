"""The node's identity: one secret made at first start and kept in state_dir.

`state_dir/node.key` (mode 0600) holds a 32-byte Ed25519 seed in Z85. From it come
- the signing key pair, which signs the node's peer records (docs/protocol.md, "Records");
- the CURVE key pair of the peer plane: the X25519 form of the same key (the birational map
  every Ed25519/X25519 library uses), so anyone holding a record can check that its signing
  key and its node id belong together, with no certificate.

The CURVE public key (Z85, 40 characters) is the node id: what `swarmctl key` prints, what
peers.d files of private swarms list, what seeds may pin. `node.pub` beside the secret
holds it for operators."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from dataclasses import dataclass
from functools import cached_property

import zmq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from zmq.utils import z85

from libswarm.errors import ConfigError

Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_P = 2**255 - 19


def is_key(text: object) -> bool:
    return isinstance(text, str) and bool(Z85_KEY.match(text))


@dataclass(frozen=True)
class NodeIdentity:
    seed: bytes  # the Ed25519 seed: never leaves this object

    @cached_property
    def public_key(self) -> str:
        """The node id: the CURVE public key, Z85."""
        return zmq.curve_public(self.secret_key.encode()).decode()

    @cached_property
    def secret_key(self) -> str:
        """The CURVE secret key (Z85): the X25519 scalar of the Ed25519 seed."""
        h = bytearray(hashlib.sha512(self.seed).digest()[:32])
        h[0] &= 248
        h[31] &= 127
        h[31] |= 64
        return z85.encode(bytes(h)).decode()

    @cached_property
    def sign_key(self) -> str:
        """The Ed25519 public key, Z85: records carry it so that relays cannot forge them."""
        raw = Ed25519PrivateKey.from_private_bytes(self.seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return z85.encode(raw).decode()

    @property
    def short_id(self) -> str:
        return short_id(self.public_key)

    @cached_property
    def _signer(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign(data)

    def __repr__(self) -> str:  # never print the seed
        return f"NodeIdentity({self.public_key})"


def short_id(key: str | None) -> str:
    """The form of a node id people read, type and say aloud: the first 4 bytes of the key in
    hex (`3fa8c2d1`), where the Z85 text would need shell quoting (`h7)}%^hB`). "?" for none."""
    if not is_key(key):
        return "?"
    assert key is not None
    return z85.decode(key[:10].encode())[:4].hex()


def node_id_of_sign_key(sign_key: str) -> str:
    """The CURVE public key (node id) that belongs to an Ed25519 public key."""
    y = int.from_bytes(z85.decode(sign_key.encode()), "little") & ((1 << 255) - 1)
    u = (1 + y) * pow(1 - y, _P - 2, _P) % _P
    return z85.encode(u.to_bytes(32, "little")).decode()


def verify(sign_key: str, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(z85.decode(sign_key.encode())).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


def load_or_create_identity(state_dir: str) -> NodeIdentity:
    secret_path = os.path.join(state_dir, "node.key")
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"state_dir: cannot create {state_dir}: {e.strerror}") from None
    if os.path.exists(secret_path):
        return _load(secret_path)
    identity = NodeIdentity(os.urandom(32))
    # 0600 from the start (the secret is never readable by others, not even briefly), written
    # whole to a temporary file, synced, then renamed: a crash or power loss leaves either no
    # key or the whole key, never an empty or torn one that would refuse every later start
    _write_durably(secret_path, z85.encode(identity.seed).decode() + "\n", 0o600)
    _write_durably(os.path.join(state_dir, "node.pub"), identity.public_key + "\n", 0o644)
    return identity


def _write_durably(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


def _load(secret_path: str) -> NodeIdentity:
    try:
        mode = os.stat(secret_path).st_mode & 0o777
        with open(secret_path) as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the node key {secret_path}: {e.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"the node key {secret_path} is readable by others (mode {mode:o}); chmod 600 it")
    if not is_key(secret):
        raise ConfigError(f"the node key {secret_path} is not a node secret (40 Z85 characters); "
                          "move it away to make a new one")
    return NodeIdentity(z85.decode(secret.encode()))


def next_incarnation(state_dir: str) -> int:
    """This start's incarnation: above the last one kept in state_dir/incarnation, and at least
    the wall clock's seconds (so that a lost state_dir still starts above older runs). Peers
    order this node's records and beats by it, so a clock stepped backwards, before or after a
    restart, never makes its news look old."""
    path = os.path.join(state_dir, "incarnation")
    try:
        with open(path) as f:
            last = int(f.read().strip())
    except (OSError, ValueError):
        last = 0
    incarnation = max(last + 1, int(time.time()))
    with contextlib.suppress(OSError):  # unwritable: the clock alone orders this start
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        _write_durably(path, f"{incarnation}\n", 0o644)
    return incarnation
