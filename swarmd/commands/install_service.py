"""`swarmctl install-service`: make a pip-installed swarmd a systemd service, with the same units,
user and directories as the Debian package, under /etc (the administrator's paths)."""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import stat
import subprocess
import sys

from libswarm.errors import SwarmError
from swarmd import service_files
from swarmd.commands.base import Command


def default_swarmd() -> str:
    """The swarmd installed beside this swarmctl (same venv), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "swarmd")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("swarmd") or here


def unreachable_dirs(path: str) -> list[str]:
    """Directories above `path` that other users (the service's user) cannot enter."""
    out = []
    d = os.path.dirname(os.path.abspath(path))
    while d != "/":
        try:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                out.append(d)
        except OSError:
            pass
        d = os.path.dirname(d)
    return out


def interpreter_of(script: str) -> str | None:
    """The interpreter a script's `#!` line names (a venv's bin/python, usually a link), or None."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode(errors="replace").split()
    return parts[0] if parts and os.path.isabs(parts[0]) else None


def interpreter_problems(swarmd: str) -> list[str]:
    """Why user swarmd could not start the interpreter that runs `swarmd`: a venv made from a
    Python under /root (pyenv, a user's build) links its bin/python there, so `swarmd` itself is
    readable and still fails 'Permission denied' (exit 126) for the service, and ProtectHome=yes
    hides every home directory from the unit whatever the modes."""
    py = interpreter_of(swarmd)
    if py is None or not os.path.exists(py):
        return []
    real = os.path.realpath(py)
    where = f"{py} -> {real}" if real != py else py
    if service_files.under_home(real):
        return [f"swarmd runs on {where}, which is under a home directory that the service cannot see "
                "(ProtectHome, and user swarmd may not enter it)"]
    closed = unreachable_dirs(real)
    if closed:
        d = closed[0]  # the nearest: opening it may not be enough, but it is the first to fix
        return [f"swarmd runs on {where}, and user swarmd cannot enter {d} "
                f"(mode {stat.S_IMODE(os.stat(d).st_mode):04o})"]
    if not os.stat(real).st_mode & stat.S_IXOTH:
        return [f"swarmd runs on {where}, which user swarmd may not execute"]
    return []


INTERPRETER_FIX = ("make the venv from a system Python that every user can run, e.g. "
                   "`/usr/bin/python3 -m venv /opt/swarmd`, and install swarm into it again")


def ours(f: service_files.ServiceFile, text: str) -> bool:
    """Whether `text` is exactly what install-service writes for some swarmd path."""
    m = re.search(r"^ExecStart=(\S+) ", text, re.M)
    try:
        return text == service_files.render(f, m.group(1) if m else service_files.PACKAGED_SWARMD)
    except ValueError:
        return False


def enabled_instances(root: str, pattern: str = "swarmd@*.service") -> list[str]:
    """Enablement links of the units under root's /etc/systemd/system/*.wants/."""
    return sorted(glob.glob(os.path.join(root, "etc/systemd/system/*.wants", pattern)))


class InstallServiceCommand(Command):
    """Install swarmd's systemd units, user and directories for this (pip) install of swarmd."""

    name = "install-service"
    local = True

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", default="/", help="install into this root instead of / (an image, a container)")
        p.add_argument("--swarmd", default=None, help="the swarmd executable the units run "
                                                      "(default: the one beside this swarmctl)")
        p.add_argument("--force", action="store_true", help="replace unit files that exist and differ")
        p.add_argument("--no-activate", action="store_true",
                       help="only write files: do not run systemd-sysusers, systemd-tmpfiles, daemon-reload")
        p.add_argument("--remove", action="store_true",
                       help="undo: stop and disable the units, remove the files written (config, state and user stay)")

    def run(self, args: argparse.Namespace) -> dict:
        root = os.path.abspath(args.root)
        if args.remove:
            return self.remove(root, args)
        swarmd = args.swarmd or default_swarmd()
        if not os.path.isabs(swarmd):
            raise SwarmError(f"--swarmd must be an absolute path: {swarmd}")
        if not (os.path.isfile(swarmd) and os.access(swarmd, os.X_OK)):
            raise SwarmError(f"no swarmd executable at {swarmd} (pass --swarmd PATH)")
        problems = interpreter_problems(swarmd)
        if problems and root == "/":  # the unit would fail to start (exit 126): refuse before writing anything
            raise SwarmError(f"{problems[0]}: {INTERPRETER_FIX}")
        try:
            planned = [(f, service_files.render(f, swarmd)) for f in service_files.SERVICE_FILES]
        except ValueError as e:
            raise SwarmError(str(e)) from None
        files: list[tuple[str, str, str]] = []  # path, text, action
        warnings: list[str] = []
        # check everything before writing anything: a refusal leaves the system as it was
        for f, text in planned:
            path = os.path.join(root, f.admin)
            if os.path.exists(path):
                with open(path) as fh:
                    same = fh.read() == text
                if not same and not args.force:
                    raise SwarmError(f"{path} exists and differs from the unit for {swarmd}; "
                                     "--force replaces it")
                files.append((path, text, "unchanged" if same else "replaced"))
            else:
                files.append((path, text, "wrote"))
        result: dict = {"root": root, "swarmd": swarmd, "files": [], "ran": [], "warnings": warnings}
        try:
            for path, text, action in files:
                if action != "unchanged":
                    service_files.write_file(path, text)
                result["files"].append({"path": path, "action": action})
            config = os.path.join(root, service_files.CONFIG.admin)
            if os.path.exists(config):
                result["files"].append({"path": config, "action": "kept"})
            else:
                service_files.write_file(config, service_files.read(service_files.CONFIG.source))
                result["files"].append({"path": config, "action": "wrote"})
        except OSError as e:
            raise SwarmError(f"cannot write {e.filename}: {e.strerror} (run as root, or pass --root DIR)") from None
        vendor = os.path.join(root, service_files.SERVICE_FILES[0].vendor)
        if os.path.exists(vendor):
            warnings.append(f"{vendor} (the Debian package's unit) exists: the units in /etc override it; "
                            "remove them to go back to the package's")
        if service_files.under_home(swarmd):
            warnings.append(f"{swarmd} is under a home directory: the units use ProtectHome=read-only, and "
                            "user swarmd must be able to read it")
        if root == "/":
            for d in unreachable_dirs(swarmd):
                warnings.append(f"user swarmd cannot enter {d} (mode {stat.S_IMODE(os.stat(d).st_mode):04o}), "
                                "so it cannot run swarmd: install it elsewhere (e.g. /opt) or open that directory")
        # into another root (an image), the same venv may be laid out otherwise there: say it, go on
        warnings += [f"{p}: {INTERPRETER_FIX}" for p in problems]
        if not args.no_activate:
            self._activate(root, result)
        result["next"] = [f"set model: in {config}",
                          "systemctl enable --now swarmd   (or swarmd@N, one per GPU, with /etc/swarmd/swarmd-N.yaml)",
                          "swarmctl status   (as root or a member of group swarmd; drain and rebalance: "
                          "root or a member of swarmd-admin too)",
                          "systemctl enable --now swarm-api   (optional: the OpenAI-compatible API and the swarm "
                          "page on api.listen; needs the api extra)"]
        return result

    def remove(self, root: str, args: argparse.Namespace) -> dict:
        """Remove the units and entries install-service wrote, if they are still as it wrote them
        (else --force). The config, /var/lib/swarmd (the node key) and the user stay."""
        present = []
        for f in service_files.SERVICE_FILES:
            path = os.path.join(root, f.admin)
            if not os.path.exists(path):
                continue
            with open(path) as fh:
                text = fh.read()
            if not ours(f, text) and not args.force:
                raise SwarmError(f"{path} differs from what install-service writes (edited, or not ours); "
                                 "--force removes it anyway")
            present.append(path)
        result: dict = {"root": root, "files": [], "ran": [], "warnings": []}
        systemd = root == "/" and os.path.isdir("/run/systemd/system") and not args.no_activate
        if systemd:  # a drain each, before the unit files go
            units = ["swarmd.service", "swarm-api.service",
                     *sorted({os.path.basename(p) for p in enabled_instances(root)})]
            r = subprocess.run(["systemctl", "disable", "--now", *units], capture_output=True, text=True,
                               timeout=180)
            result["ran"].append(" ".join(["systemctl", "disable", "--now", *units]))
            if r.returncode != 0:
                result["warnings"].append(f"systemctl disable: {r.stderr.strip().splitlines()[-1:]}")
        try:
            for path in present:
                os.unlink(path)
                result["files"].append({"path": path, "action": "removed"})
        except OSError as e:
            raise SwarmError(f"cannot remove {e.filename}: {e.strerror} (run as root, or pass --root DIR)") from None
        for link in (enabled_instances(root) + enabled_instances(root, "swarmd.service")
                     + enabled_instances(root, "swarm-api.service")):
            os.unlink(link)  # enablement left behind by units that no longer exist
            result["files"].append({"path": link, "action": "removed"})
        if systemd:
            subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=60)
            result["ran"].append("systemctl daemon-reload")
        config = os.path.join(root, service_files.CONFIG.admin)
        result["next"] = [f"kept {config}, {os.path.join(root, 'var/lib/swarmd')} (the node key) and user swarmd: "
                          "remove them by hand if this machine leaves the swarm for good"]
        return result

    def _activate(self, root: str, result: dict) -> None:
        """Create the user and directories now, and tell systemd about the new units."""
        rootarg = [] if root == "/" else [f"--root={root}"]
        steps = [
            ("systemd-sysusers", [*rootarg, os.path.join(root, "etc/sysusers.d/swarmd.conf")]),
            ("systemd-tmpfiles", ["--create", *rootarg, os.path.join(root, "etc/tmpfiles.d/swarmd.conf")]),
        ]
        if root == "/" and os.path.isdir("/run/systemd/system"):
            steps.append(("systemctl", ["daemon-reload"]))
        for exe, argv in steps:
            if shutil.which(exe) is None:
                result["warnings"].append(f"{exe} not found: run its step by hand (docs/operations.md)")
                continue
            r = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no message"])[-1]
                raise SwarmError(f"{exe} {' '.join(argv)} failed (exit {r.returncode}): {last}")
            result["ran"].append(" ".join([exe, *argv]))
        if root == "/" and not os.path.isdir("/run/systemd/system"):
            result["warnings"].append("systemd is not running here: run systemctl daemon-reload where it is")

    def format(self, r: dict, args: argparse.Namespace) -> str:
        lines = [f"{f['action']:9} {f['path']}" for f in r["files"]]
        lines += [f"ran       {c}" for c in r["ran"]]
        lines += [f"warning:  {w}" for w in r["warnings"]]
        lines += ["next:"] + [f"  {n}" for n in r["next"]]
        return "\n".join(lines)
