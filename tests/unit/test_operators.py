"""Who is an operator on the local socket (swarmd/operators.py), without a daemon."""

import grp
import os
import pwd

import pytest
import zmq

from libswarm.errors import AccessDeniedError
from libswarm.protocol import Message
from swarmd.operators import Operators, PeerCred, needs_operator, peer_cred


def test_the_kernels_credentials_of_an_ipc_peer_are_read_from_its_frames(tmp_path):
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind(f"ipc://{tmp_path}/s.sock")
        dealer.connect(f"ipc://{tmp_path}/s.sock")
        dealer.send(b"hello")
        assert router.poll(5000)
        frames = router.recv_multipart(copy=False)
        assert peer_cred(frames[1]) == PeerCred(os.getuid(), os.getgid(), os.getpid())
        assert peer_cred(b"not a received frame") is None
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_root_the_daemons_user_and_the_operator_group_are_operators_and_no_one_else():
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name  # nobody's primary group: a member without being listed
    stranger = PeerCred(4242, 4242, 1)
    ops = Operators(group, own_uid=999)
    assert ops.allows(PeerCred(0, 4242, 1)) and ops.allows(PeerCred(999, 4242, 1))
    assert ops.allows(PeerCred(nobody.pw_uid, 4242, 1))  # by the group database
    assert ops.allows(PeerCred(4242, nobody.pw_gid, 1))  # by the process's own group (sg)
    assert not ops.allows(stranger) and not ops.allows(None)
    assert not Operators(None, own_uid=999).allows(PeerCred(nobody.pw_uid, nobody.pw_gid, 1))
    assert not Operators("no-such-group-here", own_uid=999).allows(PeerCred(nobody.pw_uid, nobody.pw_gid, 1))


def test_only_commands_that_change_what_is_served_need_an_operator_and_a_refusal_says_who_may():
    assert needs_operator(Message("drain", 1, {}))
    assert needs_operator(Message("rebalance", 1, {})) and needs_operator(Message("rebalance", 1, {"dry_run": False}))
    for msg in (Message("rebalance", 1, {"dry_run": True}), Message("status", 1, {}), Message("open", 1, {})):
        assert not needs_operator(msg)

    class Frame:
        def get(self, name):
            return "localhost:4242:4242:77" if name == "Peer-Address" else None

    with pytest.raises(AccessDeniedError, match=r"`drain` is for operators \(uid 4242 is not one\).*group "
                                                r"swarmd-admin \(network.operator_group\)"):
        Operators("swarmd-admin", own_uid=999).check(Frame(), Message("drain", 1, {}))
