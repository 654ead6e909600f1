"""swarmctl commands, registered explicitly: name -> class."""

from swarmd.commands.base import Command
from swarmd.commands.peers import PeersCommand
from swarmd.commands.status import StatusCommand

COMMANDS: dict[str, type[Command]] = {
    "status": StatusCommand,
    "peers": PeersCommand,
}

__all__ = ["COMMANDS", "Command"]
