"""The parts of relaying that need no daemon: the seal, relayed addresses, a relay's limits,
records naming relays, and routing's cost of the extra hop."""

import contextlib
import os
import struct
import time

import pytest
import torch

from libswarm.errors import LimitError, PeerUnavailableError, ProtocolError
from libswarm.protocol import Message, decode, encode
from swarmd.discovery.records import Record, decode_record
from swarmd.discovery.table import PeerTable
from swarmd.identity import NodeIdentity
from swarmd.routing import ServerSpan, plan_chain
from swarmd.transport import relay
from swarmd.transport.relay import RelayService, Sealer, relayed_address, split_relayed


def ident() -> NodeIdentity:
    return NodeIdentity(os.urandom(32))


def test_a_seal_opens_only_for_its_receiver_once_unaltered_and_hides_the_message():
    a, b, c = ident(), ident(), ident()
    hidden = torch.randn(1, 4, 64)
    frames = encode("step", 9, {"session": "s1"}, {"hidden": hidden})
    sealed = Sealer(a).seal(b.public_key, frames)
    assert b'"session"' not in sealed and hidden.numpy().tobytes()[:16] not in sealed
    opener = Sealer(b)
    msg = decode(opener.open(a.public_key, sealed))
    assert msg.type == "step" and msg.get("session") == "s1" and torch.equal(msg.tensors["hidden"], hidden)
    with pytest.raises(ProtocolError, match="a replay"):
        opener.open(a.public_key, sealed)
    tampered = bytearray(Sealer(a).seal(b.public_key, frames))
    tampered[40] ^= 1
    with pytest.raises(ProtocolError, match="fails authentication"):
        opener.open(a.public_key, bytes(tampered))
    with pytest.raises(ProtocolError, match="fails authentication"):  # claimed to be from another node
        opener.open(c.public_key, Sealer(a).seal(b.public_key, frames))
    with pytest.raises(ProtocolError, match="fails authentication"):  # sealed to another node
        Sealer(c).open(a.public_key, Sealer(a).seal(b.public_key, frames))
    own = Sealer(a)
    with pytest.raises(ProtocolError, match="fails authentication"):  # turned back to its sender
        own.open(b.public_key, own.seal(b.public_key, frames))
    old = Sealer(a, clock=lambda: time.time() - 2 * relay.REPLAY_WINDOW_S).seal(b.public_key, frames)
    with pytest.raises(ProtocolError, match="off this node's clock"):
        opener.open(a.public_key, old)
    for junk in (b"", b"x" * 30, os.urandom(200)):
        with pytest.raises(ProtocolError):
            opener.open(a.public_key, junk)


def test_packed_frames_with_sizes_that_do_not_add_up_are_refused():
    blob = relay.pack([b"ab", b"cde"])
    assert [bytes(f) for f in relay.unpack(memoryview(blob))] == [b"ab", b"cde"]
    for bad in (blob[:-1], struct.pack("<I", 0), struct.pack("<IQ", 1, 2**60) + b"x", b"\x01"):
        with pytest.raises(ProtocolError):
            relay.unpack(memoryview(bad))


