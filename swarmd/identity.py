"""The node's identity: a CURVE key pair made at first start and kept in state_dir.

The public key (Z85, 40 characters) is the node id. The secret key lives in
`state_dir/node.key`, mode 0600, owned by the daemon's user; `node.pub` beside it holds the
public key for operators (it is also what `swarmctl key` prints)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import zmq

from libswarm.errors import ConfigError

_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@dataclass(frozen=True)
class NodeIdentity:
    public_key: str
    secret_key: str

    @property
    def short_id(self) -> str:
        return self.public_key[:8]


def load_or_create_identity(state_dir: str) -> NodeIdentity:
    secret_path = os.path.join(state_dir, "node.key")
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"state_dir: cannot create {state_dir}: {e.strerror}") from None
    if os.path.exists(secret_path):
        return _load(secret_path)
    public, secret = zmq.curve_keypair()
    # create the file 0600 from the start: the secret is never readable by others, not even briefly
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.decode() + "\n")
    with open(os.path.join(state_dir, "node.pub"), "w") as f:
        f.write(public.decode() + "\n")
    return NodeIdentity(public.decode(), secret.decode())


def _load(secret_path: str) -> NodeIdentity:
    try:
        mode = os.stat(secret_path).st_mode & 0o777
        with open(secret_path) as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the node key {secret_path}: {e.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"the node key {secret_path} is readable by others (mode {mode:o}); chmod 600 it")
    if not _Z85_KEY.match(secret):
        raise ConfigError(f"the node key {secret_path} is not a CURVE secret key (40 Z85 characters); "
                          "move it away to make a new one")
    return NodeIdentity(zmq.curve_public(secret.encode()).decode(), secret)
