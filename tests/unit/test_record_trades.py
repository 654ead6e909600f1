"""What a server trading places (double-holding, placement.py) says in its record: its
`capacity` and the span it serves beside its own (`also`), checked like `span`; and what the
rest of the daemon makes of it: coverage and routing count the second span, an older daemon
keeps such a record."""

import base64
import json
import os
import time

import pytest

from swarmd.coverage import coverage
from swarmd.discovery.records import Record, RecordError, decode_record
from swarmd.discovery.table import PeerTable
from swarmd.identity import NodeIdentity
from swarmd.routing import plan_chain


def ident() -> NodeIdentity:
    return NodeIdentity(os.urandom(32))


def record(i: NodeIdentity, **over) -> Record:
    fields = dict(node_id=i.public_key, sign_key=i.sign_key, addresses=("tcp://10.0.0.1:31330",), state="online",
                  timestamp=time.time(), seq=1, model_id="m", span=(2, 4), throughput=10.0, movable=True)
    return Record(**{**fields, **over})


def test_capacity_and_the_span_held_beside_round_trip():
    i = ident()
    r = record(i, capacity=4, also=(0, 2))
    assert decode_record(r.sign(i)) == r
    plain = decode_record(record(i).sign(i))
    assert plain.capacity == 0 and plain.also is None


@pytest.mark.parametrize("over, needle", [
    (dict(also=(3, 1)), "also must be \\[start, end\\]"),
    (dict(also=(0, 5000)), "also must be \\[start, end\\]"),
    (dict(also=(-1, 2)), "also must be \\[start, end\\]"),
    (dict(also=(0, 1, 2)), "also must be \\[start, end\\]"),
    (dict(also=("0", 2)), "also must be \\[start, end\\]"),
    (dict(also=(True, 2)), "also must be \\[start, end\\]"),
    (dict(also="0:2"), "also must be \\[start, end\\]"),
    (dict(span=None, also=(0, 2)), "also .* without a span"),
    (dict(capacity=-1), "'capacity' must be within"),
    (dict(capacity=5000), "'capacity' must be within"),
    (dict(capacity=2.5), "'capacity' is missing or has the wrong type"),
    (dict(capacity=True), "'capacity' is missing or has the wrong type"),
])
def test_a_bad_capacity_or_second_span_rejects_the_record_with_one_line(over, needle):
    i = ident()
    with pytest.raises(RecordError, match=needle) as e:
        decode_record(record(i, **over).sign(i))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"record of {i.short_id}: ")


def test_a_field_this_daemon_does_not_know_is_ignored_and_the_signed_body_kept_whole():
    # as an older daemon sees capacity and also: a newer daemon's field it has no name for
    i = ident()
    body = json.loads(record(i).sign(i)["body"])
    body["field_from_the_future"] = [1, 2]
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    wire = {"body": text, "sig": base64.b64encode(i.sign(text.encode())).decode()}
    assert decode_record(wire).span == (2, 4)
    t = PeerTable()
    t.merge(decode_record(wire), wire)
    assert t.get(i.public_key).wire["body"] == text  # relayed as signed


def test_coverage_and_routing_count_the_span_held_beside_its_own():
    t = PeerTable()
    trader, other = ident(), ident()
    for i, over, address in ((trader, dict(also=(0, 2)), "tcp://10.0.0.1:1"), (other, dict(span=(2, 4)),
                                                                               "tcp://10.0.0.2:1")):
        r = record(i, addresses=(address,), **over)
        t.merge(r, r.sign(i), via=address)
    [cov] = coverage(t, "m", 4)
    assert cov["complete"] and cov["gaps"] == []
    assert [len(b["servers"]) for b in cov["blocks"]] == [1, 1, 2, 2]
    spans = sorted((s.address, s.start, s.end) for s in t.servers_for("m"))
    assert spans == [("tcp://10.0.0.1:1", 0, 2), ("tcp://10.0.0.1:1", 2, 4), ("tcp://10.0.0.2:1", 2, 4)]
    assert plan_chain(t.servers_for("m"), 4, "m")[0].address == "tcp://10.0.0.1:1"  # blocks 0:2: only there


def test_swarmctl_peers_and_status_show_the_span_held_beside_its_own():
    from swarmd.commands.peers import peer_rows
    from swarmd.commands.status import StatusCommand

    i = ident()
    peer = {"short_id": i.short_id, "address": "tcp://10.0.0.1:1", "span": [2, 4], "also": [0, 2],
            "state": "online", "throughput": 10.0, "rtt_ms": 1.0, "last_seen_s_ago": 0.5}
    assert "2:4 +0:2" in peer_rows([peer])
    status = {
        "version": "x", "protocol": "y", "state": "online", "uptime_s": 1.0, "node_id": i.public_key,
        "address": "tcp://10.0.0.1:1",
        "model": {"id": "m", "architecture": "llama", "num_layers": 4, "path": "/m"},
        "serve": {"blocks": [2, 4], "also": [0, 2], "capacity": 4, "device": "cpu", "dtype": "float32"},
        "cache": {"used_bytes": 0, "free_bytes": 1, "max_bytes": 1},
        "sessions": {"server": 0, "gateway": 0},
        "membership": {"access": "open", "refused_handshakes": 0, "rejected_records": 0},
        "coverage": [], "peers": [peer],
    }
    assert "serving   blocks 2:4 and 0:2 until others cover it" in StatusCommand().format(status, None)
