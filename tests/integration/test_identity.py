"""The node key: made at first start (0600), kept across restarts, printed by `swarmctl key`."""

import os
import stat
import subprocess

import pytest
from helpers import SWARMCTL, SWARMD
from localswarm import Daemon


def test_node_key_is_made_once_private_and_printed_by_swarmctl(model_dirs, tmp_path):
    d = Daemon(str(tmp_path), "gw", model_dirs("llama"), "none").start([]).wait_ready()
    try:
        key_path = os.path.join(d.cfg["state_dir"], "node.key")
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        public = open(os.path.join(d.cfg["state_dir"], "node.pub")).read().strip()
        plain = subprocess.run([SWARMCTL, "--socket", d.socket, "key"], capture_output=True, text=True, timeout=30)
        assert plain.returncode == 0 and plain.stdout.strip() == public and len(public) == 40
        assert d.ctl("key")["public_key"] == public == d.ctl("status")["node_id"]
        d.stop()
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