def test_relayed_addresses_round_trip_and_nothing_else_parses_as_one():
    node = ident().public_key
    address = relayed_address("tcp://10.0.0.1:31330", node)
    assert split_relayed(address) == ("tcp://10.0.0.1:31330", node)
    for junk in ("tcp://10.0.0.1:31330", "relay+", f"relay+udp://x:1/{node}", "relay+tcp://x:1/" + "a" * 39,
                 f"relay+tcp://x:1{node}"):
        assert split_relayed(junk) is None


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_a_relay_refuses_beyond_its_limits_and_forgets_lapsed_servers():
    clock = Clock()
    r = RelayService(True, max_bytes_per_s=10_000, max_servers=2, clock=clock)
    s1, s2, s3, client = (ident().public_key for _ in range(4))
    r.register(s1, b"i1")
    r.register(s2, b"i2")
    with pytest.raises(LimitError, match="relay_max_servers"):
        r.register(s3, b"i3")
    r.register(s1, b"i1")  # a renewal is not a new server
    target, outer = r.route(client, s1, b"c", 6_000, 7)
    assert target == b"i1"
    assert r.route(s2, client, b"i2", 500, outer) is None  # s2 was asked nothing: dropped
    assert r.route(s1, client, b"i1", 500, outer) == (b"c", 7)  # its answer goes back to the client
    assert r.route(s1, client, b"i1", 500, outer) is None  # once
    with pytest.raises(PeerUnavailableError, match="relay_max_bytes_per_s"):
        r.route(client, s1, b"c", 6_000, 8)
    clock.t += 1.0  # a second later the budget is back
    assert r.route(client, s1, b"c", 6_000, 8)[0] == b"i1"
    with pytest.raises(PeerUnavailableError, match="not relayed here"):
        r.route(client, s3, b"c", 10)
    clock.t += relay.EXPIRE_S + 1  # no renewal: forgotten, and its room is free
    orphans = r.expire()  # the request forwarded and never answered: its client is told now
    assert [(p.ident, p.req_id, p.server) for p in orphans] == [(b"c", 8, s1)] and not r.pending
    with pytest.raises(PeerUnavailableError, match="not relayed here"):
        r.route(client, s1, b"c", 10)
    r.register(s3, b"i3")
    off = RelayService(False, 1, 1)
    with pytest.raises(ProtocolError, match="does not relay"):
        off.register(s1, b"i1")
    with pytest.raises(PeerUnavailableError, match="does not relay"):
        off.route(client, s1, b"c", 10)


def test_answers_go_to_the_connection_that_asked_not_the_keys_latest():
    """One client key, two connections (two threads' pools) whose request ids overlap: each
    answer goes back to its own connection under its own id; an answer nobody asked for, or
    one naming another client, is dropped and spends nothing."""
    clock = Clock()
    r = RelayService(True, max_bytes_per_s=10_000, max_servers=4, clock=clock)
    server, client, other = (ident().public_key for _ in range(3))
    r.register(server, b"srv")
    _, out_a = r.route(client, server, b"conn-a", 100, 5)
    _, out_b = r.route(client, server, b"conn-b", 100, 5)  # the same id on another connection
    assert out_a != out_b
    assert r.route(server, client, b"srv", 100, out_b) == (b"conn-b", 5)
    assert r.route(server, client, b"srv", 100, out_a) == (b"conn-a", 5)
    _, out_c = r.route(client, server, b"conn-a", 100, 6)
    spent = r.forwarded_bytes
    assert r.route(server, other, b"srv", 10**6, out_c) is None  # not the client that asked
    assert r.route(server, client, b"srv", 10**6, 123456) is None  # no such request
    assert r.forwarded_bytes == spent  # unsolicited answers cost the shared budget nothing
    assert r.route(server, client, b"srv", 100, out_c) == (b"conn-a", 6)
    # a server before 1.5 answers under the client's own id: still delivered, once
    _, out_d = r.route(client, server, b"conn-b", 100, 9)
    assert r.route(server, client, b"srv", 100, 9) == (b"conn-b", 9)
    assert r.route(server, client, b"srv", 100, out_d) is None and r.pending == {} and r._by_client_id == {}


def test_a_record_naming_relays_is_reached_through_them_and_costs_a_hop_more():
    i, r1 = ident(), ident()
    rec = Record(node_id=i.public_key, sign_key=i.sign_key, addresses=("tcp://10.0.0.9:31330",), state="online",
                 timestamp=time.time(), seq=1, model_id="m", span=(0, 2), throughput=10.0, reachable="no",
                 via=((r1.public_key, "tcp://10.0.0.1:31330"),))
    back = decode_record(rec.sign(i))
    assert back.via == rec.via and back.reachable == "no"
    assert back.contact_addresses == (relayed_address("tcp://10.0.0.1:31330", i.public_key),)
    table = PeerTable()
    via = back.contact_addresses[0]
    table.merge(back, rec.sign(i), via=via)
    assert table.key_for(via) == i.public_key and table.get(i.public_key).verified
    [span] = table.servers_for("m")
    assert span.address == via and span.relayed
    direct = ServerSpan("tcp://10.0.0.2:31330", 0, 2)
    assert plan_chain([span, direct], 2, "m")[0].address == direct.address
    assert plan_chain([span], 2, "m")[0].address == via


