"""The integration tests' daemons come from tools/localswarm.py (shared with the demo and benchmarks)."""

import os

import torch
import zmq
from conftest import hf_reference
from localswarm import SWARMCTL, SWARMD, Daemon, free_port, online_ids, running_swarm, until, wait_tables

from libswarm import AutoDistributedModelForCausalLM
from swarmd.identity import NodeIdentity

__all__ = ["SWARMCTL", "SWARMD", "Daemon", "free_port", "running_swarm", "curve_dealer", "generate_equals_hf",
           "greedy", "online_ids", "reached_all", "until", "wait_tables"]


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


def greedy(model_dir: str, socket: str, prompt_seed: int, tokens: int):
    """`tokens` greedy tokens after a random prompt, through the daemon at `socket` and from
    Hugging Face's own model: (ours, theirs)."""
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(prompt_seed))
    kw = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=socket)
    return model.generate(ids, **kw), hf_reference(model_dir).generate(ids, **kw)


def reached_all(gw: Daemon, servers: list[Daemon]) -> None:
    """Wait until the gateway has reached every server itself (a measured round trip): routes
    use only such servers."""
    ids = {x.node_id for x in servers}
    until(lambda: {p.get("node_id") for p in gw.ctl("peers")["peers"] if p.get("rtt_ms") is not None} >= ids, 30,
          "the gateway to reach every server")


def generate_equals_hf(model_dir: str, socket: str) -> None:
    """Greedy generation through the daemon at `socket` equals Hugging Face's own model."""
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=socket)
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(do_sample=False, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), hf_reference(model_dir).generate(ids, **kw))
