"""Paths that exist but that this user may not reach: said as such, instead of as "missing"."""

from __future__ import annotations

import os


def closed_directory(path: str) -> str | None:
    """The directory on the way to `path` (itself included, when it is one) that this user may
    not enter, if any: then whether anything lies beyond it cannot even be seen."""
    d = os.path.abspath(path)
    if not os.path.isdir(d):
        d = os.path.dirname(d)
    while d not in ("/", ""):
        if os.path.isdir(d) and not os.access(d, os.X_OK):
            return d
        d = os.path.dirname(d)
    return None
