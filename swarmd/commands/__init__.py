"""swarmctl commands, registered explicitly: name -> class."""

from swarmd.commands.base import Command
from swarmd.commands.drain import DrainCommand
from swarmd.commands.install_service import InstallServiceCommand
from swarmd.commands.key import KeyCommand
from swarmd.commands.model import ModelCommand
from swarmd.commands.peers import PeersCommand
from swarmd.commands.rebalance import RebalanceCommand
from swarmd.commands.status import StatusCommand

COMMANDS: dict[str, type[Command]] = {
    "status": StatusCommand,
    "peers": PeersCommand,
    "key": KeyCommand,
    "rebalance": RebalanceCommand,
    "drain": DrainCommand,
    "install-service": InstallServiceCommand,
    "model": ModelCommand,
}

__all__ = ["COMMANDS", "Command"]
