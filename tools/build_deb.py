#!/usr/bin/env python3
"""Build the swarmd Debian package with dpkg-deb: a self-contained venv under /opt/swarmd, the
systemd units, sysusers and tmpfiles entries, /etc/swarmd/swarmd.yaml as a conffile, and
maintainer scripts (packaging/deb/) that create the user and tell systemd.

    python tools/build_deb.py [--out dist] [--torch torch==2.13.0] [--torch-index URL] [--extras gpu]
                              [--lock requirements.lock]
    python tools/build_deb.py --light   # the project alone, without its dependencies (tests)

Torch is whatever `--torch` resolves to from pip's sources plus `--torch-index`: CPU where pip's
sources hold the CPU wheel (this project's build machines), CUDA with
`--torch-index https://download.pytorch.org/whl/cu128`. The variant is named in the package's
version (`0.1.0-1+cpu`, `+cu128`). The venv is built at a staging path and its few absolute
paths (script shebangs, pyvenv.cfg) are rewritten to /opt/swarmd; nothing is byte-compiled here,
postinst does it in place.

Every dependency gets the version the lock (requirements.lock, `make lock`) pins: the package holds
what the last green run tested. A CUDA build (`--torch-index`) takes torch and what only it needs
from that index instead; the rest stays pinned."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from swarmd import service_files  # noqa: E402
from swarmd.service_files import write_file  # noqa: E402

PREFIX = "/opt/swarmd"
DOCS = ["README.md", "docs/operations.md", "docs/protocol.md"]
SCRIPTS = ["preinst", "postinst", "prerm", "postrm"]
# directories of the system, not of this package: not listed in it (preinst makes /opt if missing)
SYSTEM_DIRS = {"./opt"}


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(argv), flush=True)
    return subprocess.run(argv, check=True, **kw)


def project_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        m = re.search(r'^version = "([^"]+)"', f.read(), re.M)
    if not m:
        raise SystemExit("build_deb: no version in pyproject.toml")
    return m.group(1)


def build_wheel(workdir: str) -> str:
    """The project's own wheel, built with this interpreter's setuptools (no download)."""
    out = os.path.join(workdir, "wheel")
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT]
    try:
        import setuptools  # noqa: F401
        argv.insert(5, "--no-build-isolation")
    except ImportError:
        pass
    run(argv)
    (whl,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    return os.path.join(out, whl)


def constraints_from_lock(lock_text: str, drop: frozenset[str] = frozenset()) -> str:
    """The lock's pins as a pip constraints file, without hashes: pip takes a constraint with
    hashes as an order to check every file by hash, the project's own wheel included, which has
    none. The versions are what makes the build reproducible; `drop` names packages (normalized)
    another source provides."""
    pins = []
    for line in lock_text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m and re.sub(r"[-_.]+", "-", m.group(1)).lower() not in drop:
            pins.append(f"{m.group(1)}=={m.group(2)}\n")
    if not pins:
        raise SystemExit("build_deb: the lock pins nothing (is it a pip-compile output?)")
    return "".join(pins)


def make_venv(python: str, venv: str, args: argparse.Namespace, wheel: str) -> None:
    run([python, "-m", "venv", "--without-pip", venv])
    pip = [sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "-q",
           "--no-compile"]
    if args.light:
        run([*pip, "--no-deps", wheel])
        return
    index = ["--extra-index-url", args.torch_index] if args.torch_index else []
    with open(args.lock) as f:
        pins = constraints_from_lock(f.read(), frozenset({"torch"}) if args.torch_index else frozenset())
    constraints = os.path.join(os.path.dirname(wheel), "constraints.txt")
    with open(constraints, "w") as f:
        f.write(pins)
    index += ["-c", constraints]
    # torch first and alone, so the project's dependencies cannot pull another build of it
    run([*pip, *index, args.torch])
    # swarm-api ships in every package: its unit is there, disabled until the operator enables it
    extras = ",".join(["api", *filter(None, args.extras.split(","))])
    run([*pip, *index, f"swarmd[{extras}] @ file://{wheel}"])


def relocate(venv: str) -> None:
    """Point the venv's absolute paths at PREFIX, where dpkg will put it."""
    for dirpath, dirs, files in os.walk(venv):
        for name in files:
            path = os.path.join(dirpath, name)
            if name.endswith(".pyc") or os.path.islink(path):
                continue
            if name == "direct_url.json":  # names the build's wheel path; pip does not need it
                os.unlink(path)
                continue
            with open(path, "rb") as f:
                data = f.read()
            if venv.encode() in data:
                if b"\0" in data:
                    raise SystemExit(f"build_deb: binary file names the staging path: {path}")
                with open(path, "wb") as f:
                    f.write(data.replace(venv.encode(), PREFIX.encode()))
        for d in [d for d in dirs if d == "__pycache__"]:
            shutil.rmtree(os.path.join(dirpath, d))
            dirs.remove(d)


