"""Who may run operator commands on the local plane.

The socket (mode 0660, group swarmd) lets in every member of its group: apps, and swarm-api.
A command that changes what the daemon serves (`drain` stops it, `rebalance` moves its
blocks) is for operators only: root, the daemon's own user, and members of
`network.operator_group` (swarmd-admin by default; when no such group exists, root and the
daemon's user alone). Apps keep inference, `status`, `peers`, `key` and `rebalance --dry-run`.

Who asks is what the kernel says of the connection, never what the caller claims: ZeroMQ
reads SO_PEERCRED when an ipc:// peer connects and puts it in each of its messages'
Peer-Address as `host:uid:gid:pid` (libzmq on Linux). A message without it (another
platform, or a libzmq built without it) is refused: a check that cannot be made is not
passed."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

import zmq

from libswarm.errors import AccessDeniedError
from libswarm.protocol import Message


@dataclass(frozen=True)
class PeerCred:
    uid: int
    gid: int  # the process's effective group (SO_PEERCRED has no supplementary groups)
    pid: int


def peer_cred(frame) -> PeerCred | None:
    """The credentials ZeroMQ recorded for the connection `frame` came over, if any."""
    try:
        value = frame.get("Peer-Address")
    except (AttributeError, zmq.ZMQError):  # not a received frame, or no such property
        return None
    parts = value.rsplit(":", 3) if isinstance(value, str) else []
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None
    return PeerCred(int(parts[1]), int(parts[2]), int(parts[3]))


def needs_operator(msg: Message) -> bool:
    """Whether `msg` changes what this daemon serves: a dry run of `rebalance` only asks."""
    if msg.type == "drain":
        return True
    return msg.type == "rebalance" and not msg.get("dry_run")


class Operators:
    """`network.operator_group` (None: root and the daemon's own user only)."""

    def __init__(self, group: str | None, own_uid: int | None = None):
        self.group = group
        self.own_uid = os.geteuid() if own_uid is None else own_uid

    def allows(self, cred: PeerCred | None) -> bool:
        if cred is None:
            return False
        if cred.uid in (0, self.own_uid):
            return True
        return self._in_group(cred)

    def _in_group(self, cred: PeerCred) -> bool:
        """Looked up at each question (they are rare): a user added to the group, or removed
        from it, counts from their next command on, without a restart."""
        if self.group is None:
            return False
        try:
            group = grp.getgrnam(self.group)
        except KeyError:
            return False
        if cred.gid == group.gr_gid:  # e.g. `sg swarmd-admin swarmctl drain`
            return True
        try:
            user = pwd.getpwuid(cred.uid)
        except KeyError:
            return False
        return user.pw_gid == group.gr_gid or user.pw_name in group.gr_mem

    def check(self, frame, msg: Message) -> None:
        """AccessDeniedError unless the connection `frame` came over is an operator's."""
        cred = peer_cred(frame)
        if self.allows(cred):
            return
        who = f"uid {cred.uid}" if cred is not None else "a caller whose uid this socket does not tell"
        group = f", or members of group {self.group}" if self.group else ""
        raise AccessDeniedError(f"`{msg.type}` is for operators ({who} is not one): root, the daemon's "
                                f"own user{group} (network.operator_group); run it as one, e.g. with sudo")
