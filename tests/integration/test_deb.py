"""The Debian package: built by tools/build_deb.py (the light variant: the project without its
large dependencies, which the full `make deb` bundles), checked with dpkg-deb, then installed,
run, upgraded, removed and purged with `dpkg --root` in a scratch root."""

import marshal
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from helpers import Daemon

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, "tools", "build_deb.py")
PY = f"python{sys.version_info[0]}.{sys.version_info[1]}"

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None,
                                reason="needs dpkg and dpkg-deb")


def build(tmp, revision: str) -> str:
    out = os.path.join(tmp, f"out{revision}")
    r = subprocess.run([sys.executable, BUILD, "--light", "--revision", revision, "--out", out,
                        "--work", os.path.join(tmp, f"work{revision}"), "--python", sys._base_executable],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (deb,) = os.listdir(out)
    return os.path.join(out, deb)


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("deb"))
    return build(tmp, "1"), build(tmp, "2")


def deb_field(deb: str, field: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", deb, field], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_package_metadata_files_and_scripts(debs, tmp_path):
    deb = debs[0]
    assert os.path.basename(deb) == f"swarmd_{deb_field(deb, 'Version')}_{deb_field(deb, 'Architecture')}.deb"
    assert deb_field(deb, "Package") == "swarmd"
    assert deb_field(deb, "Version").startswith("0.1.0-1+")
    assert f"{PY}" in deb_field(deb, "Depends")
    listing = subprocess.run(["dpkg-deb", "--contents", deb], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in listing.splitlines()]
    paths = {row[5].removeprefix(".") for row in rows}
    assert all(row[1] == "root/root" for row in rows)
    for p in ("/usr/lib/systemd/system/swarmd.service", "/usr/lib/systemd/system/swarmd@.service",
              "/usr/lib/systemd/system/swarm-api.service", "/opt/swarmd/bin/swarm-api",
              f"/opt/swarmd/lib/{PY}/site-packages/libswarm/api/static/index.html",
              "/usr/lib/sysusers.d/swarmd.conf", "/usr/lib/tmpfiles.d/swarmd.conf", "/etc/swarmd/swarmd.yaml",
              "/opt/swarmd/bin/swarmd", "/opt/swarmd/bin/swarmctl", "/opt/swarmd/pyvenv.cfg",
              f"/opt/swarmd/lib/{PY}/site-packages/swarmd/daemon.py",
              f"/opt/swarmd/lib/{PY}/site-packages/libswarm/model.py",
              f"/opt/swarmd/lib/{PY}/site-packages/swarmd/data/swarmd.service",
              "/usr/share/doc/swarmd/operations.md", "/usr/share/doc/swarmd/copyright"):
        assert p in paths, p
    assert "/usr/bin/swarmctl -> /opt/swarmd/bin/swarmctl" in listing
    assert "/usr/bin/swarm-api -> /opt/swarmd/bin/swarm-api" in listing
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in paths)
    assert "/opt/" not in paths and "/opt/swarmd/" in paths  # /opt is the system's, not this package's

    x = tmp_path / "x"
    subprocess.run(["dpkg-deb", "--raw-extract", deb, str(x)], check=True)
    assert (x / "DEBIAN/conffiles").read_text() == "/etc/swarmd/swarmd.yaml\n"
    for script in ("preinst", "postinst", "prerm", "postrm"):
        path = x / "DEBIAN" / script
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!/bin/sh\n")
        assert subprocess.run(["sh", "-n", str(path)]).returncode == 0
        assert path.read_text() == open(os.path.join(ROOT, "packaging/deb", script)).read()
    for unit in ("swarmd.service", "swarmd@.service", "swarm-api.service"):
        shipped = (x / "usr/lib/systemd/system" / unit).read_text()
        assert shipped == open(os.path.join(ROOT, "packaging/systemd", unit)).read()
    # the venv was built elsewhere; nothing in it may name that place
    assert (x / "opt/swarmd/bin/swarmd").read_text().startswith("#!/opt/swarmd/bin/python\n")
    staging = os.path.join(os.path.dirname(os.path.dirname(deb)), "work1").encode()
    for dirpath, _dirs, files in os.walk(x / "opt"):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert staging not in f.read(), os.path.join(dirpath, name)
    cfg = (x / "opt/swarmd/pyvenv.cfg").read_text()
    assert "/opt/swarmd" in cfg and "work1" not in cfg and "include-system-site-packages = false" in cfg
    assert os.readlink(x / "opt/swarmd/bin/python3").startswith(("python3.", "/usr/bin/python3."))
    md5 = (x / "DEBIAN/md5sums").read_text()
    assert f"opt/swarmd/lib/{PY}/site-packages/swarmd/daemon.py" in md5 and "DEBIAN" not in md5


