"""Three daemons in three network namespaces joined by a bridge: a LAN of three hosts on one
machine. They find each other by mDNS alone and generate across all three."""

import os
import shutil
import subprocess
import time

import pytest
from helpers import Daemon, generate_equals_hf, wait_tables
from test_membership import CONVERGE_LIMIT_S

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


def test_three_namespaces_find_each_other_by_mdns_and_generate(model_dirs, three_hosts, tmp_path):
    d = model_dirs("llama", layers=4)
    daemons = []
    for (ns, ip), blocks in zip(three_hosts, ("0:2", "2:3", "3:4")):
        x = Daemon(str(tmp_path), ns, d, blocks, {
            "network": {"listen": f"tcp://{ip}:31330"},
            "discovery": {"mdns": True, "mdns_interfaces": [ip]},
        })
        x.address = f"tcp://{ip}:31330"
        x.prefix = ["ip", "netns", "exec", ns]
        daemons.append(x)
    try:
        for x in daemons:
            x.start([])
        for x in daemons:
            x.wait_ready()
        took = wait_tables(daemons, {x.node_id for x in daemons}, CONVERGE_LIMIT_S)
        print(f"netns: 3 hosts found each other by mDNS in {took:.2f} s")
        peers = daemons[0].ctl("peers")["peers"]
        assert sorted(p["address"] for p in peers) == sorted(x.address for x in daemons)
        generate_equals_hf(d, daemons[0].socket)
        time.sleep(0.1)
        assert all(x.ctl("status")["stats"]["steps"] > 0 for x in daemons)  # the route crossed all three
    finally:
        for x in daemons:
            x.stop()