def test_the_clients_of_a_relayed_server_spread_over_its_relays_each_keeping_its_pick():
    """Issue 42: every daemon took a relayed server's first relay. Each now picks one by a hash
    of its own id and the server's: over many clients both relays carry a share, and a client's
    pick holds across the server's later records while that relay stays listed."""
    i, r1, r2 = ident(), ident(), ident()
    via = ((r1.public_key, "tcp://10.0.0.1:31330"), (r2.public_key, "tcp://10.0.0.2:31330"))
    rec = Record(node_id=i.public_key, sign_key=i.sign_key, addresses=("tcp://10.0.0.9:31330",), state="online",
                 timestamp=time.time(), seq=1, model_id="m", span=(0, 2), throughput=10.0, reachable="no", via=via)
    tables = [PeerTable(own_id=ident().public_key) for _ in range(40)]
    picks = []
    for t in tables:
        t.merge(rec, rec.sign(i))
        picks.append(t.get(i.public_key).address)
    assert set(picks) == set(rec.contact_addresses)
    assert 8 <= picks.count(rec.contact_addresses[0]) <= 32
    newer = Record(**{**rec.__dict__, "seq": 2, "throughput": 11.0})
    for t, pick in zip(tables, picks):
        t.merge(newer, newer.sign(i))
        assert t.get(i.public_key).address == pick
    alone = Record(**{**rec.__dict__, "seq": 3, "via": via[1:]})  # r1 lost: its clients move to r2
    for t in tables:
        t.merge(alone, alone.sign(i))
        assert t.get(i.public_key).address == alone.contact_addresses[0]


def test_seals_older_than_the_nonces_remembered_are_refused(monkeypatch):
    """When the nonce cache is full, forgetting a nonce raises the floor: the forgotten seal
    cannot come back as a replay."""
    monkeypatch.setattr(relay, "MAX_NONCES", 3)
    a, b = ident(), ident()
    clock = Clock()
    sender, opener = Sealer(a, clock=clock), Sealer(b, clock=clock)
    seals = []
    for _ in range(5):
        clock.t += 1
        seals.append(sender.seal(b.public_key, [b"x"]))
        opener.open(a.public_key, seals[-1])
    with pytest.raises(ProtocolError, match="older than the seals remembered"):
        opener.open(a.public_key, seals[0])
    with pytest.raises(ProtocolError, match="a replay"):
        opener.open(a.public_key, seals[-1])


def test_one_sender_filling_the_replay_cache_shuts_out_only_itself(monkeypatch):
    """Security review 7: one seal stamped far ahead, then enough cheap seals to push it out of
    the cache, raised the one floor for everyone: every honest client of the relayed server was
    refused for ~10 minutes. Floors are per sender now."""
    monkeypatch.setattr(relay, "MAX_NONCES", 3)
    attacker, honest, server = ident(), ident(), ident()
    clock = Clock()
    opener = Sealer(server, clock=clock)
    ahead = Clock()
    ahead.t = clock.t + relay.REPLAY_WINDOW_S - 1
    opener.open(attacker.public_key, Sealer(attacker, clock=ahead).seal(server.public_key, [b"x"]))
    flood = Sealer(attacker, clock=clock)
    for _ in range(10):
        with contextlib.suppress(ProtocolError):  # it shuts itself out on the way
            opener.open(attacker.public_key, flood.seal(server.public_key, [b"x"]))
    assert opener.open(honest.public_key, Sealer(honest, clock=clock).seal(server.public_key, [b"hi"])) == [b"hi"]
    with pytest.raises(ProtocolError, match="older than the seals remembered"):
        opener.open(attacker.public_key, flood.seal(server.public_key, [b"x"]))


