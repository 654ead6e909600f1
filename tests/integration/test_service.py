"""swarmd as a systemd service: the notify protocol (READY, STATUS, WATCHDOG, RELOADING,
STOPPING) on a datagram socket the test owns, and graceful drain."""

import os
import signal
import socket
import threading
import time

import torch
from conftest import hf_reference
from helpers import Daemon, running_swarm
from transformers import LogitsProcessor, LogitsProcessorList

from libswarm import AutoDistributedModelForCausalLM


class NotifySocket:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            # stamped once received (a tuple built in one expression would stamp it before recv
            # started waiting, up to its 0.2 s timeout earlier)
            self.messages.append((time.monotonic(), message))

    def wait_for(self, needle: str, after: float = 0.0, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for t, m in list(self.messages):
                if t >= after and needle in m.split("\n"):
                    return t
            time.sleep(0.05)
        raise AssertionError(f"{needle} not received; got {[m for _, m in self.messages][-5:]}")

    def wait_for_text(self, prefix: str, timeout: float = 10.0) -> None:
        t0 = time.monotonic()
        while not any(m.startswith(prefix) for _, m in self.messages):
            assert time.monotonic() - t0 < timeout, f"no {prefix!r}; got {[m for _, m in self.messages]}"
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def test_notify_ready_watchdog_reload_and_stop(model_dirs, tmp_path):
    d = model_dirs("llama")
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    # the `swarmd` script itself, as the unit starts it (other tests fork the daemon: localswarm)
    daemon = Daemon(str(tmp_path), "svc", d, "0:6", {"serve": {"drain_timeout_s": 5}},
                    env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}, fork=False)
    try:
        daemon.start([])
        t_ready = notify.wait_for("READY=1")
        assert daemon.ctl("status")["state"] == "online"  # READY only once the weights are loaded
        status = [m for _, m in notify.messages if m.startswith("STATUS=") or "\nSTATUS=" in m]
        assert any("serving blocks 0:6" in m for m in status)
        # while starting, STATUS says what it is doing: the last load report comes before READY
        loading = [(t, m) for t, m in notify.messages if m.startswith("STATUS=loading blocks 0:6 of ")]
        assert loading and loading[-1][1].endswith(": 6 of 6 loaded") and loading[-1][0] <= t_ready
        time.sleep(1.2)
        dogs = [t for t, m in notify.messages if "WATCHDOG=1" in m.split("\n") and t > t_ready]
        assert len(dogs) >= 4  # every 0.2 s (half of WatchdogSec)

        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=daemon.socket)
        ref = hf_reference(d)
        ids = torch.randint(3, 500, (1, 5), generator=torch.Generator().manual_seed(31))
        kw = dict(do_sample=False, max_new_tokens=4, pad_token_id=0)
        with model.inference_session(max_length=32):
            first = model.generate(ids, **kw)
            t_hup = time.monotonic()
            daemon.kill(signal.SIGHUP)
            t_reloading = notify.wait_for("RELOADING=1", after=t_hup)
            notify.wait_for("READY=1", after=t_reloading)
            second = model.generate(first, **kw)  # the same session goes on after the reload
        assert torch.equal(second, ref.generate(first, **kw)) and torch.equal(first, ref.generate(ids, **kw))

        t_term = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", after=t_term)
        assert daemon.proc.wait(20) == 0
    finally:
        daemon.stop()
        notify.close()


