"""The integration tests' daemons come from tools/localswarm.py (shared with the demo and benchmarks)."""

import os

import psutil
import torch
import zmq
from conftest import hf_reference
from localswarm import SWARMCTL, SWARMD, Daemon, free_port, online_ids, running_swarm, until, wait_tables

from libswarm import AutoDistributedModelForCausalLM
from libswarm.protocol import decode, encode
from swarmd.identity import NodeIdentity

__all__ = ["SWARMCTL", "SWARMD", "Daemon", "Peer", "free_port", "running_swarm", "curve_dealer", "generate_equals_hf",
           "greedy", "online_ids", "reached_all", "rss_mib", "until", "wait_tables"]


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


class Peer:
    """A peer with a key of its own, speaking raw frames to one server's peer plane (a hostile
    gateway or server, scripted by a test)."""

    def __init__(self, server):
        self.identity = NodeIdentity(os.urandom(32))
        self.key = self.identity.public_key
        self.sock = curve_dealer(server.address, server.node_id, self.identity)
        self.ids = iter(range(1, 10**9))
        self.sessions: list[str] = []  # opened here: closed by close(), so tests leave nothing behind

    def send(self, msg_type: str, fields: dict | None = None, tensors: dict | None = None) -> int:
        req_id = next(self.ids)
        self.sock.send_multipart(encode(msg_type, req_id, fields, tensors))
        return req_id

    def request(self, msg_type: str, fields: dict | None = None, tensors: dict | None = None):
        req_id = self.send(msg_type, fields, tensors)
        while True:
            assert self.sock.poll(15_000), f"no answer to {msg_type}"
            reply = decode(self.sock.recv_multipart())
            if reply.id == req_id:
                return reply

    def open(self, server, model_id: str, **extra):
        fields = {"model_id": model_id, "blocks": server.cfg["serve"]["blocks"].split(":"), "max_length": 64,
                  "batch": 1, **extra}
        fields["blocks"] = [int(b) for b in fields["blocks"]]
        reply = self.request("open", fields)
        if reply.type == "ok":
            self.sessions.append(reply.get("session"))
        return reply

    def close(self):
        for sid in self.sessions:
            self.request("close", {"session": sid})
        self.sock.close()


def rss_mib(daemon) -> float:
    return psutil.Process(daemon.proc.pid).memory_info().rss / 2**20


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
