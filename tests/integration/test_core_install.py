"""`swarmctl model get` where only swarm's core dependencies are installed (the pip install of
docs/operations.md, and the .deb's venv): no test extra lends it a package it needs.

The environment is real, not mocked: a folder that holds links to exactly the files of the
distributions swarm's core requirements reach (importlib.metadata walks them), run by this venv's
interpreter with `-S`, so that its site-packages (where peft, pytest... live) is not on the path."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import tomllib
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def core_closure(exclude: frozenset[str] = frozenset()) -> set[str]:
    """The normalized names of every distribution swarm's core requirements reach, extras off."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:  # the repo's, not an older install's
        core = tomllib.load(f)["project"]["dependencies"]
    seen: set[str] = set()
    todo = [Requirement(r) for r in core]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen or name in exclude:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in importlib.metadata.requires(name) or []]
    return seen


def core_site(folder, exclude: frozenset[str] = frozenset()) -> str:
    """A site folder with links to the closure's files (top-level entries only) and swarm's code."""
    os.makedirs(folder)
    for name in core_closure(exclude):
        dist = importlib.metadata.distribution(name)
        base = dist.locate_file("")
        for top in {str(f).split("/")[0] for f in dist.files or []}:
            src = os.path.join(base, top)
            if top != ".." and not top.endswith(".pth") and os.path.exists(src):
                link = os.path.join(folder, top)
                if not os.path.lexists(link):
                    os.symlink(src, link)
    for pkg in ("swarmd", "libswarm"):
        os.symlink(os.path.join(ROOT, pkg), os.path.join(folder, pkg))
    return str(folder)


def swarmctl_in(site: str, home, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONPATH": site,
           "PYTHONNOUSERSITE": "1", "PIP_CONFIG_FILE": os.environ.get("PIP_CONFIG_FILE", "")}
    env = {k: v for k, v in env.items() if v}
    code = "import sys; from swarmd.ctl import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-S", "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_model_get_works_with_only_the_core_dependencies(tmp_path):
    site = core_site(tmp_path / "site")
    probe = subprocess.run([sys.executable, "-S", "-c", "import peft"], env={"PYTHONPATH": site},
                           capture_output=True, text=True)
    assert probe.returncode != 0, "the test extra leaked into the core environment"
    r = swarmctl_in(site, tmp_path, "--json", "model", "get", "smollm2-135m-instruct", "--dir", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr[-2000:]
    path = json.loads(r.stdout)["path"]
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 30
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))


def test_a_missing_package_is_named_not_blamed_on_the_file(tmp_path):
    site = core_site(tmp_path / "site", exclude=frozenset({"gguf"}))
    r = swarmctl_in(site, tmp_path, "model", "get", "smollm2-135m-instruct", "--dir", str(tmp_path / "m"))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "gguf" in last and "is not installed" in last, last
    assert "corrupt" not in last and "/.smollm2" not in last  # not the file, not a temporary path
    assert not os.path.exists(tmp_path / "m" / "smollm2-135m-instruct")