def test_a_wedged_serving_thread_stops_the_watchdog_and_exits_one(model_dirs, tmp_path):
    """A request that never returns (as a hung CUDA call): past serve.stall_timeout_s the main
    loop sends no more WATCHDOG=1, says why, and exits 1 for systemd to restart it."""
    d = model_dirs("llama")
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    daemon = Daemon(str(tmp_path), "wedged", d, "0:6", {"serve": {"stall_timeout_s": 2}},
                    env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000",
                         "SWARMD_FAILPOINTS": "hang_on_forward"})
    try:
        daemon.start([])
        notify.wait_for("READY=1")
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=daemon.socket)
        ids = torch.randint(3, 500, (1, 5), generator=torch.Generator().manual_seed(32))
        t0 = time.monotonic()
        threading.Thread(target=lambda: _swallow(lambda: model(ids)), daemon=True).start()
        assert daemon.proc.wait(30) == 1
        took = time.monotonic() - t0
        dogs = [t for t, m in notify.messages if "WATCHDOG=1" in m.split("\n")]
        stuck = [m for _, m in notify.messages if "serving thread stuck" in m]
        assert stuck and dogs and dogs[-1] < t0 + 2 + 1.0, (took, dogs[-3:])  # no watchdog past the stall bound
        assert 2 <= took < 20, took
        assert "stuck in one request" in daemon.tail()
    finally:
        daemon.stop()
        notify.close()


def _swallow(call) -> None:
    try:
        call()
    except Exception:
        pass  # the daemon it waits on exits: the app's error is not what this test checks


def test_drain_during_a_generation_lets_it_finish_and_exits_zero(model_dirs):
    d = model_dirs("llama")
    with running_swarm(d, ["0:6", "0:6"], extra={"serve": {"drain_timeout_s": 30}}) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(32))
        kw = dict(do_sample=False, max_new_tokens=150, min_new_tokens=150, pad_token_id=0)
        # the generation waits at step 5 until the drain is sent: without that, on a loaded
        # machine it could finish before the test finds the busy server (seen in CI)
        mid_generation, drain_sent = threading.Event(), threading.Event()

        class PauseAtStep5(LogitsProcessor):
            step = 0

            def __call__(self, input_ids, scores):
                self.step += 1
                if self.step == 5:
                    mid_generation.set()
                    drain_sent.wait(60)
                return scores

        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("tokens", model.generate(
            ids, logits_processor=LogitsProcessorList([PauseAtStep5()]), **kw)))
        t.start()
        try:
            assert mid_generation.wait(60), "the generation did not start"
            busy = next(s for s in servers if s.ctl("status")["sessions"]["server"])
            reply = busy.ctl("drain")
            assert reply["draining"]
            states = {p["node_id"]: p["state"] for p in gw.ctl("peers")["peers"]}
        finally:
            drain_sent.set()
        t.join(120)
        assert torch.equal(out["tokens"], hf_reference(d).generate(ids, **kw))
        assert busy.proc.wait(40) == 0
        assert states.get(busy.node_id) in ("draining", "online")
        other = next(s for s in servers if s is not busy)
        assert other.alive


def test_metrics_endpoint_answers_and_counters_move(model_dirs, tmp_path):
    import urllib.request

    from localswarm import free_port

    d = model_dirs("llama")
    port = free_port()
    daemon = Daemon(str(tmp_path), "m", d, "0:6", {"metrics": {"listen": f"127.0.0.1:{port}"}})

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    try:
        daemon.start([]).wait_ready()
        before = scrape()
        assert before["swarmd_steps_total"] == 0 and before['swarmd_cache_bytes{kind="free"}'] > 0
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=daemon.socket)
        model.generate(torch.tensor([[5, 6, 7]]), do_sample=False, max_new_tokens=5, pad_token_id=0)
        after = scrape()
        assert after["swarmd_steps_total"] >= 5 and after["swarmd_tokens_total"] > before["swarmd_tokens_total"]
        assert after["swarmd_step_seconds_count"] >= 5 and after['swarmd_step_seconds_bucket{le="+Inf"}'] >= 5
    finally:
        daemon.stop()


def test_a_config_without_a_model_says_so_in_status_and_exits_2(tmp_path):
    import subprocess

    from helpers import SWARMD

    notify = NotifySocket(str(tmp_path / "n.sock"))
    cfg = tmp_path / "swarmd.yaml"
    cfg.write_text("serve:\n  blocks: auto\n")
    try:
        env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "n.sock"))
        r = subprocess.run([SWARMD, "--config", str(cfg)], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 2 and "model: not set" in r.stderr
        notify.wait_for_text("STATUS=not started", timeout=5)
        assert any("model: not set" in m for _, m in notify.messages)
    finally:
        notify.close()
