"""Bounds on what a peer can make a daemon do: log lines, connections."""

import logging
import os
import time

import pytest
import zmq

from swarmd.identity import NodeIdentity
from swarmd.logs import RateLimitedLog
from swarmd.transport.connection import ConnectionPool, peer_context


class Clock:
    t = 100.0

    def __call__(self):
        return self.t


def test_refusals_log_once_per_key_and_interval_counting_the_rest(caplog):
    clock = Clock()
    quiet = RateLimitedLog(logging.getLogger("test.quiet"), 10.0, clock)
    with caplog.at_level(logging.INFO, "test.quiet"):
        logged = [quiet.info(("peer-a", "garbage"), "refused %s", i) for i in range(1000)]
        quiet.info(("peer-b", "garbage"), "refused b")
        clock.t += 10.5
        quiet.info(("peer-a", "garbage"), "refused again")
    assert logged.count(True) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused 0", "refused b", "refused again (999 more like it in the last 10 s not logged)"]


def test_a_bounded_pool_closes_the_least_recently_used_connection():
    ctx = zmq.Context()
    me = NodeIdentity(os.urandom(32))
    keys = {f"tcp://127.0.0.1:{p}": NodeIdentity(os.urandom(32)).public_key for p in range(2, 7)}
    pool = ConnectionPool(ctx, me, keys.get, max_connections=3)
    try:
        addresses = list(keys)
        first, second, third = (pool.get(a) for a in addresses[:3])
        assert pool.get(addresses[0]) is first  # used again: now the most recent
        pool.get(addresses[3])  # evicts addresses[1], the least recently used
        assert pool.count() == 3
        assert pool.get(addresses[0]) is first and pool.get(addresses[3]) is not None
        assert pool.get(addresses[1]) is not second  # it was closed: a new one (evicting addresses[2])
        assert pool.count() == 3 and pool.get(addresses[0]) is first
    finally:
        pool.close_all()
        ctx.term()


def test_the_daemons_pool_reaches_a_thousand_peers_and_running_out_of_sockets_is_a_peer_failure():
    """A connection holds three ZeroMQ sockets, and a context 1023 by default: an unbounded
    pool failed with a raw ZMQError at its 341st peer (every gossip round after it failed). The
    daemon's pool keeps PEER_CONNECTIONS_PER_THREAD; a context out of sockets anyway makes the
    peer unavailable, which callers route around."""
    import pytest

    from libswarm.errors import PeerUnavailableError
    from swarmd.daemon import PEER_CONNECTIONS_PER_THREAD
    from swarmd.discovery.membership import MAX_CONTACTS_PER_ROUND

    assert PEER_CONNECTIONS_PER_THREAD >= 2 * MAX_CONTACTS_PER_ROUND  # a round's connections are never evicted
    ctx = peer_context()  # as the daemon's
    me = NodeIdentity(os.urandom(32))
    keys = {f"tcp://127.0.0.1:{p}": NodeIdentity(os.urandom(32)).public_key for p in range(20001, 21001)}
    pool = ConnectionPool(ctx, me, keys.get, max_connections=PEER_CONNECTIONS_PER_THREAD)
    try:
        for a in keys:
            pool.get(a)
        assert pool.count() == PEER_CONNECTIONS_PER_THREAD
    finally:
        pool.close_all()
        ctx.term()
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 10)  # room for three connections
    pool = ConnectionPool(ctx, me, keys.get)
    try:
        addresses = list(keys)
        for a in addresses[:3]:
            pool.get(a)
        with pytest.raises(PeerUnavailableError, match="no connection can be opened now"):
            pool.get(addresses[3])
        pool.drop(addresses[0])  # closing one makes room again, once ZeroMQ has reaped its sockets
        deadline = time.monotonic() + 10
        while True:
            try:
                assert pool.get(addresses[3]) is not None
                break
            except PeerUnavailableError:
                assert time.monotonic() < deadline, "no room after a connection was closed"
                time.sleep(0.05)
    finally:
        pool.close_all()
        ctx.term()


