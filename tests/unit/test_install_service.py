"""`swarmctl install-service`: the units, sysusers and tmpfiles entries for a pip-installed swarmd,
written into a scratch root (--root), with the user and directories created there."""

import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest
from localswarm import SWARMCTL, SWARMD

from swarmd import service_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def install(root, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([SWARMCTL, "--json", "install-service", "--root", str(root), *extra],
                          capture_output=True, text=True, timeout=60)


def test_writes_units_user_dirs_and_config(tmp_path):
    (tmp_path / "etc").mkdir()
    r = install(tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["swarmd"] == SWARMD
    actions = {os.path.relpath(f["path"], tmp_path): f["action"] for f in out["files"]}
    assert actions == {"etc/systemd/system/swarmd.service": "wrote", "etc/systemd/system/swarmd@.service": "wrote",
                       "etc/systemd/system/swarm-api.service": "wrote",
                       "etc/sysusers.d/swarmd.conf": "wrote", "etc/tmpfiles.d/swarmd.conf": "wrote",
                       "etc/swarmd/swarmd.yaml": "wrote"}
    bin_dir = os.path.dirname(SWARMD)
    for name in ("swarmd.service", "swarmd@.service", "swarm-api.service"):
        unit = (tmp_path / "etc/systemd/system" / name).read_text()
        exe = "swarm-api" if name == "swarm-api.service" else "swarmd"
        assert f"ExecStart={bin_dir}/{exe} --config /etc/swarmd/swarmd" in unit
        assert "/opt/swarmd" not in unit
        # the rest is the packaged unit, line for line
        with open(os.path.join(ROOT, "packaging/systemd", name)) as f:
            expected = f.read().replace("/opt/swarmd/bin/", bin_dir + "/")
        if service_files.under_home(SWARMD):  # a checkout in a home directory: the one line that differs
            expected = expected.replace("ProtectHome=yes\n", f"# {SWARMD} lies in a home directory: readable "
                                        "(not writable) by the service\nProtectHome=read-only\n")
        assert unit == expected
    assert (tmp_path / "etc/swarmd/swarmd.yaml").read_text() == open(os.path.join(ROOT, "etc/swarmd.yaml")).read()
    if shutil.which("systemd-sysusers"):
        passwd = (tmp_path / "etc/passwd").read_text()
        assert any(line.startswith("swarmd:") and line.split(":")[5] == "/var/lib/swarmd"
                   for line in passwd.splitlines())
        # swarm-api: a user of its own, in group swarmd (the socket), not swarmd itself
        assert any(line.startswith("swarm-api:") for line in passwd.splitlines())
        group = (tmp_path / "etc/group").read_text()
        assert "swarm-api" in next(line for line in group.splitlines() if line.startswith("swarmd:")).split(":")[3]
        assert any("systemd-sysusers" in c for c in out["ran"])
    if shutil.which("systemd-tmpfiles"):
        assert oct((tmp_path / "var/lib/swarmd").stat().st_mode & 0o777) == oct(0o700)
        assert oct((tmp_path / "srv/swarmd/models").stat().st_mode & 0o7777) == oct(0o2775)
        assert (tmp_path / "etc/swarmd/peers.d").is_dir()
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "etc/systemd/system/swarmd.service")],
                           capture_output=True, text=True, timeout=60)
        assert v.returncode == 0, v.stderr


def test_rerun_keeps_config_and_refuses_to_clobber_a_changed_unit(tmp_path):
    assert install(tmp_path, "--no-activate").returncode == 0
    config = tmp_path / "etc/swarmd/swarmd.yaml"
    config.write_text("model: /srv/models/mine\n")
    r = install(tmp_path, "--no-activate")
    assert r.returncode == 0, r.stderr
    actions = {os.path.basename(f["path"]): f["action"] for f in json.loads(r.stdout)["files"]}
    assert actions["swarmd.service"] == "unchanged" and actions["swarmd.yaml"] == "kept"
    assert config.read_text() == "model: /srv/models/mine\n"

    unit = tmp_path / "etc/systemd/system/swarmd.service"
    unit.write_text(unit.read_text() + "# an operator's edit\n")
    tmpfiles = tmp_path / "etc/tmpfiles.d/swarmd.conf"
    tmpfiles.unlink()
    r = install(tmp_path, "--no-activate")
    assert r.returncode == 1
    err = r.stderr.strip()
    assert "\n" not in err and "swarmd.service exists and differs" in err and "--force" in err
    # refused before writing anything
    assert unit.read_text().endswith("# an operator's edit\n") and not tmpfiles.exists()

    r = install(tmp_path, "--no-activate", "--force")
    assert r.returncode == 0, r.stderr
    assert "operator's edit" not in unit.read_text() and tmpfiles.exists()
    assert config.read_text() == "model: /srv/models/mine\n"


