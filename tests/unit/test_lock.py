"""Reproducible installs: requirements.lock pins every dependency pyproject.toml names, with
hashes; the environment `make` installs is exactly the lock; the .deb's constraints keep its pins."""

import importlib.metadata
import os
import re
import sys

import pytest
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from build_deb import constraints_from_lock  # noqa: E402

LOCK_EXTRAS = ("test", "api", "bench", "quant")  # the Makefile's LOCK_EXTRAS


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes)"""
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        text = f.read()
    pins: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if m:
            pins[norm(m.group(1))] = (m.group(2), block.count("--hash=sha256:"))
    return pins


def test_the_lock_pins_every_dependency_of_the_project_with_hashes():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = list(project["dependencies"])
    for extra in LOCK_EXTRAS:
        wanted += project["optional-dependencies"][extra]
    pins = lock_pins()
    names = {norm(re.match(r"[A-Za-z0-9._-]+", req).group(0)) for req in wanted}
    missing = sorted(names - pins.keys())
    assert not missing, f"pyproject.toml names {missing} but requirements.lock does not pin them: run make lock"
    unhashed = sorted(n for n, (_, hashes) in pins.items() if hashes == 0)
    assert not unhashed, f"requirements.lock pins {unhashed} without a hash"
    assert pins["torch"][0].endswith("+cpu"), "the lock must pin the CPU build of torch"


@pytest.mark.skipif(bool(os.environ.get("SWARM_UNLOCKED")), reason="make test-latest runs on the newest releases")
def test_the_installed_environment_is_the_lock():
    wrong = []
    for name, (version, _) in lock_pins().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version:
            wrong.append(f"{name} {have} (lock: {version})")
    assert not wrong, "installed versions differ from requirements.lock: " + ", ".join(wrong)


def test_deb_constraints_keep_every_pin_without_hashes():
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        text = f.read()
    pins = lock_pins()
    lines = constraints_from_lock(text).splitlines()
    assert "--hash" not in "\n".join(lines)
    assert {norm(line.split("==")[0]): line.split("==")[1] for line in lines} == {n: v for n, (v, _) in pins.items()}
    cuda = constraints_from_lock(text, frozenset({"torch"}))
    assert "torch==" not in cuda and f"transformers=={pins['transformers'][0]}" in cuda