def test_reachability_questions_beyond_the_limits_are_refused():
    import zmq

    from libswarm.errors import LimitError
    from libswarm.protocol import Message, registry
    from swarmd.config import LimitsConfig
    from swarmd.peer import dialback
    from swarmd.peer.server import SpanServer
    from swarmd.runtime.cache import CacheBudget
    from swarmd.transport.access import AccessControl

    ctx, me, asker = zmq.Context(), ident(), ident()
    srv = SpanServer(ctx, None, CacheBudget(0), "m", max_length=8, max_batch=1, idle_timeout_s=60,
                     max_message_bytes=2**20, identity=me, access=AccessControl("open", "", me.public_key),
                     resolve_key=lambda a: None, limits=LimitsConfig(1, 0.5, 1))
    try:
        srv.current, srv.peer_host = (b"\x00abcd", 1, asker.public_key), "10.0.0.7"

        def reach(address: str, nonce: str = "n"):
            msg = Message("reach", 1, {"address": address, "nonce": nonce})
            return srv.dialback.on_reach(registry.parse(registry.PEER, msg))

        with pytest.raises(ProtocolError, match="at most 64"):
            reach("tcp://10.0.0.7:1", "x" * 65)
        with pytest.raises(ProtocolError, match="tcp://host:port"):
            reach("10.0.0.7:1")
        fields, _ = reach("tcp://10.0.0.8:1")  # another host than the one asking: never called
        assert fields["calling"] is False and "10.0.0.7" in fields["why"]
        srv.dialback.running = dialback.MAX_DIAL_BACKS  # as many calls under way as allowed
        with pytest.raises(LimitError, match="too many reachability checks"):
            reach("tcp://10.0.0.7:1")
        srv.current = (relay.relay_ident(ident().public_key, asker.public_key), 1, asker.public_key)
        with pytest.raises(ProtocolError, match="direct connection"):  # through a relay it means nothing
            reach("tcp://10.0.0.7:1")
        with pytest.raises(ProtocolError, match="direct connection"):
            srv.dialback.on_reach_back(registry.parse(registry.PEER, Message("reach_back", 1, {"nonce": "n"})))
        assert not srv.reached
    finally:
        srv.compute.stop()
        srv.sock.close(0)
        ctx.term()


class ReachPeers:
    """Peers answering `reach` as told: "false" (calling: false), "calls" (calling: true, and
    the call gets through), "silent" (calling: true, the call never comes), "down" (no answer)."""

    def __init__(self, server, answers: dict[str, str]):
        self.server, self.answers = server, answers

    def get(self, address, key):
        peers = self

        class Conn:
            def request(self, msg_type, fields, timeout_s):
                answer = peers.answers[key]
                if answer == "down":
                    raise PeerUnavailableError("no answer")
                if answer == "false":
                    return Message("ok", 1, {"calling": False, "why": "its requests come from elsewhere"})
                if answer == "calls":
                    peers.server.reached[fields["nonce"]] = 0.0
                return Message("ok", 1, {"calling": True})
        return Conn()


def reachability(answers: list[str], monkeypatch):
    """A Reachability whose table holds one reached peer per answer, each on a host of its own."""
    import types

    from swarmd.discovery import reach

    monkeypatch.setattr(reach, "CALL_WAIT_S", 0.0)
    table, keys = PeerTable(), []
    for k in range(len(answers)):
        i = ident()
        r = Record(node_id=i.public_key, sign_key=i.sign_key, addresses=(f"tcp://10.0.{k}.1:31330",),
                   state="online", timestamp=time.time(), seq=1, model_id="m", span=(0, 2), reachable="yes")
        table.merge(r, r.sign(i), via=r.addresses[0])
        keys.append(i.public_key)
    server = types.SimpleNamespace(reached={}, relay_failures={}, want_relays=lambda relays: None)
    pool = ReachPeers(server, dict(zip(keys, answers)))
    r = reach.Reachability(pool=pool, table=table, own_id=ident().public_key, address="tcp://10.9.9.9:1",
                           server=server)
    return r, pool, keys


