"""Records, keys, the peer table and access lists, without daemons."""

import os
import threading
import time

import pytest
import zmq

from swarmd.daemon import coverage
from swarmd.discovery.access import AccessControl, read_key_file
from swarmd.discovery.keyquery import KeyResponder, query_key
from swarmd.discovery.records import MAX_RECORD_BYTES, Record, RecordError, decode_record
from swarmd.discovery.table import PeerTable
from swarmd.identity import NodeIdentity, load_or_create_identity, node_id_of_sign_key


def ident() -> NodeIdentity:
    return NodeIdentity(os.urandom(32))


def record(i: NodeIdentity, **over) -> Record:
    fields = dict(node_id=i.public_key, sign_key=i.sign_key, addresses=("tcp://10.0.0.1:31330",), state="online",
                  timestamp=time.time(), seq=1, model_id="m", span=(0, 2), throughput=10.0)
    return Record(**{**fields, **over})


def test_node_id_is_the_curve_form_of_the_signing_key_and_works_as_a_curve_key():
    i = ident()
    assert node_id_of_sign_key(i.sign_key) == i.public_key
    assert zmq.curve_public(i.secret_key.encode()).decode() == i.public_key
    assert node_id_of_sign_key(ident().sign_key) != i.public_key


def test_identity_file_is_private_and_stable(tmp_path):
    a = load_or_create_identity(str(tmp_path))
    assert os.stat(tmp_path / "node.key").st_mode & 0o777 == 0o600
    assert load_or_create_identity(str(tmp_path)).public_key == a.public_key
    assert (tmp_path / "node.pub").read_text().strip() == a.public_key


