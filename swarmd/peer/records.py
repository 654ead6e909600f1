"""What a span server keeps of each session, and of the steps waiting on it: plain records,
shared by the rooms of the server and by the pushes that come before their steps (early.py),
which import them from here rather than from each other."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from libswarm.protocol.registry import PeerStep
from swarmd.runtime.cache import SessionCache
from swarmd.runtime.span import Lora, Span


@dataclass
class PendingStep:
    """A step whose hidden states come from the previous server's push."""

    ident: bytes
    req_id: int
    sender: str | None  # the key that sent the step (its reply goes there)
    session: ServerSession
    req: PeerStep
    created: float = field(default_factory=time.monotonic)


@dataclass
class ServerSession:
    id: str
    cache: SessionCache
    span: Span  # the span it was opened on (after a move, old sessions drain on the old one)
    owner: str | None  # the key that opened it: only that key may step or close it
    lora: Lora | None = None  # a hosted adapter the client picked, for the session's blocks
    last_used: float = field(default_factory=time.monotonic)
    # the last step's number and output: a gateway that resends a step after a failure
    # elsewhere in the route gets the same answer, and the cache does not advance twice
    last_step: int | None = None
    last_output: torch.Tensor | None = None
    last_consumed: str | None = None  # the digest of the input the last step ran on (its `consumed`)
    queued: int = 0  # its steps on the compute thread: while any is, its next steps queue behind them
    waiting_step: int | None = None  # the number of its step last left waiting for its push
    in_batch: bool = False  # a step of it waits in the batch being gathered
    network: str | None = None  # whose keys share a cache share with its owner (limits.shared_network)
    prev_hop: str | None = None  # the previous hop its latest step named (`from`): whose pushes it takes


@dataclass
class BatchedStep:
    """A decode step checked and waiting to run in the next batch."""

    session: ServerSession
    req: PeerStep
    hidden: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor | None
    ident: bytes
    req_id: int
    sender: str | None