def torch_variant(venv: str) -> str:
    """'cpu', 'cuXYZ', or '' (no torch: the light build)."""
    for dirpath, _dirs, files in os.walk(os.path.join(venv, "lib")):
        if dirpath.endswith(os.path.join("site-packages", "torch")) and "version.py" in files:
            with open(os.path.join(dirpath, "version.py")) as f:
                m = re.search(r"^cuda\s*(?::\s*\S+\s*)?=\s*['\"]?([\w.]+)", f.read(), re.M)
            cuda = m.group(1) if m else "None"
            return "cpu" if cuda == "None" else "cu" + cuda.replace(".", "")
    return ""


def stage_files(stage: str) -> None:
    for f in service_files.SERVICE_FILES:
        write_file(os.path.join(stage, f.vendor), service_files.render(f))
    write_file(os.path.join(stage, service_files.CONFIG.vendor), service_files.read(service_files.CONFIG.source))
    doc = os.path.join(stage, "usr/share/doc/swarmd")
    for name in DOCS:
        with open(os.path.join(ROOT, name)) as src:
            write_file(os.path.join(doc, os.path.basename(name)), src.read())
    write_file(os.path.join(doc, "copyright"),
          "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
          "Upstream-Name: swarm\n\nFiles: *\nCopyright: the swarm authors\nLicense: Apache-2.0\n"
          " On Debian systems the license is in /usr/share/common-licenses/Apache-2.0.\n"
          " /opt/swarmd/lib holds Python packages under their own licenses (see each one's\n"
          " dist-info directory).\n")
    os.makedirs(os.path.join(stage, "usr/bin"), exist_ok=True)
    for exe in ("swarmd", "swarmctl", "swarm-api"):
        os.symlink(f"{PREFIX}/bin/{exe}", os.path.join(stage, "usr/bin", exe))


def control(version: str, arch: str, python_ver: str, size_kib: int, light: bool) -> str:
    desc = (" This is a test build: the daemon and libswarm without their dependencies.\n" if light else
            " Self-contained: the daemon, libswarm and their Python dependencies, PyTorch\n"
            " included, live in a virtual environment under /opt/swarmd.\n")
    return (f"Package: swarmd\nVersion: {version}\nArchitecture: {arch}\n"
            "Maintainer: swarm developers <swarm@localhost>\n"
            f"Installed-Size: {size_kib}\nDepends: python{python_ver}, libc6\n"
            "Section: net\nPriority: optional\nHomepage: https://github.com/swarm/swarm\n"
            "Description: serve and run large language models over a swarm of donated GPUs\n"
            " swarmd serves a contiguous span of a model's transformer blocks to a swarm over\n"
            " ZeroMQ and routes local apps' requests (libswarm, swarmctl) through a chain of\n"
            " servers that covers the whole model. Runs as the systemd service swarmd.service\n"
            " (swarmd@N.service, one per GPU). swarm-api.service, off by default, serves an\n"
            " OpenAI-compatible HTTP API and a live page of the swarm.\n" + desc)


def md5sums(stage: str) -> str:
    lines = []
    for dirpath, dirs, files in os.walk(stage):
        dirs[:] = sorted(d for d in dirs if not (dirpath == stage and d == "DEBIAN"))
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                digest = hashlib.md5(f.read()).hexdigest()
            lines.append(f"{digest}  {os.path.relpath(path, stage)}\n")
    return "".join(lines)


