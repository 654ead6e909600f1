"""The integration tests' daemons come from tools/localswarm.py (shared with the demo and benchmarks)."""

from localswarm import SWARMCTL, SWARMD, Daemon, free_port, running_swarm

__all__ = ["SWARMCTL", "SWARMD", "Daemon", "free_port", "running_swarm"]
