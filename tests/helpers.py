"""The integration tests' daemons come from tools/localswarm.py (shared with the demo and benchmarks)."""

import os

import zmq
from localswarm import SWARMCTL, SWARMD, Daemon, free_port, running_swarm

from swarmd.identity import NodeIdentity

__all__ = ["SWARMCTL", "SWARMD", "Daemon", "free_port", "running_swarm", "curve_dealer"]


def curve_dealer(address: str, server_key: str, identity: NodeIdentity | None = None) -> zmq.Socket:
    """A DEALER connected to a daemon's peer plane as a peer would: CURVE, with `identity`'s
    keys (a fresh random identity by default)."""
    identity = identity or NodeIdentity(os.urandom(32))
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_secretkey = identity.secret_key.encode()
    s.curve_publickey = identity.public_key.encode()
    s.curve_serverkey = server_key.encode()
    s.connect(address)
    return s
