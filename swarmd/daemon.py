"""The Daemon: owns the ZeroMQ context, the sockets, the threads and the loaded span.

Start-up order matters to operators: the local socket comes up first, so `swarmctl status`
answers (state "loading") while weights load; the peer plane binds only once the span is
ready, so no peer ever sees a half-loaded server."""

from __future__ import annotations

import logging
import re
import threading
import time

import psutil
import torch
import zmq

from libswarm import __version__
from libswarm.checkpoint import Checkpoint
from libswarm.errors import ConfigError, SwarmError
from libswarm.protocol import PROTOCOL_VERSION
from swarmd.config import Config
from swarmd.discovery.seeds import SeedPoller
from swarmd.discovery.table import PeerRecord, PeerTable
from swarmd.gateway.connection import ConnectionPool
from swarmd.gateway.gateway import Gateway
from swarmd.identity import load_or_create_identity
from swarmd.local import LocalServer
from swarmd.peer.server import SpanServer
from swarmd.runtime.cache import CacheBudget
from swarmd.runtime.span import Span

log = logging.getLogger("swarmd")

# With cache.max_bytes: auto, this share of the memory left after loading goes to KV caches;
# the rest is headroom for activations and the allocator's fragmentation.
AUTO_CACHE_SHARE = 0.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.identity = load_or_create_identity(config.state_dir)
        self.checkpoint = Checkpoint(config.model)
        self.model_id = config.model_id or self.checkpoint.model_id
        self.num_layers = self.checkpoint.num_layers
        self.blocks = self._choose_blocks()
        self.device = _device(config.serve.device)
        self.dtype = _dtype(config.serve.dtype, self.device)
        self.zctx = zmq.Context()
        self.stop_event = threading.Event()
        self.state = "starting"
        self.loaded_blocks = 0
        self.span: Span | None = None
        self.server: SpanServer | None = None
        self.address: str | None = None
        self.started = time.time()
        self.threads: list[threading.Thread] = []
        self.pool = ConnectionPool(self.zctx, config.network.max_message_bytes)
        self.table = PeerTable()
        self._fingerprints: dict[int, str | None] = {}
        self.poller = SeedPoller(self.pool, self.table, self._seed_addresses, self._self_record,
                                 self._expected_fingerprint)
        self.gateway = Gateway(
            model_id=self.model_id, num_layers=self.num_layers, hidden_size=self.checkpoint.config.hidden_size,
            pool=self.pool, table=self.table, poller=self.poller, status=self.status,
        )
        handlers = dict(self.gateway.handlers, key=lambda m: (self.key_info(), None))
        self.local = LocalServer(self.zctx, config.network.socket, handlers, config.network.max_message_bytes)
        self.local.on_idle = self.gateway.expire_idle

    def _choose_blocks(self) -> tuple[int, int] | None:
        blocks, n = self.config.serve.blocks, self.num_layers
        if blocks == "none":
            return None
        if blocks == "auto":  # placement by swarm throughput comes with load balancing; until then, from 0
            return 0, min(n, self.config.serve.num_blocks or n)
        assert isinstance(blocks, tuple)
        start, end = blocks
        if end > n:
            raise ConfigError(f"{self.config.path}: serve.blocks: {start}:{end} is out of range, "
                              f"the model has blocks 0:{n}")
        return start, end

    def _expected_fingerprint(self, block: int) -> str | None:
        """This daemon's checkpoint's fingerprint of a block, or None when it lacks the block."""
        if block not in self._fingerprints:
            try:
                self._fingerprints[block] = self.checkpoint.block_fingerprint(block)
            except SwarmError:
                self._fingerprints[block] = None
        return self._fingerprints[block]

    def _seed_addresses(self) -> list[str]:
        return [s.address for s in self.config.discovery.seeds]

    def _self_record(self) -> PeerRecord | None:
        if self.server is None or self.address is None:
            return None
        info = self.server.info()
        return PeerRecord(
            address=self.address, model_id=self.model_id, span=(info["span"][0], info["span"][1]), state="online",
            cache_free_bytes=info["cache_free_bytes"], sessions=info["sessions"], rtt_ms=0.0, last_seen=time.time(),
            is_self=True, info=info,
        )

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.local.bind()
        self._thread("local", self.local.serve)
        log.info("listening for apps on %s", self.config.network.socket)
        if self.blocks is not None:
            self.state = "loading"
            self._load_and_serve(*self.blocks)
        self.state = "online"
        if self.config.discovery.mdns:
            log.info("discovery.mdns: mDNS discovery is not in this version yet; peers come from discovery.seeds")
        self._thread("seeds", self.poller.run)
        log.info("online: model %s, %s", self.model_id,
                 f"blocks {self.blocks[0]}:{self.blocks[1]}" if self.blocks else "gateway only")

    def _load_and_serve(self, start: int, end: int) -> None:
        log.info("loading blocks %d:%d of %s on %s as %s", start, end, self.checkpoint.dir, self.device,
                 str(self.dtype).removeprefix("torch."))

        def progress(done: int, total: int) -> None:
            self.loaded_blocks = done
            log.info("loaded block %d/%d", done, total)

        span = Span(self.checkpoint, start, end, self.device, self.dtype).load(progress)
        budget = CacheBudget(self.config.serve.cache.max_bytes or self._auto_cache_bytes())
        s = self.config.serve
        self.server = SpanServer(self.zctx, span, budget, self.model_id, max_length=s.max_length,
                                 max_batch=s.max_batch, idle_timeout_s=s.session_idle_timeout_s,
                                 max_message_bytes=self.config.network.max_message_bytes)
        try:
            bound = self.server.bind(self.config.network.listen)
        except zmq.ZMQError as e:
            raise ConfigError(f"{self.config.path}: network.listen: cannot bind {self.config.network.listen}: {e}") \
                from None
        self.span = span
        self.address = self.config.network.announce[0] if self.config.network.announce else _connectable(bound)
        self._thread("peer", self.server.serve)
        log.info("serving blocks %d:%d on %s (KV cache budget %.1f MiB)", start, end, bound,
                 budget.max_bytes / 2**20)

    def _auto_cache_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * AUTO_CACHE_SHARE)
        return int(psutil.virtual_memory().available * AUTO_CACHE_SHARE)

    def _thread(self, name: str, target) -> None:
        t = threading.Thread(target=target, args=(self.stop_event,), name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def stop(self) -> None:
        self.state = "stopping"
        self.gateway.close_all()
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=5)
        self.pool.close_all()
        self.zctx.destroy(linger=0)

    # --- what swarmctl status and key show ------------------------------------------------------
    def key_info(self) -> dict:
        return {"public_key": self.identity.public_key, "node_id": self.identity.short_id,
                "path": f"{self.config.state_dir}/node.pub"}

    def status(self) -> dict:
        server_info = self.server.info() if self.server else None
        budget = self.server.budget if self.server else None
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "state": self.state,
            "uptime_s": round(time.time() - self.started, 1),
            "node_id": self.identity.public_key,
            "address": self.address,
            "socket": self.config.network.socket,
            "model": {
                "id": self.model_id,
                "path": self.checkpoint.dir,
                "architecture": self.checkpoint.architecture,
                "num_layers": self.num_layers,
            },
            "serve": {
                "blocks": list(self.blocks) if self.blocks else None,
                "loaded_blocks": self.loaded_blocks,
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
            },
            "sessions": {
                "server": server_info["sessions"] if server_info else 0,
                "gateway": len(self.gateway.sessions),
            },
            "cache": {
                "max_bytes": budget.max_bytes if budget else 0,
                "used_bytes": budget.used_bytes if budget else 0,
                "free_bytes": budget.free_bytes if budget else 0,
            },
            "stats": vars(self.server.stats).copy() if self.server else {},
            "gateway": {
                "sessions": len(self.gateway.sessions),
                "failovers": self.gateway.failovers,
                "last_failover": self.gateway.last_failover,
                "banned": sorted(self.gateway.bans.banned()),
            },
            "peers": [r.to_json() for r in self.table.records()],
        }


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"serve.device: {name} asked for, but CUDA is not available on this machine")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU half-precision matmuls are slow and less exact


def _connectable(endpoint: str) -> str:
    """A bound wildcard endpoint as peers on this host can reach it."""
    return re.sub(r"^tcp://(0\.0\.0\.0|\*|\[::\])", "tcp://127.0.0.1", endpoint)
