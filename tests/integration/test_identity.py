"""The node key: made at first start (0600), kept across restarts, printed by `swarmctl key`."""

import json
import os
import stat
import subprocess

import pytest
from helpers import SWARMCTL, SWARMD
from localswarm import Daemon

from swarmd.identity import short_id
from swarmd.transport.access import read_key_file


def test_node_key_is_made_once_private_and_printed_by_swarmctl(model_dirs, tmp_path):
    d = Daemon(str(tmp_path), "gw", model_dirs("llama"), "none").start([]).wait_ready()
    try:
        key_path = os.path.join(d.cfg["state_dir"], "node.key")
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        public = open(os.path.join(d.cfg["state_dir"], "node.pub")).read().strip()
        plain = subprocess.run([SWARMCTL, "--socket", d.socket, "key"], capture_output=True, text=True, timeout=30)
        first, second = plain.stdout.strip().splitlines()
        assert plain.returncode == 0 and first == public and len(public) == 40
        # one short form everywhere a person reads one: status, peers and the key's comment line
        short = d.ctl("status")["short_id"]
        assert second.startswith(f"# node {short}") and short == short_id(public)
        # printed as it is into a peers.d file, it is that file
        (tmp_path / "peer").write_text(plain.stdout)
        assert read_key_file(str(tmp_path / "peer")) == public
        assert d.ctl("key")["public_key"] == public == d.ctl("status")["node_id"]
        d.stop()
        # without a running daemon: read from the state_dir the config names
        off = subprocess.run([SWARMCTL, "--socket", d.socket, "--json", "key", "--config", d.config_path],
                             capture_output=True, text=True, timeout=30)
        assert off.returncode == 0 and json.loads(off.stdout)["public_key"] == public
        gone = subprocess.run([SWARMCTL, "--socket", d.socket, "key", "--state-dir", str(tmp_path / "none")],
                              capture_output=True, text=True, timeout=30)
        assert gone.returncode != 0 and gone.stderr.count("\n") == 1 and "node.pub" in gone.stderr
        d.start([]).wait_ready()
        assert d.ctl("key")["public_key"] == public  # the same identity after a restart
    finally:
        d.stop()


@pytest.mark.parametrize("content, mode, needle", [
    ("not a key\n", 0o600, "is not a node secret"),
    (None, 0o644, "readable by others"),
])
def test_bad_node_key_stops_swarmd_with_one_line(model_dirs, tmp_path, content, mode, needle):
    d = Daemon(str(tmp_path), "gw", model_dirs("llama"), "none")
    d.start([]).wait_ready()
    d.stop()
    key_path = os.path.join(d.cfg["state_dir"], "node.key")
    if content is not None:
        with open(key_path, "w") as f:
            f.write(content)
    os.chmod(key_path, mode)
    r = subprocess.run([SWARMD, "--config", d.config_path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
