"""The files that make swarmd a systemd service, as shipped in the package (swarmd/data/, the same
files as packaging/ and etc/), and where each one goes.

Two installers use them: the Debian package (tools/build_deb.py: vendor paths under /usr/lib)
and `swarmctl install-service` (admin paths under /etc, for pip installs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

# the path the units name; installers substitute the real one
PACKAGED_SWARMD = "/opt/swarmd/bin/swarmd"
PACKAGED_BIN = os.path.dirname(PACKAGED_SWARMD)  # swarm-api lies beside swarmd
# trees that ProtectHome=yes hides from the service
HOME_TREES = ("/home/", "/root/", "/run/user/")


@dataclass(frozen=True)
class ServiceFile:
    source: str  # name in swarmd/data
    vendor: str  # where a distribution package puts it
    admin: str  # where a local (pip) install puts it


SERVICE_FILES = (
    ServiceFile("swarmd.service", "usr/lib/systemd/system/swarmd.service", "etc/systemd/system/swarmd.service"),
    ServiceFile("swarmd@.service", "usr/lib/systemd/system/swarmd@.service", "etc/systemd/system/swarmd@.service"),
    ServiceFile("swarm-api.service", "usr/lib/systemd/system/swarm-api.service",
                "etc/systemd/system/swarm-api.service"),
    ServiceFile("sysusers.conf", "usr/lib/sysusers.d/swarmd.conf", "etc/sysusers.d/swarmd.conf"),
    ServiceFile("tmpfiles.conf", "usr/lib/tmpfiles.d/swarmd.conf", "etc/tmpfiles.d/swarmd.conf"),
)
# the config: a conffile in the package, written only where absent by install-service
CONFIG = ServiceFile("swarmd.yaml", "etc/swarmd/swarmd.yaml", "etc/swarmd/swarmd.yaml")


def read(name: str) -> str:
    return (resources.files("swarmd") / "data" / name).read_text()


def write_file(path: str, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` (its directories made) with `mode`, replacing it in one step."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.swarmctl-new"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def under_home(path: str) -> bool:
    return any(os.path.realpath(path).startswith(t) or path.startswith(t) for t in HOME_TREES)


def render(f: ServiceFile, swarmd: str = PACKAGED_SWARMD) -> str:
    """The file's text for a daemon at `swarmd`. A swarmd under /home (a venv in a user's home)
    cannot run with ProtectHome=yes, so such a unit gets ProtectHome=read-only instead."""
    text = read(f.source)
    if not f.source.endswith(".service") or swarmd == PACKAGED_SWARMD:
        return text
    if any(c.isspace() for c in swarmd) or not os.path.isabs(swarmd):
        raise ValueError(f"swarmd path must be absolute and without spaces: {swarmd!r}")
    text = text.replace(f"ExecStart={PACKAGED_BIN}/", f"ExecStart={os.path.dirname(swarmd)}/")
    if under_home(swarmd):
        text = text.replace(
            "ProtectHome=yes\n",
            f"# {swarmd} lies in a home directory: readable (not writable) by the service\n"
            "ProtectHome=read-only\n")
    return text
