#!/usr/bin/env python3
"""The house rules `make check` holds the code to, beyond lint and types:

- no import cycle among the modules of swarmd/ and libswarm/: every import counts, those inside
  functions and under TYPE_CHECKING too (a cycle hidden by a late import is still two modules
  that cannot be read, or changed, one without the other);
- no module over MAX_LINES lines, but those named in LONG, each held to the length it has now
  until it is split (they may shrink, never grow).

    python tools/check_layout.py [REPO]

Prints one line per breach and exits 1 when there is any."""

from __future__ import annotations

import ast
import os
import sys

PACKAGES = ("swarmd", "libswarm")
MAX_LINES = 700
# Modules allowed longer than MAX_LINES, each with the most lines it may have until it is split
# into modules of one concern each (none now: the four that were are split; a module that must
# grow past the limit is named here, with the reason in a comment).
LONG: dict[str, int] = {}


def modules(repo: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(repo, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, repo)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def imported(module: str, path: str, known: dict[str, str]) -> set[str]:
    """The modules of `known` that `module` imports, anywhere in its file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                if f"{base}.{a.name}" in known:  # a module imported from its package
                    out.add(f"{base}.{a.name}")
                elif base in known:
                    out.add(base)
    out.discard(module)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def breaches(repo: str, long: dict[str, int] | None = None) -> list[str]:
    long = LONG if long is None else long
    known = modules(repo)
    out = [f"import cycle: {' <-> '.join(group)}"
           for group in cycles({m: imported(m, p, known) for m, p in known.items()})]
    for path in sorted(known.values()):
        rel = os.path.relpath(path, repo).replace(os.sep, "/")
        with open(path) as f:
            lines = sum(1 for _ in f)
        most = long.get(rel, MAX_LINES)
        if lines > most:
            why = "its ceiling until it is split" if rel in long else "split it by concern"
            out.append(f"{rel}: {lines} lines, over {most} ({why})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    repo = args[0] if args else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = breaches(repo)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
