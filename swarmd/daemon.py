"""The Daemon: owns the ZeroMQ context, the sockets, the threads and the loaded span.

Start-up order matters to operators: the local socket comes up first, so `swarmctl status`
answers while weights load. The peer plane binds next, before anything is loaded, so that a
server can gossip the span it intends to take (record state `joining`, then `loading`): servers
started together see each other's choices and do not all take the same blocks. Until the span
is loaded it answers only gossip and ping, and no gateway routes to it (only `online`
servers are routed to)."""

from __future__ import annotations

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
from swarmd.balancer import Balancer
from swarmd.config import Config, load_config
from swarmd.coverage import coverage, single_text
from swarmd.discovery.keyquery import KeyResponder, split_address
from swarmd.discovery.mdns import Mdns
from swarmd.discovery.membership import FINGERPRINT_PREFIX, Membership
from swarmd.discovery.reach import Reachability
from swarmd.discovery.records import MAX_ADDRESSES
from swarmd.discovery.table import PeerTable
from swarmd.gateway.gateway import Gateway
from swarmd.identity import load_or_create_identity, next_incarnation
from swarmd.local import LocalServer
from swarmd.metrics import MetricsServer, registry
from swarmd.operators import Operators
from swarmd.peer import failpoints
from swarmd.peer.server import SpanServer
from swarmd.placement import blocks_that_fit
from swarmd.runtime.cache import CacheBudget
from swarmd.runtime.quant import served_quant
from swarmd.runtime.span import Span
from swarmd.runtime.speed import BlockSpeed, auto_cpu_dtype, measure_block_speed
from swarmd.sdnotify import notify
from swarmd.transport import netem
from swarmd.transport.access import AccessControl
from swarmd.transport.connection import ConnectionPool, peer_context
from swarmd.transport.relay import RelayService

log = logging.getLogger("swarmd")

