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
