from __future__ import annotations

import argparse

from swarmd.commands.base import Command


class KeyCommand(Command):
    """Print this node's public key (its node id), to list it in other nodes' seeds or peers.d."""

    name = "key"
    request_type = "key"

    def format(self, r: dict, args: argparse.Namespace) -> str:
        return r["public_key"]
