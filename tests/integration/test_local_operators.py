"""Apps and operators on the local socket: every user who may open it gets inference and
status; only operators (root, the daemon's user, members of network.operator_group) drain it
or move its blocks. Who asks is the kernel's word (the socket's peer credentials), so the
requests here come from other users than the test's: children forked by root that drop to
them (forked, not executed: the interpreter may lie where those users cannot read)."""

import json
import os
import shutil
import tempfile

import pytest
from helpers import Daemon

APP_UID = APP_GID = 1  # `daemon` on Debian: neither root nor in the operator group below
OPERATOR_UID, OPERATOR_GID = 65534, 65534  # nobody, whose primary group is nogroup
OPERATOR_GROUP = "nogroup"


def request_as(uid: int, gid: int, socket: str, msg_type: str, fields: dict | None = None) -> dict:
    """One request to the daemon at `socket` from a process of `uid`:`gid` that is also in the
    socket's group (as an app's user is): {"ok": reply fields} or {"code", "message"}."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, ask, write the answer, and never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([os.stat(socket).st_gid])
            os.setgid(gid)
            os.setuid(uid)
            import zmq

            from libswarm.client import SwarmClient
            from libswarm.errors import SwarmError

            ctx = zmq.Context()
            try:
                with SwarmClient(socket=socket, timeout_s=20, context=ctx) as client:
                    out = {"ok": client.request(msg_type, fields or {}).fields}
            except SwarmError as e:
                out = {"code": e.code, "message": str(e)}
            os.write(write_end, json.dumps(out).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"the child of uid {uid} failed"
    return json.loads(data)


def test_an_app_user_may_ask_but_not_drain_or_move_and_an_operator_group_member_drains(model_dirs, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root, to ask as other users")
    run = tempfile.mkdtemp(prefix="swarm-op-")  # a directory other users may enter (tmp_path is 0700)
    os.chmod(run, 0o750)
    socket = os.path.join(run, "swarmd.sock")
    d = Daemon(str(tmp_path), "gw", model_dirs("llama"), "none",
               {"network": {"socket": socket, "operator_group": OPERATOR_GROUP}})
    d.socket = socket
    try:
        d.start([]).wait_ready()
        assert request_as(APP_UID, APP_GID, socket, "status")["ok"]["state"] == "online"
        # a dry run only asks: it reaches the handler (which says that a gateway has no blocks to move)
        dry = request_as(APP_UID, APP_GID, socket, "rebalance", {"dry_run": True})
        assert dry.get("code") == "limit" and "serves no blocks" in dry["message"], dry
        for msg_type in ("drain", "rebalance"):
            refused = request_as(APP_UID, APP_GID, socket, msg_type)
            assert refused.get("code") == "denied", refused
            assert f"`{msg_type}` is for operators (uid {APP_UID} is not one)" in refused["message"]
            assert f"members of group {OPERATOR_GROUP} (network.operator_group)" in refused["message"]
        assert d.alive and d.ctl("status")["state"] == "online"  # nothing was drained
        assert request_as(OPERATOR_UID, OPERATOR_GID, socket, "drain")["ok"]["draining"] is True
        assert d.proc.wait(60) == 0
    finally:
        d.stop()
        shutil.rmtree(run, ignore_errors=True)