def test_the_node_key_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash while the key is written leaves no node.key (the next start makes one), never a
    torn one (which would refuse every later start); the secret goes through fsync first."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    real_replace = os.replace

    def crash_on_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash_on_rename)
    with pytest.raises(OSError):
        load_or_create_identity(str(tmp_path))
    assert synced and os.listdir(tmp_path) == []  # nothing half-written, no temporary left behind
    monkeypatch.setattr(os, "replace", real_replace)
    a = load_or_create_identity(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["node.key", "node.pub"]
    assert load_or_create_identity(str(tmp_path)).public_key == a.public_key


def test_signed_record_round_trips():
    i = ident()
    r = record(i, rtt_ms={"abcdefgh": 1.5}, fingerprints=("00ff", "11ee"))
    assert decode_record(r.sign(i)) == r


@pytest.mark.parametrize("tamper, reason", [
    (lambda w, i, o: {**w, "body": w["body"].replace('"span":[0,2]', '"span":[0,4]')}, "bad signature"),
    (lambda w, i, o: record(i, sign_key=o.sign_key).sign(o), "belongs to another node"),
    (lambda w, i, o: record(i, timestamp=time.time() + 600).sign(i), "from the future"),
    (lambda w, i, o: record(i, version="v" * MAX_RECORD_BYTES).sign(i), "oversized"),
    (lambda w, i, o: {**w, "body": w["body"][:-9]}, "not JSON"),
    (lambda w, i, o: {**w, "sig": "***"}, "not base64"),
    (lambda w, i, o: record(i, state="sleeping").sign(i), "unknown state"),
    (lambda w, i, o: record(i, addresses=()).sign(i), "addresses"),
    (lambda w, i, o: "garbage", "malformed"),
])
def test_bad_records_are_rejected_with_their_reason(tamper, reason):
    i, other = ident(), ident()
    wire = record(i).sign(i)
    with pytest.raises(RecordError, match=reason):
        decode_record(tamper(wire, i, other))


def test_key_for_follows_nodes_that_change_address():
    t = PeerTable()
    a, b = ident(), ident()
    x, y = "tcp://10.0.0.1:31330", "tcp://10.0.0.2:31330"
    t.merge(record(a, addresses=(x,)), {})
    assert t.key_for(x) == a.public_key and t.key_for(y) is None
    t.merge(record(a, seq=2, addresses=(y,)), {})  # a moved to y
    assert t.key_for(y) == a.public_key and t.key_for(x) is None
    t.merge(record(b, addresses=(x,)), {})  # and b answers at x
    assert t.key_for(y) == a.public_key and t.key_for(x) == b.public_key


def test_table_keeps_the_newest_version_and_marks_silence_as_dead():
    t = PeerTable(gossip_interval_s=0.05)
    i = ident()
    r1, r2 = record(i, seq=1), record(i, seq=2, span=(2, 4))
    assert t.merge(r2, r2.sign(i)) == "new"
    assert t.merge(r1, r1.sign(i)) == "old"  # an older version relayed late changes nothing
    e = t.get(i.public_key)
    assert e is not None and e.record.span == (2, 4) and t.state(e) == "online"
    assert [s.start for s in t.servers_for("m")] == [2]
    assert t.key_for("tcp://10.0.0.1:31330") == i.public_key
    time.sleep(t.stale_after_s() + 0.05)
    assert t.state(e) == "dead" and t.servers_for("m") == []
    assert t.newer_than({}) == []  # dead records are not passed on


def test_newer_than_sends_only_what_the_digest_lacks():
    t = PeerTable()
    a, b = ident(), ident()
    ra, rb = record(a, seq=5), record(b, seq=1)
    t.merge(ra, ra.sign(a))
    t.merge(rb, rb.sign(b))
    digest = {a.public_key: [ra.timestamp, 5], b.public_key: [rb.timestamp - 1, 1]}
    sent = t.newer_than(digest)
    assert len(sent) == 1 and b.public_key in sent[0]["body"]


def test_coverage_lists_servers_throughput_and_gaps():
    t = PeerTable()
    for span, tp in (((0, 2), 10.0), ((0, 1), 5.0), ((3, 4), 7.0)):
        i = ident()
        r = record(i, span=span, throughput=tp)
        t.merge(r, r.sign(i))
    [cov] = coverage(t, "m", 6)
    assert [len(b["servers"]) for b in cov["blocks"]] == [2, 1, 0, 1, 0, 0]
    assert [b["throughput"] for b in cov["blocks"]] == [15.0, 10.0, 0.0, 7.0, 0.0, 0.0]
    assert cov["gaps"] == [[2, 3], [4, 6]] and not cov["complete"]


def test_allowed_keys_dir_reads_keys_skips_bad_files_and_reloads(tmp_path, caplog):
    a, b = ident(), ident()
    (tmp_path / "a").write_text(f"# alice's box\n{a.public_key}\n")
    (tmp_path / "cert").write_text(f'metadata\ncurve\n    public-key = "{b.public_key}"\n')
    (tmp_path / "bad").write_text("not a key\n")
    (tmp_path / "two").write_text(f"{a.public_key}\n{b.public_key}\n")
    acl = AccessControl("private", str(tmp_path), "own-key")
    assert acl.allowed == {a.public_key, b.public_key}
    assert acl.allows("own-key") and not acl.allows(ident().public_key) and not acl.allows(None)
    assert "bad ignored" in caplog.text and "two ignored" in caplog.text
    os.remove(tmp_path / "a")
    acl.reload()
    assert acl.allowed == {b.public_key}
    acl.keys_dir = str(tmp_path / "missing")
    acl.reload()  # an unreadable directory keeps the keys known before, and says so
    assert acl.allowed == {b.public_key} and "cannot be read" in caplog.text
    assert AccessControl("open", str(tmp_path / "missing"), "k").allows(ident().public_key)


def test_key_file_with_hash_in_the_key_is_read(tmp_path):
    i = ident()
    while "#" not in i.public_key:
        i = ident()
    path = tmp_path / "peer"
    path.write_text(i.public_key + "\n")
    assert read_key_file(str(path)) == i.public_key


def test_key_query_answers_over_udp_only_to_full_size_questions():
    from localswarm import free_port

    port, i = free_port(), ident()
    responder = KeyResponder("127.0.0.1", port, i.public_key)
    stop = threading.Event()
    t = threading.Thread(target=responder.serve, args=(stop,), daemon=True)
    t.start()
    try:
        assert query_key(f"tcp://127.0.0.1:{port}") == i.public_key
        import socket

        with socket.socket(type=socket.SOCK_DGRAM) as s:  # short question: no answer (no amplification)
            s.settimeout(0.3)
            s.sendto(b"SWARMD-KEY? 1", ("127.0.0.1", port))
            with pytest.raises(TimeoutError):
                s.recvfrom(512)
        assert query_key(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.2) is None
    finally:
        stop.set()
        t.join(2)


def test_a_gossip_request_carrying_a_flood_of_records_is_cut_to_a_few():
    from libswarm.protocol import Message
    from swarmd.discovery.membership import MAX_REQUEST_RECORDS, Membership

    m = Membership(identity=ident(), pool=None, table=PeerTable(), access=AccessControl("open", "", ""),
                   own_fields=lambda: None, expected_fingerprint=lambda b: None)
    flood = []
    for _ in range(50):
        i = ident()
        flood.append(record(i).sign(i))
    m.on_gossip(Message("gossip", 1, {"records": flood, "digest": {}}))
    assert len(m.table.entries()) == MAX_REQUEST_RECORDS
