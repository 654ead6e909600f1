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
from helpers import Daemon, generate_equals_hf, until, wait_tables
from test_membership import CONVERGE_LIMIT_S

from swarmd.identity import short_id

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
        took = wait_tables(daemons, {x.node_id for x in daemons}, CONVERGE_LIMIT_S)
        print(f"netns: 3 hosts found each other by mDNS in {took:.2f} s")
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
