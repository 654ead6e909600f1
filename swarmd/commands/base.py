"""What every swarmctl command is: a small class that builds its request, and formats the reply."""

from __future__ import annotations

import argparse


class Command:
    """Subclasses: set `name`; the class docstring's first line is the help text."""

    name = ""
    request_type = ""
    # a local command does its work here, without swarmd: `run` replaces the request
    local = False

    def run(self, args: argparse.Namespace) -> dict:
        raise NotImplementedError

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def fields(self, args: argparse.Namespace) -> dict:
        return {}

    def format(self, reply: dict, args: argparse.Namespace) -> str:
        raise NotImplementedError


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)