def test_a_key_gets_its_rate_with_a_burst_and_no_more():
    import pytest

    from libswarm.errors import LimitError
    from swarmd.config import LimitsConfig
    from swarmd.peer.limits import BURST_S, KeyLimits

    clock = Clock()
    limits = KeyLimits(LimitsConfig(sessions_per_key=2, cache_share_per_key=0.5, requests_per_s_per_key=100), clock)
    for _ in range(int(100 * BURST_S)):
        limits.admit_request("a")
    with pytest.raises(LimitError, match="at most 100 a second"):
        limits.admit_request("a")
    limits.admit_request("b")  # another key is not starved
    clock.t += 0.5
    for _ in range(50):  # half a second refills half a second's worth
        limits.admit_request("a")
    with pytest.raises(LimitError):
        limits.admit_request("a")


def test_a_key_holds_at_most_its_sessions_and_its_share_of_the_cache():
    import pytest

    from libswarm.errors import LimitError
    from swarmd.config import LimitsConfig
    from swarmd.peer.limits import KeyLimits

    limits = KeyLimits(LimitsConfig(sessions_per_key=2, cache_share_per_key=0.5, requests_per_s_per_key=100))
    limits.admit_session("a", [10], 30, budget_bytes=100)
    with pytest.raises(LimitError, match="share of"):
        limits.admit_session("a", [25], 30, budget_bytes=100)
    with pytest.raises(LimitError, match="sessions_per_key"):
        limits.admit_session("a", [1, 1], 1, budget_bytes=100)


def test_a_server_bound_before_its_span_is_loaded_answers_gossip_and_ping_only(model_dirs):
    """Joining: the peer plane is up (the swarm must see the span it announces), but nothing
    that needs blocks is served until the span is attached."""
    import threading

    import torch

    from libswarm.checkpoint import Checkpoint
    from libswarm.protocol import decode, encode
    from swarmd.config import LimitsConfig
    from swarmd.peer.server import SpanServer
    from swarmd.runtime.cache import CacheBudget
    from swarmd.runtime.span import Span
    from swarmd.transport.access import AccessControl

    ctx, me, client = zmq.Context(), NodeIdentity(os.urandom(32)), NodeIdentity(os.urandom(32))
    server = SpanServer(ctx, None, CacheBudget(0), "m", max_length=64, max_batch=1, idle_timeout_s=60,
                        max_message_bytes=2**24, identity=me, access=AccessControl("open", "", me.public_key),
                        resolve_key=lambda a: None, limits=LimitsConfig(16, 0.5, 1000),
                        on_gossip=lambda msg, sender: ({"records": [], "beats": []}, None))
    address = server.bind("tcp://127.0.0.1:*")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_secretkey, s.curve_publickey = client.secret_key.encode(), client.public_key.encode()
    s.curve_serverkey = me.public_key.encode()
    s.connect(address)

    def ask(msg_type: str, req_id: int, fields: dict | None = None):
        s.send_multipart(encode(msg_type, req_id, fields or {}))
        assert s.poll(5000)
        return decode(s.recv_multipart())

    try:
        assert ask("ping", 1).type == "ok"
        assert ask("gossip", 2).type == "ok"
        assert ask("info", 3).fields["code"] == "protocol"  # no such message: the status has what it said
        assert server.info()["span"] is None
        refused = ask("open", 4, {"model_id": "m", "blocks": [0, 1], "max_length": 8, "batch": 1})
        assert refused.type == "error" and refused.fields["code"] == "moved"  # gateways route around it
        assert "still joining" in refused.fields["message"]
        span = Span(Checkpoint(model_dirs("llama", layers=2)), 0, 2, torch.device("cpu"), torch.float32).load()
        server.attach(span, CacheBudget(2**24), {})
        assert server.info()["span"] == [0, 2]
        assert ask("open", 6, {"model_id": "m", "blocks": [0, 1], "max_length": 8, "batch": 1}).type == "ok"
    finally:
        stop.set()
        thread.join(5)
        s.close()
        ctx.term()



def test_line_budget_caps_each_key_and_all_keys_per_window():
    from swarmd.logs import LineBudget

    now = [0.0]
    b = LineBudget(2, 10.0, 3, clock=lambda: now[0])
    assert [b.take("a"), b.take("a"), b.take("a")] == [True, True, False]  # 2 per key
    assert [b.take("b"), b.take("c")] == [True, False]  # 3 in all
    now[0] = 10.0  # a new window
    assert [b.take("a"), b.take("c")] == [True, True]


