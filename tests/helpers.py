"""The integration tests' daemons come from tools/localswarm.py (shared with the demo and benchmarks)."""

import os

import torch
import zmq
from conftest import hf_reference
from localswarm import SWARMCTL, SWARMD, Daemon, free_port, online_ids, running_swarm, until, wait_tables

from libswarm import AutoDistributedModelForCausalLM
from swarmd.identity import NodeIdentity

__all__ = ["SWARMCTL", "SWARMD", "Daemon", "free_port", "running_swarm", "curve_dealer", "generate_equals_hf",
           "online_ids", "until", "wait_tables"]


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


def generate_equals_hf(model_dir: str, socket: str) -> None:
    """Greedy generation through the daemon at `socket` equals Hugging Face's own model."""
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=socket)
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(do_sample=False, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), hf_reference(model_dir).generate(ids, **kw))