def dir_kib(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return (total + 1023) // 1024


def disown(deb: str, work: str, compress: str) -> None:
    """Rewrite the package's data without the entries of directories the system owns (dpkg-deb
    lists every directory of the tree: a package listing ./opt/, which no Debian package owns,
    makes its purge remove an empty /opt), then compress it. dpkg-deb builds the members; `ar`
    and `xz`/`gzip`/`zstd` put them back together."""
    import tarfile

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    run(["ar", "x", deb], cwd=work)
    src, dst = os.path.join(work, "data.tar"), os.path.join(work, "data.new.tar")
    with tarfile.open(src, "r:") as tin, tarfile.open(dst, "w:", format=tarfile.GNU_FORMAT) as tout:
        for member in tin:
            if member.isdir() and member.name.rstrip("/") in SYSTEM_DIRS:
                continue
            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
    os.replace(dst, src)
    data = "data.tar"
    if compress != "none":
        tool = {"xz": ["xz", "-T0", "-6"], "gzip": ["gzip", "-9n"], "zstd": ["zstd", "-q", "-19", "-T0", "--rm"]}
        run([*tool[compress], src], cwd=work)
        data = "data.tar." + {"xz": "xz", "gzip": "gz", "zstd": "zst"}[compress]
    os.remove(deb)
    control = next(n for n in os.listdir(work) if n.startswith("control.tar"))
    run(["ar", "rc", deb, "debian-binary", control, data], cwd=work)  # in this order, as dpkg requires
    shutil.rmtree(work)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "dist"), help="where the .deb goes (default: dist/)")
    p.add_argument("--work", default=os.path.join(ROOT, "build", "deb"), help="staging directory")
    p.add_argument("--python", default="/usr/bin/python3",
                   help="the interpreter the package's venv uses (it becomes a dependency)")
    p.add_argument("--torch", default="torch==2.13.0", help="the PyTorch requirement (default torch==2.13.0)")
    p.add_argument("--torch-index", default="", help="an extra index for PyTorch's builds (CPU or a CUDA version)")
    p.add_argument("--lock", default=os.path.join(ROOT, "requirements.lock"),
                   help="the versions every dependency gets (default: the repo's requirements.lock)")
    p.add_argument("--extras", default="", help="the project's extras to include, e.g. gpu (bitsandbytes, cupy)")
    p.add_argument("--revision", default="1", help="the Debian revision (default 1)")
    p.add_argument("--light", action="store_true", help="the project without its dependencies (a test build)")
    p.add_argument("--compress", default="xz", choices=["xz", "gzip", "zstd", "none"])
    args = p.parse_args(argv)

    for tool in ("dpkg-deb", "dpkg"):
        if shutil.which(tool) is None:
            raise SystemExit(f"build_deb: {tool} not found (apt install dpkg-dev)")
    t0 = time.monotonic()
    python = os.path.realpath(args.python)
    python_ver = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    arch = subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()
    work = os.path.abspath(args.work)
    stage = os.path.join(work, "root")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    wheel = build_wheel(work)
    venv = os.path.join(stage, PREFIX.lstrip("/"))
    make_venv(python, venv, args, wheel)  # bin/python3 -> /usr/bin/python3.X: a python3 upgrade cannot break it
    variant = torch_variant(venv)
    relocate(venv)
    stage_files(stage)

    version = f"{project_version()}-{args.revision}" + (f"+{variant}" if variant else "+light")
    debian = os.path.join(stage, "DEBIAN")
    write_file(os.path.join(debian, "control"), control(version, arch, python_ver, dir_kib(stage), args.light))
    write_file(os.path.join(debian, "conffiles"), f"/{service_files.CONFIG.vendor}\n")
    for name in SCRIPTS:
        shutil.copy(os.path.join(ROOT, "packaging", "deb", name), os.path.join(debian, name))
        os.chmod(os.path.join(debian, name), 0o755)
    write_file(os.path.join(debian, "md5sums"), md5sums(stage))

    os.makedirs(args.out, exist_ok=True)
    deb = os.path.join(os.path.abspath(args.out), f"swarmd_{version}_{arch}.deb")
    run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", stage, deb], stdout=subprocess.DEVNULL)
    disown(deb, os.path.join(work, "ar"), args.compress)
    installed = dir_kib(stage) / 1024
    print(f"built {deb}: {os.path.getsize(deb) / 2**20:.1f} MiB, {installed:.0f} MiB installed, "
          f"torch {variant or 'none'}, python {python_ver}, {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