def test_an_address_zeromq_cannot_connect_to_is_a_peer_unavailable_error():
    """A record, seed or mDNS answer naming such an address fails that contact alone (ZeroMQ's
    own error used to escape a gossip round and end it)."""
    import pytest

    from libswarm.errors import PeerUnavailableError

    ctx, me = zmq.Context(), NodeIdentity(os.urandom(32))
    pool = ConnectionPool(ctx, me, resolve_key=lambda a: None)
    try:
        with pytest.raises(PeerUnavailableError, match="cannot connect there"):
            pool.get("tcp://x y:1", NodeIdentity(os.urandom(32)).public_key)
        assert pool.count() == 0
    finally:
        pool.close_all()
        ctx.term()


def _curve_router(ctx: zmq.Context, identity: NodeIdentity) -> tuple[zmq.Socket, int]:
    """A bare CURVE server socket on loopback, standing for a peer with `identity`."""
    router = ctx.socket(zmq.ROUTER)
    router.curve_server = True
    router.curve_secretkey = identity.secret_key.encode()
    router.curve_publickey = identity.public_key.encode()
    router.linger = 0
    return router, router.bind_to_random_port("tcp://127.0.0.1")


def test_a_peer_that_sends_replies_nobody_asked_for_pins_no_memory():
    """A peer (a fake seed) answering one request with 100 unrequested 1 MiB replies first:
    the connection keeps none of them, and the real reply still arrives."""
    import threading

    import torch

    from libswarm.protocol import decode, encode
    from swarmd.transport.connection import PeerConnection

    me, peer = NodeIdentity(os.urandom(32)), NodeIdentity(os.urandom(32))
    ctx = zmq.Context()
    router, port = _curve_router(ctx, peer)

    def serve():
        frames = router.recv_multipart()
        msg = decode(frames[1:])
        junk = torch.zeros(1 << 18)  # 1 MiB
        for i in range(100):
            router.send_multipart([frames[0], *encode("ok", msg.id + 1000 + i, {}, {"junk": junk})])
        router.send_multipart([frames[0], *encode("ok", msg.id, {"real": True})])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    conn = PeerConnection(ctx, f"tcp://127.0.0.1:{port}", me, peer.public_key, 8 << 20)
    try:
        reply = conn.request("ping", timeout_s=20)
        assert reply.get("real") is True
        assert conn._stash == {}
    finally:
        conn.close()
        router.close(0)
        ctx.term()


def test_a_reply_that_came_in_time_is_taken_even_when_the_caller_looks_after_its_deadline():
    """The gateway sends a chain's later hops before it waits for the first; a send to a peer
    that is reconnecting can take seconds. The first hop's reply, come meanwhile, is still its
    answer: the hop is not blamed for the gateway's own wait (it was, and a SIGSTOPped server
    then had its healthy predecessors replaced over and over)."""
    import threading

    from libswarm.protocol import decode, encode
    from swarmd.transport.connection import NoAnswerInTime, PeerConnection

    me, peer = NodeIdentity(os.urandom(32)), NodeIdentity(os.urandom(32))
    ctx = zmq.Context()
    router, port = _curve_router(ctx, peer)
    answered = threading.Event()

    def serve():
        frames = router.recv_multipart()
        router.send_multipart([frames[0], *encode("ok", decode(frames[1:]).id, {"real": True})])
        answered.set()  # the second request is never read

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    conn = PeerConnection(ctx, f"tcp://127.0.0.1:{port}", me, peer.public_key, 8 << 20)
    try:
        req_id = conn.send("ping", timeout_s=20)
        assert answered.wait(20)
        time.sleep(0.2)  # the reply is here; the caller comes for it after its deadline
        assert conn.receive(req_id, time.monotonic() - 1.0, "ping").get("real") is True
        server.join(20)  # done with the socket before the next request, which nobody reads
        late = conn.send("ping", timeout_s=20)
        t0 = time.monotonic()
        with pytest.raises(NoAnswerInTime):
            conn.receive(late, time.monotonic() - 1.0, "ping")  # nothing came: no answer, at once
        assert time.monotonic() - t0 < 1.0
    finally:
        conn.close()
        router.close(0)
        ctx.term()