def test_remove_undoes_the_install_but_keeps_config_and_state(tmp_path):
    assert install(tmp_path, "--no-activate").returncode == 0
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    for unit in ("swarmd.service", "swarmd@0.service"):
        (wants / unit).symlink_to("/etc/systemd/system/" + unit.replace("@0", "@"))
    (tmp_path / "var/lib/swarmd").mkdir(parents=True)
    (tmp_path / "var/lib/swarmd/node.key").write_text("secret")
    unit = tmp_path / "etc/systemd/system/swarmd.service"
    unit.write_text(unit.read_text().replace("RestartSec=5s", "RestartSec=9s"))

    r = install(tmp_path, "--remove", "--no-activate")
    assert r.returncode == 1 and "swarmd.service differs" in r.stderr and "--force" in r.stderr
    assert unit.exists() and (wants / "swarmd@0.service").is_symlink()  # refused: nothing removed

    r = install(tmp_path, "--remove", "--no-activate", "--force")
    assert r.returncode == 0, r.stderr
    removed = {os.path.relpath(f["path"], tmp_path) for f in json.loads(r.stdout)["files"]}
    assert removed == {"etc/systemd/system/swarmd.service", "etc/systemd/system/swarmd@.service",
                       "etc/systemd/system/swarm-api.service",
                       "etc/sysusers.d/swarmd.conf", "etc/tmpfiles.d/swarmd.conf",
                       "etc/systemd/system/multi-user.target.wants/swarmd.service",
                       "etc/systemd/system/multi-user.target.wants/swarmd@0.service"}
    assert not any(os.path.lexists(tmp_path / p) for p in removed)
    assert (tmp_path / "etc/swarmd/swarmd.yaml").exists() and (tmp_path / "var/lib/swarmd/node.key").exists()

    # what install-service wrote, even for a swarmd since deleted, is recognised as its own
    assert install(tmp_path, "--no-activate").returncode == 0
    r = install(tmp_path, "--remove", "--no-activate", "--swarmd", "/gone/bin/swarmd")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "etc/systemd/system/swarmd.service").exists()


def test_warns_when_a_package_unit_is_overridden(tmp_path):
    before = json.loads(install(tmp_path, "--no-activate").stdout)["warnings"]
    assert not [w for w in before if "Debian package's unit" in w]
    (tmp_path / "usr/lib/systemd/system").mkdir(parents=True)
    (tmp_path / "usr/lib/systemd/system/swarmd.service").write_text("[Service]\n")
    warnings = json.loads(install(tmp_path, "--no-activate").stdout)["warnings"]
    assert any("Debian package's unit" in w and "override" in w for w in warnings)


def test_bad_swarmd_and_unwritable_root_are_one_line_errors(tmp_path):
    r = install(tmp_path, "--swarmd", str(tmp_path / "nope"))
    assert r.returncode == 1 and f"no swarmd executable at {tmp_path / 'nope'}" in r.stderr
    assert not (tmp_path / "etc").exists()
    afile = tmp_path / "a-file"
    afile.write_text("")
    r = install(afile, "--no-activate")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "cannot write" in r.stderr and "--root" in r.stderr


@pytest.mark.parametrize("path, protect", [("/home/ann/venv/bin/swarmd", "read-only"),
                                           ("/usr/local/bin/swarmd", "yes")])
def test_a_swarmd_in_a_home_directory_gets_a_readable_home(path, protect):
    unit = service_files.render(service_files.SERVICE_FILES[0], path)
    assert f"ExecStart={path} --config" in unit
    assert f"\nProtectHome={protect}\n" in unit
    with pytest.raises(ValueError, match="absolute"):
        service_files.render(service_files.SERVICE_FILES[0], "venv/bin/swarmd")


def venv_on(tmp_path, python_dir_mode: int):
    """A venv-like swarmd whose bin/python links to an interpreter in a directory of that mode."""
    private = tmp_path / "opt" / "pythons"
    private.mkdir(parents=True)
    real = private / "python3.11"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    private.chmod(python_dir_mode)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python3").symlink_to(real)
    swarmd = venv / "swarmd"
    swarmd.write_text(f"#!{venv / 'python3'}\nimport sys\n")
    swarmd.chmod(0o755)
    return str(swarmd), str(private)


def test_an_interpreter_the_service_user_cannot_enter_is_named_with_the_fix(tmp_path):
    from swarmd.commands.install_service import interpreter_problems

    top = tempfile.mkdtemp(prefix="swarm-venv-", dir="/tmp")  # pytest's own tmp_path sits in a 0700 folder
    os.chmod(top, 0o755)
    swarmd, private = venv_on(pathlib.Path(top), 0o700)
    try:
        (problem,) = interpreter_problems(swarmd)
        assert f"cannot enter {private} (mode 0700)" in problem and "-> " in problem
        (tmp_path / "etc").mkdir()
        r = install(tmp_path, "--swarmd", swarmd, "--no-activate")  # into an image: said, not refused
        assert r.returncode == 0, r.stderr
        assert any(private in w and "/usr/bin/python3 -m venv" in w for w in json.loads(r.stdout)["warnings"])
        os.chmod(private, 0o755)
        assert interpreter_problems(swarmd) == []
    finally:
        shutil.rmtree(top)


def test_an_interpreter_under_a_home_directory_is_refused_on_the_real_system():
    from swarmd.commands.install_service import interpreter_problems

    # the project's own venv on these machines links to pyenv's Python under /root
    if not interpreter_problems(SWARMD):
        pytest.skip("this venv's interpreter is outside home directories")
    r = subprocess.run([SWARMCTL, "install-service", "--no-activate"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "home directory" in r.stderr or "cannot enter" in r.stderr
    assert "/usr/bin/python3 -m venv" in r.stderr
