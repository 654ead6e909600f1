"""The systemd units in packaging/ are valid, and as locked down as documented."""

import os
import re
import shutil
import subprocess

import pytest
from localswarm import SWARMD

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_EXPOSURE = 2.0  # documented in docs/operations.md (measured: 1.9)

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def installed_copy(tmp_path, name: str, as_name: str | None = None) -> str:
    """The unit with ExecStart pointing at this venv's swarmd or swarm-api (verify checks that it exists)."""
    with open(os.path.join(ROOT, "packaging", "systemd", name)) as f:
        text = f.read().replace("/opt/swarmd/bin/", os.path.dirname(SWARMD) + "/")
    path = tmp_path / (as_name or name)
    path.write_text(text)
    return str(path)


def verified_and_hardened(unit: str) -> str:
    """systemd verifies the unit and rates its exposure within MAX_EXPOSURE; returns its text."""
    r = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", unit], capture_output=True, text=True,
                       timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout[-500:]
    assert float(m.group(1)) <= MAX_EXPOSURE
    return open(unit).read()


@pytest.mark.parametrize("name, as_name", [("swarmd.service", None), ("swarmd@.service", "swarmd@0.service")])
def test_units_verify_and_are_hardened(tmp_path, name, as_name):
    unit = installed_copy(tmp_path, name, as_name)
    text = verified_and_hardened(unit)
    assert "Type=notify" in text and "WatchdogSec=" in text and "DevicePolicy=closed" in text
    # resource bounds: a flood or a leak is stopped with swarmd, not with the machine
    for bound in ("LimitNOFILE=", "TasksMax=", "MemoryMax="):
        assert re.search(rf"^{bound}\S+", text, re.M), bound


def test_swarm_api_unit_verifies_runs_after_swarmd_and_is_hardened(tmp_path):
    unit = installed_copy(tmp_path, "swarm-api.service")
    text = verified_and_hardened(unit)
    assert re.search(r"^After=.*swarmd\.service", text, re.M) and "--config /etc/swarmd/swarmd.yaml" in text
    # the HTTP side is not swarmd: a user of its own, in group swarmd for the socket, and none of
    # swarmd's state (every instance's node key) visible
    assert re.search(r"^User=swarm-api$", text, re.M) and re.search(r"^SupplementaryGroups=swarmd$", text, re.M)
    assert "InaccessiblePaths=-/var/lib/swarmd\n" in text
    for bound in ("LimitNOFILE=", "TasksMax=", "MemoryMax="):
        assert re.search(rf"^{bound}\S+", text, re.M), bound
