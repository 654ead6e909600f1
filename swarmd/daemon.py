"""The Daemon: owns the ZeroMQ context, the sockets, the threads and the loaded span.

Start-up order matters to operators: the local socket comes up first, so `swarmctl status`
answers (state "loading") while weights load; the peer plane binds only once the span is
ready, so no peer ever sees a half-loaded server."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time

import psutil
import torch
import zmq

from libswarm import __version__
from libswarm.checkpoint import Checkpoint
from libswarm.errors import ConfigError, SwarmError
from libswarm.protocol import PROTOCOL_VERSION
from swarmd.config import Config, load_config
from swarmd.discovery.access import AccessControl
from swarmd.discovery.keyquery import KeyResponder, split_address
from swarmd.discovery.mdns import Mdns
from swarmd.discovery.membership import FINGERPRINT_PREFIX, Membership
from swarmd.discovery.records import MAX_ADDRESSES
from swarmd.discovery.table import PeerTable
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
        self.addresses: list[str] = []
        self.started = time.time()
        self.threads: list[threading.Thread] = []
        self.throughput = 0.0
        self.access = AccessControl(config.swarm.access, config.swarm.allowed_keys_dir, self.identity.public_key)
        self.pool = ConnectionPool(self.zctx, self.identity, lambda a: self.membership.key_for(a),
                                   config.network.max_message_bytes)
        self.table = PeerTable()
        self._fingerprints: dict[int, str | None] = {}
        self.membership = Membership(identity=self.identity, pool=self.pool, table=self.table, access=self.access,
                                     own_fields=self._own_fields, expected_fingerprint=self._expected_fingerprint)
        self.membership.set_seeds(list(config.discovery.seeds))
        self.mdns: Mdns | None = None
        self.gateway = Gateway(
            model_id=self.model_id, num_layers=self.num_layers, hidden_size=self.checkpoint.config.hidden_size,
            pool=self.pool, table=self.table, membership=self.membership, status=self.status,
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

    def _own_fields(self) -> dict | None:
        """This daemon's record, but for what membership stamps and signs (None: serves nothing)."""
        if self.server is None or self.span is None:
            return None
        return {
            "addresses": self.addresses, "state": "online", "model_id": self.model_id,
            "span": (self.span.start, self.span.end), "throughput": self.throughput,
            "cache_free_bytes": self.server.budget.free_bytes, "sessions": len(self.server.sessions),
            "fingerprints": tuple(f[:FINGERPRINT_PREFIX] for f in self.span.fingerprints),
        }

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.local.bind()
        self._thread("local", self.local.serve)
        log.info("listening for apps on %s", self.config.network.socket)
        if self.blocks is not None:
            self.state = "loading"
            self._load_and_serve(*self.blocks)
        self.state = "online"
        self._thread("gossip", self.membership.run)
        if self.config.discovery.mdns:
            self._start_mdns()
        log.info("online: model %s, %s", self.model_id,
                 f"blocks {self.blocks[0]}:{self.blocks[1]}" if self.blocks else "gateway only")

    def _start_mdns(self) -> None:
        self.mdns = Mdns(self.config.discovery.mdns_interfaces, self.identity.public_key, self.model_id,
                         lambda address, key, model: self.membership.add_hint(address, key, "mdns"))
        announce = split_address(self.address) if self.address else None
        try:
            self.mdns.start(announce)
        except OSError as e:  # no multicast on this machine: seeds still work
            log.error("mDNS could not start (%s); peers come from discovery.seeds only", e)
            self.mdns = None

    def _start_access(self) -> None:
        """The ZAP handler must be up before the peer plane binds: no handshake goes unchecked."""
        ready = threading.Event()
        self._thread("zap", lambda stop: self.access.serve(self.zctx, stop, ready))
        if not ready.wait(5):
            raise SwarmError("the access control thread did not start")

    def _load_and_serve(self, start: int, end: int) -> None:
        log.info("loading blocks %d:%d of %s on %s as %s", start, end, self.checkpoint.dir, self.device,
                 str(self.dtype).removeprefix("torch."))

        def progress(done: int, total: int) -> None:
            self.loaded_blocks = done
            log.info("loaded block %d/%d", done, total)

        span = Span(self.checkpoint, start, end, self.device, self.dtype).load(progress)
        budget = CacheBudget(self.config.serve.cache.max_bytes or self._auto_cache_bytes())
        s = self.config.serve
        self.throughput = measure_throughput(span, self.config.state_dir, self.model_id)
        self._start_access()
        self.server = SpanServer(self.zctx, span, budget, self.model_id, max_length=s.max_length,
                                 max_batch=s.max_batch, idle_timeout_s=s.session_idle_timeout_s,
                                 max_message_bytes=self.config.network.max_message_bytes, identity=self.identity,
                                 access=self.access, resolve_key=self.membership.key_for)
        self.server.handlers["gossip"] = self.membership.on_gossip
        try:
            bound = self.server.bind(self.config.network.listen)
        except zmq.ZMQError as e:
            raise ConfigError(f"{self.config.path}: network.listen: cannot bind {self.config.network.listen}: {e}") \
                from None
        self.span = span
        self.addresses = list(self.config.network.announce) or _connectable(bound)
        self.address = self.addresses[0]
        host_port = split_address(bound)
        if host_port is not None:
            try:
                responder = KeyResponder(host_port[0], host_port[1], self.identity.public_key)
                self._thread("keyquery", responder.serve)
            except OSError as e:  # peers then need this node's key in their seed lists
                log.warning("key query: cannot bind UDP %s:%d (%s); seeds must list this node's key",
                            host_port[0], host_port[1], e.strerror)
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
        try:
            self.membership.leave()
        except Exception:
            log.exception("publishing offline failed")
        if self.mdns is not None:
            self.mdns.stop()
        self.gateway.close_all()
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=5)
        self.pool.close_all()
        self.zctx.destroy(linger=0)

    def reload(self) -> None:
        """SIGHUP: re-read the seed list and the allowed keys; sessions and connections stay."""
        try:
            seeds = load_config(self.config.path).discovery.seeds
        except SwarmError as e:
            log.error("reload: %s; keeping the seed list in use", e)
        else:
            self.membership.set_seeds(list(seeds))
            log.info("reload: %d seeds", len(seeds))
        self.access.reload()

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
            "membership": {
                "access": self.access.mode,
                "allowed_keys": len(self.access.allowed) if self.access.private else None,
                "refused_handshakes": self.access.refusals,
                "rejected_records": self.membership.rejected,
                "mdns": self.mdns is not None,
                "seeds": len(self.config.discovery.seeds),
            },
            "coverage": coverage(self.table, self.model_id, self.num_layers),
            "peers": self.membership.rows(),
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


