"""Three daemons in three network namespaces joined by a bridge: a LAN of three hosts on one
machine. They find each other by mDNS alone and generate across all three; with a firewall
in front of one, it serves through a relay."""

import json
import os
import shutil
import subprocess
import time
import zlib

import pytest
import torch
from conftest import hf_reference
from helpers import SWARMCTL, Daemon, generate_equals_hf, until, wait_tables
from test_membership import CONVERGE_LIMIT_S

from swarmd.identity import short_id

RELAYED_LIMIT_S = 60.0  # a host no one can call: found unreachable, then registered at a relay

pytestmark = pytest.mark.netns

TAG = f"sw{os.getpid() % 100000}"
SUBNET = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def three_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    names = [f"{TAG}n{k}" for k in (1, 2, 3)]
    bridge = f"{TAG}br"
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make a bridge here: {e.stderr.strip()}")
    made = []
    try:
        sh("ip", "link", "set", bridge, "up")
        for k, ns in enumerate(names, 1):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            inner, outer = f"{TAG}p{k}", f"{TAG}v{k}"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", bridge, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{k}/24", "dev", inner)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "ip", "route", "add", "224.0.0.0/4", "dev", inner)
        yield [(ns, f"{SUBNET}.{k}") for k, ns in enumerate(names, 1)]
    except subprocess.CalledProcessError as e:
        pytest.skip(f"ip netns does not work here: {e.cmd}: {e.stderr.strip()}")
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def test_three_namespaces_find_each_other_by_mdns_and_one_that_accepts_no_connections_serves_through_a_relay(
        model_dirs, three_hosts, tmp_path):
    """Three hosts find each other by mDNS alone and generate across all three. Host 2 accepts
    no connections from the LAN (its daemon listens on the namespace's own loopback while it
    announces its LAN address: every connection to it is refused, as by a firewall, while its
    own connections out work; this kernel has no netfilter or tc classifier for a real one).
    Host 1 relays for it. The record of host 2 says unreachable, via host 1; what host 1
    forwarded is sealed: no header, no activation, nothing compressible."""
    d = model_dirs("llama", layers=4)
    tap = str(tmp_path / "tap.bin")
    daemons = []
    for (ns, ip), blocks in zip(three_hosts, ("0:2", "2:3", "3:4")):
        x = Daemon(str(tmp_path), ns, d, blocks, {
            "network": {"listen": f"tcp://{ip}:31330"},
            "discovery": {"mdns": True, "mdns_interfaces": [ip]},
        })
        x.address = f"tcp://{ip}:31330"
        x.prefix = ["ip", "netns", "exec", ns]
        daemons.append(x)
    relay, server, gateway = daemons
    relay.cfg["network"]["relay"] = True
    relay.env = {"SWARMD_FAILPOINTS": "relay_tap", "SWARMD_RELAY_TAP": tap}
    server.cfg["network"]["listen"], server.cfg["network"]["announce"] = "tcp://127.0.0.1:31330", [server.address]
    try:
        for x in daemons:
            x.start([])
        for x in daemons:
            x.wait_ready()
        # the two hosts that accept connections: within the LAN's limit. Host 2 is reached only
        # once it has found itself unreachable (two peers that cannot call it back) and registered
        # at the relay: 7 s unloaded, and more than the LAN's 10 s on a loaded CI (issue 38, 21c)
        took = wait_tables(daemons, {relay.node_id, gateway.node_id}, CONVERGE_LIMIT_S)
        relayed = wait_tables(daemons, {x.node_id for x in daemons}, RELAYED_LIMIT_S)
        print(f"netns: 2 hosts found each other by mDNS in {took:.2f} s; the one behind them in {took + relayed:.2f} s")
        until(lambda: any(p["node_id"] == server.node_id and p["address"].startswith("relay+")
                          and p["state"] == "online" for p in gateway.ctl("peers")["peers"]), 60, "a relayed route")
        peers = {p["node_id"]: p for p in gateway.ctl("peers")["peers"]}
        assert peers[relay.node_id]["address"] == relay.address and peers[gateway.node_id]["address"] == \
            gateway.address
        assert peers[server.node_id]["address"] == f"relay+{relay.address}/{server.node_id}"
        assert peers[server.node_id]["reachable"] == "no" and peers[server.node_id]["via"] == [
            short_id(relay.node_id)]
        assert server.ctl("status")["network"]["reachable"] == "no"
        generate_equals_hf(d, gateway.socket)
        time.sleep(0.1)
        assert all(x.ctl("status")["stats"]["steps"] > 0 for x in daemons)  # the route crossed all three
    finally:
        for x in daemons:
            x.stop()
    # what the relay saw: outer headers name only the two ends; each payload is sealed
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(4))  # generate_equals_hf's
    hidden = hf_reference(d)(ids, output_hidden_states=True).hidden_states[2][0].detach().float().numpy().tobytes()
    messages = list(tapped(tap))
    assert len(messages) > 10
    payloads = []
    for frames in messages:
        header = json.loads(bytes(frames[0]))
        assert set(header) <= {"v", "type", "id", "to", "tensors"} and header["type"] == "relay"
        payloads.append(b"".join(bytes(f) for f in frames[1:]))
    everything = b"".join(payloads)
    for plain in (b'"type"', b'"session"', b'"hidden"', hidden[:16], hidden[-16:]):
        assert plain not in everything
    assert len(zlib.compress(everything)) > 0.99 * len(everything)  # ciphertext: nothing to compress