def test_keys_of_one_internet_network_share_one_cache_share_and_private_or_relayed_ones_do_not():
    import pytest

    from libswarm.errors import LimitError
    from swarmd.config import LimitsConfig
    from swarmd.peer.limits import KeyLimits, shared_network

    limits = KeyLimits(LimitsConfig(sessions_per_key=8, cache_share_per_key=0.5, requests_per_s_per_key=100))
    net = shared_network("93.184.216.7", private_swarm=False)
    assert net == "93.184.216.0/24" and shared_network("::ffff:93.184.216.9", False) == net
    for not_shared in (shared_network("10.0.0.7", False), shared_network("127.0.0.1", False),
                       shared_network(None, False), shared_network("93.184.216.7", private_swarm=True)):
        assert not_shared is None
    limits.admit_session("sybil-1", [], 50, budget_bytes=100, network=net, network_held=[])
    with pytest.raises(LimitError, match=r"keys from 93.184.216.0/24 .* the keys of one network share"):
        limits.admit_session("sybil-2", [], 50, budget_bytes=100, network=net, network_held=[50])
    limits.admit_session("elsewhere", [], 50, budget_bytes=100, network="151.101.1.0/24", network_held=[])


def test_opens_alone_do_not_hold_the_cache_past_the_unused_session_timeout(model_dirs):
    """Two keys at a share of 0.5 used to reserve the whole KV cache with `open`s only, for the
    10 minutes of the idle timeout. A session that holds no position (not one step) for
    serve.limits.unused_session_timeout_s is now closed: a third key gets room; a session in
    use keeps its cache."""
    import threading

    import torch

    from libswarm.checkpoint import Checkpoint
    from libswarm.protocol import decode, encode
    from swarmd.config import LimitsConfig
    from swarmd.peer.server import SpanServer
    from swarmd.runtime.cache import CacheBudget
    from swarmd.runtime.span import Span
    from swarmd.transport.access import AccessControl

    ctx, me = zmq.Context(), NodeIdentity(os.urandom(32))
    span = Span(Checkpoint(model_dirs("llama", layers=2)), 0, 2, torch.device("cpu"), torch.float32).load()
    one = span.cache_bytes(0, 2, 1, 8)
    access = AccessControl("open", "", me.public_key)
    access.start(ctx)  # the ZAP handler: each peer's key is then its own
    server = SpanServer(ctx, span, CacheBudget(2 * one), "m", max_length=8, max_batch=1, idle_timeout_s=600,
                        max_message_bytes=2**24, identity=me, access=access,
                        resolve_key=lambda a: None,
                        limits=LimitsConfig(16, 0.5, 1000, unused_session_timeout_s=1.0))
    address = server.bind("tcp://127.0.0.1:*")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    socks = []

    def peer():
        client = NodeIdentity(os.urandom(32))
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.curve_secretkey, s.curve_publickey = client.secret_key.encode(), client.public_key.encode()
        s.curve_serverkey = me.public_key.encode()
        s.connect(address)
        socks.append(s)

        def ask(msg_type: str, fields: dict, tensors: dict | None = None):
            s.send_multipart(encode(msg_type, 1, fields, tensors))
            assert s.poll(5000)
            return decode(s.recv_multipart())
        return ask

    opening = {"model_id": "m", "blocks": [0, 2], "max_length": 8, "batch": 1}
    try:
        stepping, squatter, late = peer(), peer(), peer()
        used = stepping("open", opening).fields["session"]
        second = squatter("open", opening)
        assert second.type == "ok", second.fields
        refused = late("open", opening)
        assert refused.fields["code"] == "cache_full"  # the two keys hold it all
        x = {"hidden": torch.zeros(1, 1, span.hidden_size)}
        assert stepping("step", {"session": used, "step": 0}, x).fields["position"] == 1
        t0 = time.monotonic()
        while late("open", opening).type != "ok":
            assert time.monotonic() - t0 < 10, "the unused session still holds its cache"
            time.sleep(0.2)
        assert time.monotonic() - t0 >= 0.5  # not before its timeout
        assert stepping("step", {"session": used, "step": 1}, x).fields["position"] == 2  # kept
    finally:
        stop.set()
        thread.join(5)
        for s in socks:
            s.close()
        access.stop()
        ctx.term()


