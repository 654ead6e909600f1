"""A local swarm of real swarmd processes on loopback, for the demo, the benchmarks and the
integration tests: config files written, daemons started with `swarmd --config`, readiness
waited for through `swarmctl`, and everything stopped afterwards."""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import yaml

BIN = os.path.dirname(sys.executable)
SWARMD = os.path.join(BIN, "swarmd")
SWARMCTL = os.path.join(BIN, "swarmctl")


def thread_cpu(pid: int) -> dict[tuple[str, str], float]:
    """CPU seconds each thread of process `pid` has run (the scheduler's count, in ns), by
    (thread id, name)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f, open(f"/proc/{pid}/task/{tid}/comm") as g:
                out[(tid, g.read().strip())] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):  # the thread ended
            continue
    return out


def cpu_split(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> tuple[float, float]:
    """CPU seconds between two thread_cpu() readings: (Python and other threads, ZeroMQ's I/O threads)."""
    spent = [(key[1], t - before.get(key, 0.0)) for key, t in after.items()]
    io = sum(t for name, t in spent if name.startswith("ZMQbg"))
    return sum(t for _, t in spent) - io, io


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel handed out (bind to 0)
    can be taken again as the source port of some outgoing connection before the daemon binds
    it, which made daemons fail with "Address already in use" now and then."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = 10000 if ephemeral_low > 12000 else 1024
    for _ in range(200):
        port = random.randint(low, ephemeral_low - 1)
        # the same number must be free for TCP (the peer plane) and UDP (the key query)
        with socket.socket() as s, socket.socket(type=socket.SOCK_DGRAM) as u:
            try:
                s.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below the ephemeral range")


# Where fork_daemons() starts daemons from: multiprocessing's fork server, with these imported.
_forkserver: multiprocessing.context.ForkServerContext | None = None
_PRELOAD = ["torch", "transformers", "safetensors.torch", "zmq", "yaml", "transformers.models.llama.modeling_llama",
            "transformers.models.mistral.modeling_mistral", "transformers.models.qwen2.modeling_qwen2",
            "transformers.models.bloom.modeling_bloom"]
_forked: list[Forked] = []


def fork_daemons() -> None:
    """From now on, start daemons by forking a process that has imported torch and transformers
    once (multiprocessing's fork server) rather than executing `swarmd` afresh: a start then
    takes ~0.3 s instead of ~4 s, nearly all of it imports, which a test suite that starts
    hundreds of daemons on two cores feels. The child is still a whole daemon: its own session,
    environment, working directory and log, running the same main() as the `swarmd` script
    (tests/conftest.py turns this on; the demo, the benchmarks and daemons run inside a
    namespace still execute the script)."""
    global _forkserver
    if _forkserver is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        # started and through its imports now (one no-op child): else the first daemon's start
        # pays for them (seconds), and a test that times starts sees it
        warm = ctx.Process(target=int, name="forkserver-warm-up")
        warm.start()
        warm.join(120)
        _forkserver = ctx


def _forked_swarmd(config_path: str, log_path: str, env: dict, cwd: str) -> None:
    """The forked child: what `Popen([SWARMD, "--config", ...], start_new_session=True)` with
    output to the log would have set up, then swarmd's main()."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    from swarmd.main import main

    sys.exit(main(["--config", config_path]))


class Forked:
    """A forked daemon behind the part of Popen's interface Daemon uses (its exit status comes
    from the fork server, which reaps it: -N for a death by signal N, as Popen says)."""

    def __init__(self, config_path: str, log_path: str, env: dict):
        assert _forkserver is not None
        self._p = _forkserver.Process(target=_forked_swarmd, args=(config_path, log_path, env, os.getcwd()),
                                      name="swarmd")
        self._p.start()
        assert self._p.pid is not None
        self.pid: int = self._p.pid
        _forked[:] = [f for f in _forked if f.poll() is None] + [self]
        # Popen returns once the child runs in its own session; kill() signals that group
        deadline = time.monotonic() + 10
        while self.poll() is None and time.monotonic() < deadline:
            try:
                if os.getpgid(self.pid) == self.pid:
                    break
            except ProcessLookupError:
                break
            time.sleep(0.002)

    @property
    def returncode(self) -> int | None:
        return self._p.exitcode

    def poll(self) -> int | None:
        return self._p.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired("swarmd", timeout or 0)
        return self._p.exitcode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


@atexit.register
def _kill_forked() -> None:
    """A forked daemon still running when its starter exits is killed (multiprocessing would
    otherwise wait for it, forever if it was stopped with SIGSTOP)."""
    for f in _forked:
        if f.poll() is None:
            try:
                os.killpg(f.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            f.wait(10)


class Daemon:
    def __init__(self, root: str, name: str, model_dir: str, blocks: str, extra: dict | None = None,
                 env: dict | None = None, fork: bool = True):
        """`fork`: False always executes the `swarmd` script, as systemd does (else fork_daemons
        decides)."""
        self.name = name
        self.fork = fork
        self.env = env or {}
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.socket = os.path.join(self.dir, "swarmd.sock")
        self.config_path = os.path.join(self.dir, "swarmd.yaml")
        self.cfg: dict = {
            "model": model_dir,
            # one compute thread per daemon: several daemons share this machine's cores
            "serve": {"blocks": blocks, "device": "cpu", "dtype": "float32", "cache": {"max_bytes": "64MiB"},
                      "threads": 1},
            "network": {"listen": self.address, "socket": self.socket},
            "discovery": {"mdns": False, "seeds": []},
            "state_dir": os.path.join(self.dir, "state"),
            "log_level": "info",
        }
        for k, v in (extra or {}).items():
            if isinstance(v, dict):
                self.cfg.setdefault(k, {}).update(v)
            else:
                self.cfg[k] = v
        self.proc: subprocess.Popen | Forked | None = None
        self.prefix: list[str] = []  # e.g. ["ip", "netns", "exec", NAME] to run it in a namespace
        self.log_path = os.path.join(self.dir, "log.txt")

    def write_config(self, seeds: list[str]) -> None:
        self.cfg["discovery"]["seeds"] = [s for s in seeds if s != self.address]
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.cfg, f)

    def start(self, seeds: list[str]) -> Daemon:
        self.write_config(seeds)
        env = dict(os.environ, **self.env)
        if _forkserver is not None and self.fork and not self.prefix:
            self.proc = Forked(self.config_path, self.log_path, env)
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.prefix, SWARMD, "--config", self.config_path], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=env)
        return self

    def ctl(self, *args: str, timeout: float = 20, check: bool = True):
        """What `swarmctl --json ARGS` prints for this daemon, parsed: the same parser, request
        and reply as the command (swarmd/ctl.py), in this process, since a swarmctl process a
        call took ~0.3 s and tests poll (a swarm's start alone asked 6 times). A failure is a
        RuntimeError, or with `check=False` comes back as swarmctl's exit: returncode 1 and
        its one line on stderr."""
        from libswarm.errors import SwarmError
        from swarmd.ctl import build_parser, reply

        parsed = build_parser().parse_args(["--socket", self.socket, "--json", "--timeout", str(timeout), *args])
        try:
            return json.loads(json.dumps(reply(parsed)))  # what the command's JSON gives
        except SwarmError as e:
            if check:
                raise RuntimeError(f"swarmctl {' '.join(args)} failed: swarmctl: {e}") from None
            return subprocess.CompletedProcess(["swarmctl", *args], 1, "", f"swarmctl: {e}\n")

    def wait_ready(self, timeout: float = 60) -> Daemon:
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if os.path.exists(self.socket):
                try:
                    r = self.ctl("status", timeout=5, check=False)
                except subprocess.TimeoutExpired:  # a loaded machine: ask again
                    continue
                if isinstance(r, dict) and r["state"] == "online":
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready in {timeout}s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def seed_speed(self, step_s: float) -> Daemon:
        """Give the daemon a known block speed, written where its first start would write the
        measured one (state_dir/throughput.json), so that placement and routing in tests do
        not depend on this machine's timing noise."""
        import torch

        from libswarm.checkpoint import Checkpoint
        from swarmd.runtime.speed import BlockSpeed, save_speed, speed_key

        os.makedirs(self.cfg["state_dir"], exist_ok=True)
        quant = self.cfg.get("serve", {}).get("quant", "none")  # a quantized server keeps its speed apart
        key = speed_key(Checkpoint(self.cfg["model"]).model_id, "cpu", torch.float32, quant)
        save_speed(self.cfg["state_dir"], key, BlockSpeed(step_s, 1000.0, 100_000))
        return self

    @property
    def node_id(self) -> str:
        """The daemon's public key (made at its first start)."""
        with open(os.path.join(self.cfg["state_dir"], "node.pub")) as f:
            return f.read().strip()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            assert self.proc is not None
            os.killpg(self.proc.pid, sig)
            if sig == signal.SIGKILL:
                self.proc.wait(10)  # reaped: `alive` is false from here on

    def revive(self, seeds: list[str]) -> Daemon:
        """Restart a daemon that was killed or stopped (same config, same address)."""
        if self.alive:
            self.kill(signal.SIGCONT)
            self.kill()
        if self.proc is not None:
            self.proc.wait(10)
        return self.start(seeds).wait_ready()

    def terminate(self) -> None:
        """SIGTERM (a drain), without waiting: `stop` waits. Stopping several daemons, terminate
        them all first, so that their drains run at the same time."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = self.proc.pid

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if getattr(self, "_terminated", None) != self.proc.pid:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait(5)
        return self.proc.returncode


def online_ids(d: Daemon) -> set[str]:
    """The node ids `d`'s table lists online (itself included)."""
    return {p["node_id"] for p in d.ctl("peers")["peers"] if p["state"] == "online"}


def until(cond, limit_s: float = 60.0, what: str = "condition") -> float:
    """Poll `cond` until it holds; the seconds that took (TimeoutError after `limit_s`)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit_s:
            raise TimeoutError(f"{what} not reached in {limit_s} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def wait_tables(daemons: list[Daemon], ids: set[str], limit_s: float) -> float:
    """Until every daemon's table lists the nodes `ids` online; the seconds that took."""
    try:
        return until(lambda: all(online_ids(d) >= ids for d in daemons), limit_s)
    except TimeoutError:
        seen = {d.name: sorted(x[:8] for x in online_ids(d)) for d in daemons}
        raise TimeoutError(f"tables did not converge in {limit_s} s: {seen}") from None


def wait_converged(daemons: list[Daemon], servers: int, limit_s: float = 15.0) -> None:
    """Until every daemon's table lists `servers` servers online (gossip takes a moment after
    the last start), so that what follows does not measure or test the start-up."""
    deadline = time.monotonic() + limit_s
    for d in daemons:
        while time.monotonic() < deadline:
            peers = d.ctl("peers")["peers"]
            if sum(p["state"] == "online" and p.get("span") is not None for p in peers) >= servers:
                break
            time.sleep(0.1)


@contextmanager
def running_swarm(model_dir: str, spans: list[str], gateway: bool = True, extra: dict | None = None,
                  root: str | None = None, env: dict | None = None, env_all: dict | None = None,
                  seeds: str = "all", mdns: bool = False, speeds: dict[int, float] | None = None,
                  server_extra: dict[int, dict] | None = None):
    """Servers for `spans` ("0:2", ...) plus a gateway-only daemon; yields (servers, gateway).
    `env` maps a server's index to extra environment variables for it; `env_all` goes to all.
    Discovery: `seeds` "all" (every server's address), "first" (only the first server's: the
    rest is learnt by gossip) or "none"; `mdns` adds mDNS on loopback. `speeds` maps a server's
    index to a known block step time (seconds; see Daemon.seed_speed). `server_extra` maps a
    server's index to config sections merged over `extra` for it alone. The daemons' folder
    (made here unless `root` is given) is removed afterwards, unless the body raised."""
    made_root = root is None
    root = root or tempfile.mkdtemp(prefix="swarm-test-")
    extra = dict(extra or {})
    if mdns:
        extra["discovery"] = {**extra.get("discovery", {}), "mdns": True, "mdns_interfaces": ["127.0.0.1"]}
    servers = [Daemon(root, f"s{i}", model_dir, b, _merged(extra, (server_extra or {}).get(i, {})),
                      {**(env_all or {}), **(env or {}).get(i, {})}) for i, b in enumerate(spans)]
    for i, step_s in (speeds or {}).items():
        servers[i].seed_speed(step_s)
    gw = Daemon(root, "gw", model_dir, "none", extra, env_all) if gateway else None
    everyone = servers + ([gw] if gw else [])
    seed_list = {"all": [d.address for d in servers], "first": [servers[0].address], "none": []}[seeds]
    try:
        for d in everyone:
            d.start(seed_list)
        for d in everyone:
            d.wait_ready()
        if seeds != "none" or mdns:
            wait_converged(everyone, len(servers))
        yield servers, (gw or servers[0])
    except BaseException:
        made_root = False  # the daemons' logs and state stay for a look at what went wrong
        raise
    finally:
        for d in everyone:
            d.terminate()
        for d in everyone:
            d.stop()
        if made_root:
            shutil.rmtree(root, ignore_errors=True)


def _merged(base: dict, over: dict) -> dict:
    """Config sections `over` merged into `base`, key by key (a section's dicts too)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        out[k] = _merged(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@contextmanager
def running_api(daemon: Daemon, api: dict | None = None, limit_s: float = 60.0):
    """`swarm-api --config` for `daemon`'s own config file with an `api` section added (the
    daemon reads the same file); yields the base URL once it answers. Stopped with SIGTERM."""
    import urllib.error
    import urllib.request

    port = free_port()
    cfg = dict(daemon.cfg, api={"listen": f"127.0.0.1:{port}", **(api or {})})
    path = os.path.join(daemon.dir, "swarm-api.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    log_path = os.path.join(daemon.dir, "swarm-api.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([os.path.join(BIN, "swarm-api"), "--config", path], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + limit_s
        while True:
            if proc.poll() is not None:
                with open(log_path, "rb") as f:
                    raise RuntimeError(f"swarm-api exited with {proc.returncode}: {f.read()[-2000:].decode()}")
            try:
                urllib.request.urlopen(url + "/", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"swarm-api did not answer at {url} in {limit_s} s") from None
                time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


class Churn:
    """The paper's robustness setting: servers are killed (SIGKILL) at random and restarted.

    Each server, independently, lives an exponentially distributed time of mean `mean_life_s`,
    is killed, stays down `downtime_s`, and starts again on the same address and config (its
    node key and measured speed kept). Use as a context manager around the work to disturb;
    `kills` counts the kills, `errors` what went wrong restarting."""

    def __init__(self, servers: list[Daemon], seeds: list[str], mean_life_s: float, downtime_s: float = 2.0,
                 seed: int = 0):
        import threading

        self.servers, self.seeds = servers, seeds
        self.mean_life_s, self.downtime_s = mean_life_s, downtime_s
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(d, self.rng.random()), daemon=True)
                        for d in servers]
        self.kills = 0
        self.errors: list[str] = []

    def _run(self, d: Daemon, seed: float) -> None:
        rng = random.Random(seed)
        while not self.stop_event.wait(rng.expovariate(1.0 / self.mean_life_s)):
            d.kill()
            self.kills += 1
            if self.stop_event.wait(self.downtime_s):
                break
            try:
                d.start(self.seeds).wait_ready()
            except RuntimeError as e:
                self.errors.append(f"{d.name}: {str(e)[:200]}")

    def __enter__(self) -> Churn:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        """Stop killing; every server is running again when this returns."""
        self.stop_event.set()
        for t in self.threads:
            t.join(120)
        for d in self.servers:
            if not d.alive:
                d.start(self.seeds).wait_ready()