def _connectable(endpoint: str) -> list[str]:
    """Where peers can reach a bound endpoint: itself, or for a wildcard, every IPv4 address of
    this machine (LAN ones first, loopback last)."""
    m = re.match(r"^tcp://(0\.0\.0\.0|\*|\[::\]):(\d+)$", endpoint)
    if not m:
        return [endpoint]
    port = m.group(2)
    ips = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family == socket.AF_INET and not a.address.startswith("127.")]
    return [f"tcp://{ip}:{port}" for ip in ips[:MAX_ADDRESSES - 1]] + [f"tcp://127.0.0.1:{port}"]


def coverage(table: PeerTable, own_model: str, own_layers: int) -> list[dict]:
    """Per model: for each block, the online servers holding it and their summed throughput;
    runs of blocks nobody serves are listed as gaps."""
    models: dict[str, list] = {own_model: []}
    for e in table.entries():
        if e.record.model_id and e.record.span and table.state(e) == "online":
            models.setdefault(e.record.model_id, []).append(e)
    out = []
    for model_id, entries in models.items():
        n = own_layers if model_id == own_model else max(e.record.span[1] for e in entries)
        blocks = []
        for b in range(n):
            holders = [e for e in entries if e.record.span[0] <= b < e.record.span[1]]
            blocks.append({"block": b, "servers": [e.record.short_id for e in holders],
                           "throughput": round(sum(e.record.throughput for e in holders), 2)})
        gaps, start = [], None
        for b in range(n + 1):
            empty = b < n and not blocks[b]["servers"]
            if empty and start is None:
                start = b
            elif not empty and start is not None:
                gaps.append([start, b])
                start = None
        out.append({"model_id": model_id, "num_blocks": n, "blocks": blocks, "gaps": gaps,
                    "complete": not gaps})
    return out


def measure_throughput(span: Span, state_dir: str, model_id: str) -> float:
    """One-token decode steps per second through the span (batch 1), measured once per model,
    span, device and dtype and kept in state_dir/throughput.json."""
    key = f"{model_id}:{span.start}:{span.end}:{span.device}:{span.dtype}"
    path = os.path.join(state_dir, "throughput.json")
    try:
        with open(path) as f:
            known = json.load(f)
        if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
            return float(known[key])
    except (OSError, ValueError):
        known = {}
    x = torch.zeros(1, 1, span.hidden_size, dtype=span.dtype, device=span.device)
    pos = torch.zeros(1, 1, dtype=torch.long, device=span.device)
    times = []
    with torch.no_grad():
        for i in range(7):
            if span.device.type == "cuda":
                torch.cuda.synchronize(span.device)
            t0 = time.perf_counter()
            span.run(x, pos, None, span.start, span.end)
            if span.device.type == "cuda":
                torch.cuda.synchronize(span.device)
            if i >= 2:  # the first runs warm caches and allocators up
                times.append(time.perf_counter() - t0)
    throughput = round(1.0 / sorted(times)[len(times) // 2], 2)
    known = known if isinstance(known, dict) else {}
    known[key] = throughput
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(known, f)
        os.replace(path + ".tmp", path)
    except OSError as e:
        log.warning("cannot keep the measured throughput in %s: %s", path, e.strerror)
    return throughput