def test_gossip_takes_its_share_of_the_serving_thread_and_is_answered_empty_beyond():
    from swarmd.peer.limits import GossipTime

    now = [0.0]
    share = GossipTime(share=0.05, burst_s=0.1, clock=lambda: now[0])
    spent = 0
    while share.available():
        share.spend(0.02)  # requests of 20 ms each
        spent += 1
    assert spent == 5  # the burst
    now[0] += 1.0  # a second refills 50 ms: two and a half requests' worth
    assert share.available()
    share.spend(0.02)
    share.spend(0.02)
    assert share.available()  # 10 ms left
    share.spend(0.02)
    assert not share.available()


def test_a_gossip_flood_from_many_keys_does_not_hold_back_decode_steps(model_dirs):
    """Issue 38, finding 10. Gossip that costs 20 ms a request (anti-entropy against a large
    table, records to check), 10 requests from each of 50 keys, each key within its own rate:
    before, a decode step sent behind them waited for all of them (10 s here). Gossip now
    takes at most its share of the serving thread's time, and beyond that is answered empty
    at once: no step of ten waits more than a second (0.2 s on the 2-core sandbox)."""
    import threading

    import torch

    from libswarm.checkpoint import Checkpoint
    from libswarm.protocol import decode, encode
    from swarmd.config import LimitsConfig
    from swarmd.peer.server import SpanServer
    from swarmd.runtime.cache import CacheBudget
    from swarmd.runtime.span import Span
    from swarmd.transport.access import AccessControl

    def costly_gossip(msg, sender):
        time.sleep(0.02)  # the serving thread is held as by computation
        return {"records": []}, None

    ctx, me = zmq.Context(), NodeIdentity(os.urandom(32))
    span = Span(Checkpoint(model_dirs("llama", layers=2)), 0, 2, torch.device("cpu"), torch.float32).load()
    server = SpanServer(ctx, span, CacheBudget(2**24), "m", max_length=64, max_batch=1, idle_timeout_s=60,
                        max_message_bytes=2**24, identity=me, access=AccessControl("open", "", me.public_key),
                        resolve_key=lambda a: None, limits=LimitsConfig(16, 0.5, 5000), on_gossip=costly_gossip)
    address = server.bind("tcp://127.0.0.1:*")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()

    def dealer() -> zmq.Socket:
        ident = NodeIdentity(os.urandom(32))
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.curve_secretkey, s.curve_publickey = ident.secret_key.encode(), ident.public_key.encode()
        s.curve_serverkey = me.public_key.encode()
        s.connect(address)
        return s

    def ask(s: zmq.Socket, msg_type: str, req_id: int, fields: dict, tensors: dict | None = None):
        s.send_multipart(encode(msg_type, req_id, fields, tensors))
        assert s.poll(30_000), f"no answer to {msg_type}"
        return decode(s.recv_multipart())

    gateway, flood = dealer(), [dealer() for _ in range(50)]
    try:
        for s in flood:
            assert ask(s, "ping", 1, {}).type == "ok"  # connected: the flood starts at once
        sid = ask(gateway, "open", 1, {"model_id": "m", "blocks": [0, 2], "max_length": 16, "batch": 1}).get("session")
        for s in flood:
            for i in range(10):  # within a key's own gossip rate (bursts of 20)
                s.send_multipart(encode("gossip", 10 + i, {"news": []}))
        slowest_s = 0.0
        for step in range(10):
            t0 = time.monotonic()
            reply = ask(gateway, "step", 2 + step, {"session": sid, "step": step}, {"hidden": torch.randn(1, 1, 64)})
            assert reply.type == "ok" and reply.get("position") == step + 1, reply.fields
            slowest_s = max(slowest_s, time.monotonic() - t0)
        assert slowest_s < 1.0, f"a decode step waited {slowest_s:.2f} s behind gossip"
        assert server.gossip_time.short > 0
    finally:
        stop.set()
        thread.join(5)
        for s in [gateway, *flood]:
            s.close()
        ctx.term()