# With cache.max_bytes: auto, this share of the memory left after loading goes to KV caches;
# the rest is headroom for activations and the allocator's fragmentation.
AUTO_CACHE_SHARE = 0.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_DIGESTS = "weights.json"  # in state_dir: each weight file's tensor digests (libswarm.checkpoint)
# peer connections one thread keeps (the least recently used closed first): twice what a gossip
# round opens at once (membership.MAX_CONTACTS_PER_ROUND), far more than a route has hops
PEER_CONNECTIONS_PER_THREAD = 256
COVERAGE_WATCH_S = 1.0  # how often coverage is looked at: a gap's age is right to a second
COVERAGE_SETTLE_S = 10.0  # after start the table is still filling: no coverage warnings before


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.identity = load_or_create_identity(config.state_dir)
        netem.locate(self.identity.public_key)  # an emulated network's places file names nodes by id
        self.checkpoint = Checkpoint(config.model, digest_cache=os.path.join(config.state_dir, WEIGHT_DIGESTS))
        self.model_id = config.model_id or self.checkpoint.model_id
        self.num_layers = self.checkpoint.num_layers
        self.auto = config.serve.blocks == "auto"
        self.blocks = self._configured_blocks()  # with blocks: auto, chosen at start (and moved later)
        # blocks its memory holds beside the KV cache budget (blocks: auto only; 0: not said): above
        # its span's length, it may double-hold while trading places (placement.py)
        self.capacity = 0
        self.device = _device(config.serve.device)
        self.dtype = _dtype(config.serve.dtype, self.device)
        # the weights' kind computed with (and announced): serve.quant, or the checkpoint's own
        self.quant = served_quant(self.checkpoint.stored_quant, config.serve.quant, self.device)
        self.kv_int8 = config.serve.cache.kv_dtype == "int8"
        # two I/O threads: CURVE encrypts in them, and a large tensor's frames then go at twice
        # the speed (tools/bench_transport.py); small messages are not slowed
        self.zctx = peer_context(io_threads=2)
        self.stop_event = threading.Event()
        self.state = "starting"
        self.loaded_blocks = 0
        self.span: Span | None = None
        self.server: SpanServer | None = None
        self.address: str | None = None
        self.bound = ""  # the peer plane's endpoint as bound
        self.addresses: list[str] = []
        self.started = time.time()
        self.threads: list[threading.Thread] = []
        self.speed: BlockSpeed | None = None
        self.drain_requested = threading.Event()  # swarmctl drain: main() drains and exits 0
        self.access = AccessControl(config.swarm.access, config.swarm.allowed_keys_dir, self.identity.public_key)
        self.table = PeerTable(own_id=self.identity.public_key)
        self.table.quantized = config.swarm.quantized
        self.pool = ConnectionPool(self.zctx, self.identity, lambda a: self.membership.key_for(a),
                                   config.network.max_message_bytes, max_connections=PEER_CONNECTIONS_PER_THREAD,
                                   resolve_protocol=self.table.protocol_for)
        self._fingerprints: dict[int, str | None] = {}
        self._uncovered_since: dict[tuple[str, int], float] = {}  # (model, block): first seen uncovered
        self._coverage_lock = threading.Lock()  # the watch thread and status both update _uncovered_since
        self.membership = Membership(identity=self.identity, pool=self.pool, table=self.table, access=self.access,
                                     own_fields=self._own_fields, expected_fingerprint=self._expected_fingerprint,
                                     incarnation=next_incarnation(config.state_dir))
        self.membership.set_seeds(list(config.discovery.seeds))
        self.mdns: Mdns | None = None
        self.reach: Reachability | None = None  # with a peer plane: whether peers can connect to it
        self.balancer = Balancer(self, table=self.table, membership=self.membership, key=self.identity.public_key,
                                 model_id=self.model_id, num_layers=self.num_layers, auto=self.auto,
                                 interval_s=config.serve.rebalance_interval_s,
                                 expects_peers=lambda: bool(self.membership.hints) or self.mdns is not None)
        self.gateway = Gateway(
            model_id=self.model_id, num_layers=self.num_layers, hidden_size=self.checkpoint.config.hidden_size,
            pool=self.pool, table=self.table, membership=self.membership, status=self.status,
            verify=config.swarm.verify, verify_probability=config.swarm.verify_probability,
        )
        handlers = dict(self.gateway.handlers, key=lambda m: (self.key_info(), None),
                        rebalance=lambda m: (self.balancer.on_rebalance(bool(m.dry_run), _in_thread), None),
                        drain=lambda m: (self._request_drain(), None))
        self.local = LocalServer(self.zctx, config.network.socket, handlers, config.network.max_message_bytes,
                                 Operators(config.network.operator_group))
        self.local.on_idle = self.gateway.expire_idle

    def _configured_blocks(self) -> tuple[int, int] | None:
        blocks, n = self.config.serve.blocks, self.num_layers
        if blocks in ("none", "auto"):
            return None
        assert isinstance(blocks, tuple)
        start, end = blocks
        if end > n:
            raise ConfigError(f"{self.config.path}: serve.blocks: {start}:{end} is out of range, "
                              f"the model has blocks 0:{n}")
        return start, end

    def _expected_fingerprint(self, model_id: str | None, block: int) -> str | None:
        """This daemon's checkpoint's fingerprint of a block of `model_id`, or None when that
        is another model (nothing to compare) or the checkpoint lacks the block."""
        if model_id != self.model_id:
            return None
        return self._fingerprints.get(block)

    def _fingerprint_weights(self) -> None:
        """Every block's fingerprint, before any peer's record is read: a full hash of the
        checkpoint at first start (about 8 s for 13.5 GB; docs/benchmarks.md), read from
        state_dir after that."""
        t0 = time.monotonic()
        notify("STATUS=fingerprinting the checkpoint's weights (first start only)")
        for block in range(self.num_layers):
            try:
                self._fingerprints[block] = self.checkpoint.block_fingerprint(block)
            except SwarmError as e:  # this checkpoint lacks the block: no comparison for it
                log.debug("block %d: no fingerprint (%s)", block, e)
        log.info("weights fingerprinted in %.2f s", time.monotonic() - t0)

    def _own_fields(self) -> dict | None:
        """This daemon's record, but for what membership stamps and signs (None: it serves
        nothing, or has not chosen its blocks yet). Before its span is loaded, the record
        announces the blocks it chose: `joining` while placement may still change them,
        `loading` once it loads them."""
        server, span, blocks = self.server, self.span, self.blocks
        if server is None or self.speed is None or blocks is None:
            return None
        if span is not None:
            blocks = (span.start, span.end)
            state = "draining" if self.state == "draining" else "online"
        else:
            state = "joining" if self.state == "placing" else "loading"
        n = blocks[1] - blocks[0]
        return {
            "addresses": self.addresses, "state": state,
            "model_id": self.model_id,
            "span": blocks,
            "throughput": self.speed.span_throughput(n, self.checkpoint.config.hidden_size * self.dtype.itemsize,
                                                     self.membership.bandwidth_bps),
            "forward_throughput": round(self.speed.forward_tokens_per_s / n, 1), "movable": self.auto,
            "capacity": self.capacity,
            "also": (server.also.start, server.also.end) if span is not None and server.also is not None else None,
            "adapters": tuple(sorted(server.adapters)),
            "cache_free_bytes": server.budget.free_bytes, "sessions": len(server.sessions),
            "fingerprints": tuple(f[:FINGERPRINT_PREFIX] for f in span.fingerprints) if span else (),
            "quant": self.quant, "kv_dtype": self.config.serve.cache.kv_dtype,
            **self._reach_fields(),
        }

    def _reach_fields(self) -> dict:
        reachable = self.reach.state if self.reach is not None else "unknown"
        return {"reachable": reachable, "relay": self.config.network.relay and reachable != "no",
                "via": tuple(self.server.relays_up) if self.server and reachable == "no" else ()}

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.local.bind()
        self._thread("local", self.local.serve)
        log.info("listening for apps on %s", self.config.network.socket)
        serves = self.config.serve.blocks != "none"
        self._fingerprint_weights()
        if serves:
            self._start_access()
            self._bind_peer_plane()
        self._thread("gossip", self.membership.run)  # from the start: placement needs the swarm's table
        self._thread("coverage", self._watch_coverage)
        if self.config.discovery.mdns:
            self._start_mdns()
        if serves:
            if self.mdns is not None and self.address:
                host_port = split_address(self.address)
                if host_port:
                    self.mdns.announce(*host_port)
            self.state = "measuring"
            notify("STATUS=measuring one block's speed (first start on this device and dtype only)")
            if self.config.serve.dtype == "auto" and self.device.type == "cpu":
                self.dtype = auto_cpu_dtype(self.checkpoint, self.config.state_dir, self.model_id, self.quant)
            self.speed = measure_block_speed(self.checkpoint, self.device, self.dtype, self.config.state_dir,
                                             self.model_id, self.quant)
            if self.blocks is None:
                self.state = "placing"
                notify("STATUS=placing: learning the swarm to choose blocks")
                fit = self._blocks_that_fit(self.speed)
                n = self.config.serve.num_blocks or fit
                self.capacity = max(n, fit)  # serve.num_blocks below what fits leaves room to double-hold
                self.balancer.discover()
                self.blocks = self.balancer.join(n, self.speed.span_throughput(n))
            self.state = "loading"
            self.membership.round()  # the swarm learns at once that these blocks are taken
            self._load_and_serve(*self.blocks)
            if self.auto:
                self._thread("balancer", self.balancer.run)
        if self.config.metrics.listen is not None:
            host, port = self.config.metrics.listen
            try:
                metrics = MetricsServer(host, port, registry(
                    self.status, lambda: self.server.step_seconds if self.server else None))
            except OSError as e:
                raise ConfigError(f"{self.config.path}: metrics.listen: cannot bind {host}:{port}: {e.strerror}") \
                    from None
            self._thread("metrics", metrics.serve)
            log.info("metrics at http://%s:%d/metrics", host, port)
        self.state = "online"
        log.info("online: model %s, %s", self.model_id,
                 f"blocks {self.blocks[0]}:{self.blocks[1]}" if self.blocks else "gateway only")

    def _free_memory_bytes(self) -> int:
        """Free memory on the serving device: the GPU's, or the machine's for CPU."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return psutil.virtual_memory().available

    def _blocks_that_fit(self, speed: BlockSpeed) -> int:
        usable = int(self._free_memory_bytes() * 0.9)
        cache = self.config.serve.cache.max_bytes or int(usable * AUTO_CACHE_SHARE)
        n = blocks_that_fit(usable, speed.block_bytes, cache, self.num_layers)
        log.info("%d of %d blocks fit (%.1f MiB each, %.1f GiB usable, %.1f GiB for the KV cache)", n,
                 self.num_layers, speed.block_bytes / 2**20, usable / 2**30, cache / 2**30)
        return n

    # --- what the balancer asks of the daemon (balancer.SpanHost) ---------------------------------
    def announce_blocks(self, blocks: tuple[int, int]) -> None:
        self.blocks = blocks
        self.membership.round()

    def serving(self, span: Span) -> None:
        """Also after a span held beside it was added or let go: the record says so at once."""
        self.span, self.blocks = span, (span.start, span.end)
        self.membership.round()

    def load_span(self, start: int, end: int) -> Span:
        log.info("loading blocks %d:%d of %s on %s as %s%s%s", start, end, self.checkpoint.dir, self.device,
                 str(self.dtype).removeprefix("torch."),
                 f", {self.quant} weights" if self.quant != "none" else "",
                 ", int8 KV cache" if self.kv_int8 else "")

        def progress(done: int, total: int) -> None:
            self.loaded_blocks = done
            log.info("loaded block %d/%d", done, total)
            if self.state == "loading":  # starting: before READY=1, what systemctl status shows
                notify(f"STATUS=loading blocks {start}:{end} of {self.model_id}: {done} of {total} loaded")

        return Span(self.checkpoint, start, end, self.device, self.dtype, quant=self.quant,
                    kv_int8=self.kv_int8, cuda_graphs=self.config.serve.cuda_graphs).load(progress)

    def _start_mdns(self) -> None:
        self.mdns = Mdns(self.config.discovery.mdns_interfaces, self.identity.public_key, self.model_id,
                         lambda address, key, model: self.membership.add_hint(address, key, "mdns"))
        try:
            self.mdns.start()
        except OSError as e:  # no multicast on this machine: seeds still work
            log.error("mDNS could not start (%s); peers come from discovery.seeds only", e)
            self.mdns = None

    def _start_access(self) -> None:
        """The ZAP handler must be up before the peer plane binds: no handshake goes unchecked."""
        self.access.start(self.zctx)

    def _bind_peer_plane(self) -> None:
        """Bind the peer plane before loading: gossip (and the span this server announces) flows
        from the start; requests for blocks are refused until `_load_and_serve` attaches the span."""
        s, n = self.config.serve, self.config.network
        self.server = SpanServer(self.zctx, None, CacheBudget(0), self.model_id, max_length=s.max_length,
                                 max_batch=s.max_batch, idle_timeout_s=s.session_idle_timeout_s,
                                 max_message_bytes=self.config.network.max_message_bytes, identity=self.identity,
                                 access=self.access, resolve_key=self.membership.key_for, limits=s.limits,
                                 resolve_protocol=self.table.protocol_for,
                                 on_gossip=self.membership.on_gossip, drain_timeout_s=s.drain_timeout_s,
                                 adapter_dirs=dict(s.adapters), relay=RelayService(
                                     n.relay, n.relay_max_bytes_per_s, n.relay_max_servers,
                                     vouch=self._needs_relay),
                                 batch_window_s=s.batch_window_s)
        failpoints.install(self.server, os.environ.get("SWARMD_FAILPOINTS", ""))
        try:
            bound = self.server.bind(self.config.network.listen)
        except zmq.ZMQError as e:
            raise ConfigError(f"{self.config.path}: network.listen: cannot bind {self.config.network.listen}: {e}") \
                from None
        self.addresses = list(self.config.network.announce) or _connectable(bound)
        self.address = self.addresses[0]
        self.bound = bound
        host_port = split_address(bound)
        if host_port is not None:
            try:
                responder = KeyResponder(host_port[0], host_port[1], self.identity.public_key)
                self._thread("keyquery", responder.serve)
            except OSError as e:  # peers then need this node's key in their seed lists
                log.warning("key query: cannot bind UDP %s:%d (%s); seeds must list this node's key",
                            host_port[0], host_port[1], e.strerror)
        self._thread("peer", self.server.serve)
        log.info("peer plane on %s (gossip only until blocks are loaded)", bound)
        self.reach = Reachability(pool=self.pool, table=self.table, own_id=self.identity.public_key,
                                  address=self.address, server=self.server)
        self._thread("reach", self._check_reach)

    def _needs_relay(self, key: str) -> bool:
        """As a relay: whether the table holds a signed record of `key` saying it is a server
        that may need relaying (it serves blocks and was not found reachable): such a key ranks
        above one that only registers (swarmd/transport/relay_slots.py)."""
        e = self.table.get(key)
        return (e is not None and e.record.span is not None and e.record.reachable != "yes"
                and e.record.state != "offline")

    def _check_reach(self, stop: threading.Event) -> None:
        assert self.reach is not None
        while not stop.is_set():
            try:
                self.reach.tick()
            except Exception:
                log.exception("reachability check failed")
            stop.wait(1.0)

    def coverage(self) -> list[dict]:
        with self._coverage_lock:
            return coverage(self.table, self.model_id, self.num_layers, self._uncovered_since)

    def _watch_coverage(self, stop: threading.Event) -> None:
        """Look at the model's coverage every second, so that a gap's age counts from when it
        began (not from the first `swarmctl status` that saw it), and say in the log when a gap
        opens or closes and when some blocks have one server only: with fixed spans that do not
        overlap, losing any server stops every request, and nothing else would say so."""
        said_gaps: set[tuple[int, int]] = set()
        said_single: tuple = ()
        while not stop.wait(COVERAGE_WATCH_S):
            try:
                cov = self.coverage()[0]  # this daemon's own model comes first
                if self.state != "online" or time.time() - self.started < COVERAGE_SETTLE_S:
                    continue  # the table is still filling: what it lacks now is not news
                gaps = {(m["blocks"][0], m["blocks"][1]) for m in cov["missing"]}
                for a, b in sorted(gaps - said_gaps):
                    log.warning("no server holds blocks %d:%d of %s: requests wait for one (their route timeout, "
                                "60 s by default), then fail", a, b, self.model_id)
                for a, b in sorted(said_gaps - gaps):
                    log.info("blocks %d:%d of %s are served again", a, b, self.model_id)
                single = tuple((tuple(x["blocks"]), x["server"]) for x in cov["single"])
                if single and single != said_single:
                    log.warning("%s of %s %s one server only: if it stops, requests wait until it is back; "
                                "overlap the spans, use serve.blocks: auto, or run a spare", single_text(cov["single"]),
                                self.model_id, "have" if len(single) > 1 else "has")
                said_gaps, said_single = gaps, single
            except Exception:
                log.exception("coverage watch failed")

    def _load_and_serve(self, start: int, end: int) -> None:
        assert self.server is not None
        span = self.load_span(start, end)
        budget = CacheBudget(self.config.serve.cache.max_bytes or self._auto_cache_bytes())
        self.server.attach(span, budget, self.server.read_adapters(span))
        self.span = span
        self.membership.retry_contacts_now()
        self.membership.round()  # online: routable from now on
        log.info("serving blocks %d:%d on %s (KV cache budget %.1f MiB)", start, end, self.bound,
                 budget.max_bytes / 2**20)

    def _auto_cache_bytes(self) -> int:
        return int(self._free_memory_bytes() * AUTO_CACHE_SHARE)

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
        self.access.stop()
        self.pool.close_all()
        self.zctx.destroy(linger=0)

    def _request_drain(self) -> dict:
        self.drain_requested.set()
        return {"draining": True, "sessions": self.open_sessions()}

    def begin_drain(self) -> None:
        """Publish `draining` and take no new sessions; open ones go on until they end."""
        self.state = "draining"
        if self.server is not None:
            self.server.draining = True
        try:
            self.membership.round()  # tell the swarm now
        except Exception:
            log.exception("publishing draining failed")

    def open_sessions(self) -> int:
        return len(self.server.sessions) if self.server is not None else 0

    def status_line(self) -> str:
        """One line for systemd's STATUS= (what `systemctl status swarmd` shows)."""
        online = sum(1 for p in self.membership.rows() if p["state"] == "online" and not p.get("is_self"))
        what = f"serving blocks {self.blocks[0]}:{self.blocks[1]} of {self.model_id}" if self.blocks else \
            f"gateway for {self.model_id}"
        return (f"{what}; sessions open now: {self.open_sessions()} served here, {len(self.gateway.sessions)} "
                f"from local apps; other peers online: {online}")

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
        gone = self.table.drop(self.access.allows)
        for record in gone:
            log.warning("peer %s removed: its key is no longer in %s", record.short_id, self.access.keys_dir)
        if gone:
            self.gateway.forget_servers({a for r in gone for a in r.addresses})

    # --- what swarmctl status and key show ------------------------------------------------------
    def key_info(self) -> dict:
        return {"public_key": self.identity.public_key, "node_id": self.identity.short_id,
                "path": f"{self.config.state_dir}/node.pub"}

    def status(self) -> dict:
        server_info = self.server.info() if self.server else None
        budget = self.server.budget if self.server else None
        span = self.span
        per_token = span.cache_bytes(span.start, span.end, 1, 1) if span else 0
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "state": self.state,
            "uptime_s": round(time.time() - self.started, 1),
            "node_id": self.identity.public_key,
            "short_id": self.identity.short_id,  # the form logs, peers and status lines use
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
                # while trading places: the span served beside `blocks` until others cover it
                "also": [self.server.also.start, self.server.also.end] if self.server and self.server.also else None,
                "capacity": self.capacity,
                "auto": self.auto,
                "moving": self.balancer.moving,
                "moves": self.balancer.moves,
                "last_move": self.balancer.last_move,
                "draining": [[sp.start, sp.end] for sp, _ in self.server.old_spans] if self.server else [],
                "block_speed": vars(self.speed).copy() if self.speed else None,
                "loaded_blocks": self.loaded_blocks,
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "quant": self.quant,
                "weight_bytes": self.span.weight_bytes() if self.span else None,
                # on CUDA: sessions whose decode steps were captured, or why graphs are off
                "cuda_graphs": ({"captured": span.graphs.captured, "held": len(span.graphs.graphs),
                                 "off": span.graphs.off} if span is not None and span.graphs is not None else None),
            },
            "sessions": {
                "server": server_info["sessions"] if server_info else 0,
                "gateway": len(self.gateway.sessions),
            },
            "cache": {
                "kv_dtype": "int8" if self.kv_int8 else str(self.dtype).removeprefix("torch."),
                "max_bytes": budget.max_bytes if budget else 0,
                "used_bytes": budget.used_bytes if budget else 0,
                "free_bytes": budget.free_bytes if budget else 0,
                # positions of one sequence through every block served here that the budget holds
                "bytes_per_token": per_token,
                "capacity_tokens": budget.max_bytes // per_token if budget and per_token else 0,
                "free_tokens": budget.free_bytes // per_token if budget and per_token else 0,
            },
            "stats": {**vars(self.server.stats), "shed": self.server.compute.shed,
                      "queued": self.server.compute.queued(),
                      "limited": self.server.key_limits.refused + self.server.compute.refused}
            if self.server else {},
            "peer_plane": {  # what other peers hold here: bounded, whatever they send
                "pushes_waiting": self.server.early.count if self.server else 0,
                # their tensors (charged to the cache budget), and pushes dropped for a bound
                "pushes_waiting_bytes": self.server.early.nbytes if self.server else 0,
                "pushes_refused": self.server.early.refused if self.server else 0,
                # gossip answered empty: gossip's share of the serving thread's time was spent
                "gossip_answered_empty": self.server.gossip_time.short if self.server else 0,
                "steps_waiting": len(self.server.pending) if self.server else 0,
                "push_connections": self.server.peers.count() if self.server else 0,
                # training passes' activations awaiting their backward (charged to the cache budget)
                "kept_passes": len(self.server.passes.kept) if self.server else 0,
                "kept_passes_bytes": self.server.passes.kept.nbytes if self.server else 0,
                "kept_passes_used": self.server.passes.kept.used if self.server else 0,
                "kept_passes_dropped": self.server.passes.kept.dropped if self.server else 0,
                # forwards whose pass did not fit (larger than a key's share, or sessions hold the room)
                "kept_passes_refused": self.server.passes.kept.refused if self.server else 0,
            },
            "network": {
                "reachable": self.reach.state if self.reach else "unknown",
                "via": [{"node_id": rid, "address": a} for rid, a in self.server.relays_up] if self.server else [],
                "relay": self.server.relay.info() if self.server else {"enabled": False},
            },
            "gateway": {
                "sessions": len(self.gateway.sessions),
                "failovers": self.gateway.failovers,
                "resends": self.gateway.resends,
                "last_failover": self.gateway.last_failover,
                "banned": sorted(self.gateway.router.bans.banned()),
                "kept_passes": len(self.gateway.training.kept),
                "kept_bytes": self.gateway.training.kept.nbytes,
                "limited": self.local.refused,
                "verify": self.gateway.checks.status(),
            },
            "membership": {
                "access": self.access.mode,
                "allowed_keys": len(self.access.allowed) if self.access.private else None,
                "refused_handshakes": self.access.refusals,
                "rejected_records": self.membership.rejected,
                "mdns": self.mdns is not None,
                "seeds": len(self.config.discovery.seeds),
            },
            "coverage": self.coverage(),
            "peers": self.gateway.router.annotate(self.membership.rows()),
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
    return torch.float32  # on a CPU: or bfloat16, where it computes it natively and faster (auto_cpu_dtype)


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


def _in_thread(fn) -> None:
    threading.Thread(target=fn, name="move", daemon=True).start()
