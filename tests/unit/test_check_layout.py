"""tools/check_layout.py, run by `make check`: import cycles among swarmd/ and libswarm/
(late and TYPE_CHECKING imports included) and modules over their length are breaches; the
project itself has none."""

import os

from check_layout import MAX_LINES, breaches  # tools/, on the path by conftest


def write(root, rel: str, text: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_a_cycle_through_late_and_type_checking_imports_and_a_long_module_are_breaches(tmp_path):
    root = str(tmp_path)
    write(root, "swarmd/__init__.py", "")
    write(root, "swarmd/runtime/__init__.py", "")
    write(root, "swarmd/runtime/a.py", "def f():\n    from swarmd.runtime import b\n    return b\n")
    write(root, "swarmd/runtime/b.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    write(root, "swarmd/runtime/c.py", "from swarmd.runtime.a import f\n")  # into the cycle, not part of it
    write(root, "libswarm/__init__.py", "")
    write(root, "libswarm/long.py", "x = 1\n" * (MAX_LINES + 1))
    write(root, "libswarm/grown.py", "x = 1\n" * 12)
    found = breaches(root, long={"libswarm/grown.py": 10})
    assert found == ["import cycle: swarmd.runtime.a <-> swarmd.runtime.b",
                     "libswarm/grown.py: 12 lines, over 10 (its ceiling until it is split)",
                     f"libswarm/long.py: {MAX_LINES + 1} lines, over {MAX_LINES} (split it by concern)"]
    write(root, "swarmd/runtime/b.py", "")  # the cycle broken
    write(root, "libswarm/long.py", "x = 1\n" * MAX_LINES)
    assert breaches(root, long={"libswarm/grown.py": 12}) == []


def test_the_project_keeps_the_rules():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert breaches(repo) == []
