from __future__ import annotations

import argparse

from swarmd.commands.base import Command


class DrainCommand(Command):
    """Stop gracefully: publish draining, take no new sessions, let open ones finish (or fail
    over), publish offline and exit 0."""

    name = "drain"
    request_type = "drain"

    def format(self, r: dict, args: argparse.Namespace) -> str:
        n = r["sessions"]
        return f"draining: no new sessions; {n} open session{'' if n == 1 else 's'} may finish, then swarmd exits"