def tapped(path: str):
    from swarmd.transport.relay import unpack

    with open(path, "rb") as f:
        data = f.read()
    at = 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 8], "little")
        yield unpack(memoryview(data[at + 8:at + 8 + n]))
        at += 8 + n


def test_the_private_swarm_walk_of_the_operations_page_with_its_own_commands(model_dirs, three_hosts, tmp_path):
    """docs/operations.md, "A private swarm of three machines, step by step", on three hosts of a
    LAN, with the page's own commands where they do not need systemd: the config of step 2;
    alone at first, handshakes refused and logged as step 3 shows; `swarmctl key` printed into
    the others' peers.d as it is (step 4) and a reload (SIGHUP: what `systemctl reload` sends);
    mDNS (step 5); step 6's checks; step 7's removal on every member."""
    import re
    import signal

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                           "operations.md")) as f:
        page = f.read()
    section = page[page.index("## A private swarm of three machines"):page.index("## Choosing blocks")]
    refusal = re.search(r"^\s*(WARNING swarmd\.access: refused peer) 955c376f \(KEY-OF-BETA\)(: its key is not in) "
                        r"/etc/swarmd/peers\.d( \(private swarm\))$", section, re.M)
    assert refusal and "swarmctl key" in section and "swarm private, 3 of 3 peers online" in section
    d = model_dirs("llama", layers=4)
    daemons = []
    for (ns, ip), blocks in zip(three_hosts, ("0:2", "1:3", "2:4")):  # overlapping, as step 2 advises
        x = Daemon(str(tmp_path), ns, d, blocks, {
            "network": {"listen": f"tcp://{ip}:31330"},
            "discovery": {"mdns": True, "mdns_interfaces": [ip]},
            "swarm": {"access": "private", "allowed_keys_dir": str(tmp_path / ns / "peers.d")},
        })
        os.makedirs(x.cfg["swarm"]["allowed_keys_dir"], mode=0o755)  # install -d -m 0755 .../peers.d
        x.address = f"tcp://{ip}:31330"
        x.prefix = ["ip", "netns", "exec", ns]
        daemons.append(x)
    try:
        for x in daemons:
            x.start([])
        for x in daemons:
            x.wait_ready()
        # step 4: each key, as `swarmctl key` prints it, into the other two's peers.d; reload.
        # First the first machine alone lists the others: they refuse its handshakes, as step 3 shows
        keys = {}
        for x in daemons:
            printed = subprocess.run([SWARMCTL, "--socket", x.socket, "key"], capture_output=True, text=True,
                                     timeout=30)
            assert printed.returncode == 0, printed.stderr
            keys[x.name] = printed.stdout
        first, rest = daemons[0], daemons[1:]
        for x in rest:
            with open(os.path.join(first.cfg["swarm"]["allowed_keys_dir"], x.name), "w") as f:
                f.write(keys[x.name])
        first.kill(signal.SIGHUP)
        until(lambda: all(refusal.group(1) in x.tail(1 << 20) for x in rest), 30, "refusals logged")
        line = next(ln for ln in rest[0].tail(1 << 20).splitlines() if refusal.group(1) in ln)
        assert f"refused peer {short_id(first.node_id)} ({first.node_id})" in line
        assert refusal.group(2) in line and line.endswith(refusal.group(3))
        for x in daemons:
            for other in daemons:
                if other is not x:
                    with open(os.path.join(other.cfg["swarm"]["allowed_keys_dir"], x.name), "w") as f:
                        f.write(keys[x.name])
        for x in daemons:
            x.kill(signal.SIGHUP)
        # steps 5 and 6: found by mDNS; three rows online, "swarm private, 3 of 3 peers online", no GAP
        wait_tables(daemons, {x.node_id for x in daemons}, CONVERGE_LIMIT_S)

        def status_text() -> str:
            return subprocess.run([SWARMCTL, "--socket", daemons[2].socket, "status"], capture_output=True,
                                  text=True, timeout=30).stdout

        until(lambda: "swarm     private, 3 of 3 peers online" in status_text(), 30, "status to say 3 of 3")
        # coverage counts only servers this daemon reached with their key (issue 38, finding 11):
        # a record gossiped in just now may be online a moment before it is reached
        until(lambda: "GAP" not in status_text(), 30, "coverage without a gap")
        generate_equals_hf(d, daemons[2].socket)
        # step 7: removed on every member and reloaded: gone from every table and its coverage at once
        leaver = daemons[0]
        for x in daemons[1:]:
            os.remove(os.path.join(x.cfg["swarm"]["allowed_keys_dir"], leaver.name))
            x.kill(signal.SIGHUP)
        # (an mDNS contact of its address may still be listed, never online: records of its key are refused)
        def online(x) -> set[str]:
            return {p["node_id"] for p in x.ctl("peers")["peers"] if p["state"] == "online"}

        until(lambda: all(leaver.node_id not in online(x) for x in daemons[1:]), 5,
              "the removed key gone from every table")
        assert daemons[2].ctl("status")["coverage"][0]["gaps"] == [[0, 1]]  # block 0 was its alone
    finally:
        for x in daemons:
            x.stop()