def dpkg(root, *args: str) -> subprocess.CompletedProcess:
    argv = ["dpkg", f"--root={root}", "--log=/dev/null", "--force-script-chrootless", "--force-depends"]
    if os.geteuid() != 0:
        argv.append("--force-not-root")
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def scratch_root(path) -> str:
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"):
        (path / d).mkdir(parents=True)
    (path / "var/lib/dpkg/status").write_text("")
    return str(path)


def test_install_serve_upgrade_remove_purge(debs, tmp_path, model_dirs):
    root = scratch_root(tmp_path / "root")
    r = dpkg(root, "-i", debs[0])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "set 'model:' in /etc/swarmd/swarmd.yaml" in r.stdout
    status = dpkg(root, "-s", "swarmd").stdout
    assert "Status: install ok installed" in status and "Version: 0.1.0-1+" in status
    opt = os.path.join(root, "opt/swarmd")
    site = os.path.join(opt, "lib", PY, "site-packages")
    if shutil.which("systemd-sysusers"):
        passwd = open(os.path.join(root, "etc/passwd")).read()
        assert any(line.startswith("swarmd:") for line in passwd.splitlines())
    assert os.stat(os.path.join(root, "var/lib/swarmd")).st_mode & 0o777 == 0o700
    assert os.path.isdir(os.path.join(root, "etc/swarmd/peers.d"))
    # postinst compiled the venv, naming the files where they will be, not where dpkg put them
    pyc = [f for f in os.listdir(os.path.join(site, "swarmd", "__pycache__")) if f.startswith("daemon.")]
    with open(os.path.join(site, "swarmd", "__pycache__", pyc[0]), "rb") as f:
        code = marshal.loads(f.read()[16:])
    assert code.co_filename == f"/opt/swarmd/lib/{PY}/site-packages/swarmd/daemon.py"

    # the installed daemon serves (its dependencies lent by this venv: the light build has none;
    # the scripts' #!/opt/swarmd/bin/python is outside the scratch root, so its python runs them)
    python = os.path.join(opt, "bin/python")
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    daemon = Daemon(str(tmp_path), "pkg", model_dirs("llama"), "0:6")
    daemon.write_config([])
    with open(daemon.log_path, "ab") as log:
        daemon.proc = subprocess.Popen([python, os.path.join(opt, "bin/swarmd"), "--config", daemon.config_path],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        daemon.wait_ready(timeout=90)
        out = subprocess.run([python, os.path.join(opt, "bin/swarmctl"), "--socket", daemon.socket, "status"],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert "0:6" in out.stdout
        assert daemon.stop() == 0
    finally:
        if daemon.alive:
            daemon.kill()

    # upgrade: an edited conffile is kept
    conf = os.path.join(root, "etc/swarmd/swarmd.yaml")
    with open(conf, "a") as f:
        f.write("# edited by the operator\n")
    r = dpkg(root, "-i", debs[1])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Version: 0.1.0-2+" in dpkg(root, "-s", "swarmd").stdout
    assert open(conf).read().endswith("# edited by the operator\n")

    # remove: the program goes (bytecode included), config and state stay
    models = os.path.join(root, "srv/swarmd/models")
    assert oct(os.stat(models).st_mode & 0o7777) == oct(0o2775)  # every app may read the models there
    for path in ("var/lib/swarmd/node.key", "var/lib/swarmd/throughput.json", "srv/swarmd/models/w.safetensors"):
        with open(os.path.join(root, path), "w") as f:
            f.write("x")
    r = dpkg(root, "-r", "swarmd")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not os.path.exists(opt), os.listdir(opt)
    assert not os.path.exists(os.path.join(root, "usr/lib/systemd/system/swarmd.service"))
    assert os.path.exists(conf) and os.path.exists(os.path.join(root, "var/lib/swarmd/node.key"))

    # purge: the config and what the daemon made go; what the operator put there stays
    r = dpkg(root, "-P", "swarmd")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not os.path.exists(os.path.join(root, "etc/swarmd"))
    assert not os.path.exists(os.path.join(root, "var/lib/swarmd"))
    assert os.path.isdir(os.path.join(root, "opt"))  # not the package's to remove
    assert os.listdir(models) == ["w.safetensors"]
    assert "swarmd" not in dpkg(root, "-l").stdout.split()
