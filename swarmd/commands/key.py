"""`swarmctl key`: this node's public key (the node id other nodes list) and its short id."""

from __future__ import annotations

import argparse
import os

from libswarm.client import SwarmClient
from libswarm.errors import SwarmError
from swarmd.commands.base import Command
from swarmd.identity import is_key, short_id

DEFAULT_CONFIG = "/etc/swarmd/swarmd.yaml"
DEFAULT_STATE_DIR = "/var/lib/swarmd"


class KeyCommand(Command):
    """Print this node's public key and short id (`swarmctl key > peers.d/NAME` makes a peers.d file)."""

    name = "key"
    local = True  # asks swarmd, and reads the key from state_dir when swarmd is not running

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None,
                       help=f"without a running swarmd: the config whose state_dir holds node.pub "
                            f"(default {DEFAULT_CONFIG})")
        p.add_argument("--state-dir", default=None, help="without a running swarmd: the state_dir itself")

    def run(self, args: argparse.Namespace) -> dict:
        if args.config is None and args.state_dir is None:
            try:
                with SwarmClient(socket=args.socket, timeout_s=min(args.timeout, 5.0)) as client:
                    info = client.request("key").fields
                return {**info, "node_id": short_id(info["public_key"]), "source": "swarmd"}
            except SwarmError as e:
                asked = str(e)
        else:
            asked = "not asked"
        path = os.path.join(args.state_dir or state_dir_of(args.config or DEFAULT_CONFIG), "node.pub")
        try:
            with open(path) as f:
                key = f.read(200).strip()
        except OSError as e:
            raise SwarmError(f"no key: swarmd did not answer ({asked}), and {path}: {e.strerror}"
                             + (" (run as root or user swarmd)" if e.errno == 13 else "")) from None
        if not is_key(key):
            raise SwarmError(f"{path} does not hold a node key")
        return {"public_key": key, "node_id": short_id(key), "path": path, "source": path}

    def format(self, r: dict, args: argparse.Namespace) -> str:
        # the second line is a comment in a peers.d file: `swarmctl key > peers.d/NAME` works as it is
        return f"{r['public_key']}\n# node {r['node_id']}: the short id logs, swarmctl peers and status use"


def state_dir_of(config_path: str) -> str:
    """state_dir from a config file, without checking the rest of it (the model may be missing)."""
    import yaml

    try:
        with open(config_path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return DEFAULT_STATE_DIR
    value = raw.get("state_dir") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and value else DEFAULT_STATE_DIR