def check_once(r) -> str:
    r._next_check = 0.0
    r.tick()  # asks
    time.sleep(0.01)
    r.tick()  # settles
    return r.state


def test_one_peer_saying_it_will_not_call_back_does_not_make_a_node_unreachable(monkeypatch):
    """A liar (or a peer with a broken route) answering `calling: false`, while the other peer
    asked does not answer, used to make a reachable server hide behind relays for 5 minutes.
    Unreachable takes two distinct peers that could not get through; short of that the last
    verdict stands."""
    r, pool, (liar, other) = reachability(["false", "down"], monkeypatch)
    assert check_once(r) == "unknown"
    pool.answers[other] = "calls"
    assert check_once(r) == "yes"
    pool.answers[other] = "down"
    assert check_once(r) == "yes"  # one "no" again: still reachable
    pool.answers[other] = "silent"  # two peers, neither got through: unreachable
    assert check_once(r) == "no"


def test_a_lone_peers_word_counts_only_once_the_table_had_time_to_fill(monkeypatch):
    from swarmd.discovery import reach

    r, _, _ = reachability(["false"], monkeypatch)
    assert check_once(r) == "unknown"  # just started: a second peer may be known soon
    r._started -= reach.SETTLE_S
    assert check_once(r) == "no"  # a swarm of two: the only peer there is has the say


def test_keys_squatting_a_relays_slots_give_them_up_to_servers_that_need_them():
    """Sybil keys that only register and renew used to hold every slot, first come first kept.
    Now a server whose signed record says it needs a relay takes a squatter's slot, a slot
    unused for a minute goes to any newcomer, a server in use is never displaced, and one
    network holds at most a quarter of the slots."""
    from swarmd.transport.relay_slots import ACTIVE_S

    clock = Clock()
    h1, idle_server, *newcomers = [ident().public_key for _ in range(9)]
    vouched = {h1, idle_server, *newcomers}
    r = RelayService(True, max_bytes_per_s=10**9, max_servers=8, clock=clock, vouch=lambda k: k in vouched)
    squatters = [ident().public_key for _ in range(8)]
    for k, key in enumerate(squatters):
        r.register(key, b"s%d" % k, f"10.{k}.0.1")
    r.register(h1, b"h1", "10.99.0.1")  # vouched: a squatter gives way
    r.register(idle_server, b"v", "10.98.0.1")
    assert {h1, idle_server} <= set(r.servers) and len(r.servers) == 8 and r.evicted == 2
    with pytest.raises(LimitError, match="relay_max_servers"):  # another squatter displaces nobody
        r.register(ident().public_key, b"x", "10.97.0.1")

    for _ in range(int(ACTIVE_S) + 1):  # a minute of renewals, and nothing relayed
        clock.t += 1.0
        for key, slot in list(r.servers.items()):
            r.register(key, slot.ident)
    r.route(ident().public_key, h1, b"c", 100, 1)  # but h1 is in use
    fresh = ident().public_key
    r.register(fresh, b"f", "10.96.0.1")  # idle squatters give way even to an unvouched newcomer
    assert fresh in r.servers and {h1, idle_server} <= set(r.servers)
    for k, key in enumerate(newcomers):  # servers keep coming: the idle squatters, the newcomer
        r.register(key, b"n", f"10.{100 + k}.0.1")  # not vouched for, then the unused server go
    assert set(r.servers) == {h1, *newcomers}
    with pytest.raises(LimitError, match="relay_max_servers"):  # every slot is a server in use or new
        r.register(idle_server, b"v", "10.98.0.1")

    r2 = RelayService(True, max_bytes_per_s=10**9, max_servers=8, clock=clock, vouch=lambda k: True)
    r2.register(ident().public_key, b"a", "203.0.113.1")
    r2.register(ident().public_key, b"b", "203.0.113.2")
    with pytest.raises(LimitError, match="from 203.0.113.0/24, the most one network may hold"):
        r2.register(ident().public_key, b"c", "203.0.113.3")
    r2.register(ident().public_key, b"d", "198.51.100.1")  # another network: room
