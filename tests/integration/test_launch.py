"""The suite forks its daemons from a process that imported torch once (localswarm.fork_daemons).
A forked daemon must be what the `swarmd` script would have been wherever the tests look: its
exit status, its log, its environment, its own session, its death by a signal."""

import os
import signal

from helpers import Daemon


def test_a_forked_daemon_exits_logs_and_dies_as_the_script_does(model_dirs, tmp_path):
    missing = str(tmp_path / "no-such-model")
    for fork in (False, True):
        bad = Daemon(str(tmp_path), f"bad-fork-{fork}", missing, "0:6", fork=fork)
        bad.start([])
        assert bad.proc is not None and bad.proc.wait(60) == 2
        assert f"ERROR swarmd: model directory {missing} does not exist" in bad.tail()

    # its own environment (JOURNAL_STREAM drops the time from log lines), session and signals
    d = Daemon(str(tmp_path), "forked", model_dirs("llama"), "0:6", env={"JOURNAL_STREAM": "8:1"})
    try:
        d.start([]).wait_ready()
        assert d.proc is not None and type(d.proc).__name__ == "Forked"
        assert os.getpgid(d.proc.pid) == d.proc.pid
        assert "\nINFO swarmd: online: model " in d.tail()
        d.kill()
        assert d.proc.returncode == -signal.SIGKILL and not d.alive
    finally:
        d.stop()


NOBODY = 65534  # a uid and gid that exist on Debian (nobody, nogroup) and are not root's


def test_root_refuses_a_state_dir_of_the_service_user_and_gives_the_socket_its_directorys_group(
        model_dirs, tmp_path):
    if os.geteuid() != 0:
        import pytest

        pytest.skip("runs as root, as an operator who starts swarmd by hand does")
    # the service user's state dir: root must not leave a node key there that swarmd cannot read
    d = Daemon(str(tmp_path), "by-hand", model_dirs("llama"), "0:6")
    os.makedirs(d.cfg["state_dir"])
    os.chown(d.cfg["state_dir"], NOBODY, NOBODY)
    d.start([])
    assert d.proc is not None and d.proc.wait(60) == 2
    line = d.tail().strip().splitlines()[-1]
    assert "belongs to user" in line and "runuser -u" in line and "systemctl start swarmd" in line
    assert os.listdir(d.cfg["state_dir"]) == []  # no root-owned key was made

    # a socket directory of the service's group (systemd's RuntimeDirectory): the socket keeps it
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, 0, NOBODY)
    ok = Daemon(str(tmp_path), "root-socket", model_dirs("llama"), "0:6",
                {"network": {"socket": str(run / "swarmd.sock")}})
    ok.socket = str(run / "swarmd.sock")
    try:
        ok.start([]).wait_ready()
        st = os.stat(ok.socket)
        assert st.st_gid == NOBODY and st.st_mode & 0o777 == 0o660
    finally:
        ok.stop()


def test_serve_dtype_auto_serves_in_the_dtype_chosen_for_this_cpu(model_dirs, tmp_path):
    """A daemon with serve.dtype auto on a CPU computes, announces and reports the dtype chosen
    for it (kept in throughput.json): bfloat16 where the CPU computes it natively and it was
    timed faster (written here as if it had been), float32 on a CPU without it."""
    import json

    from libswarm.checkpoint import Checkpoint
    from libswarm.client import SwarmClient
    from swarmd.runtime.speed import native_bf16

    model = model_dirs("llama")
    d = Daemon(str(tmp_path), "auto-dtype", model, "0:6", {"serve": {"dtype": "auto"}})
    os.makedirs(d.cfg["state_dir"])
    with open(os.path.join(d.cfg["state_dir"], "throughput.json"), "w") as f:
        json.dump({f"{Checkpoint(model).model_id}:cpu:auto": {"dtype": "bfloat16"}}, f)
    try:
        d.start([]).wait_ready()
        want = "bfloat16" if native_bf16() else "float32"
        assert SwarmClient(socket=d.socket).status()["serve"]["dtype"] == want
        assert f"as {want}" in d.tail()  # "loading blocks 0:6 of ... on cpu as bfloat16"
    finally:
        d.stop()
