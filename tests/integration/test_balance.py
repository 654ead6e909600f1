"""Placement across real daemons: `serve.blocks: auto` chooses spans from the swarm's table,
re-covers blocks when a server dies, and `swarmctl rebalance` moves a server while a
generation runs through it."""

import subprocess
import threading
import time

import torch
from conftest import hf_reference
from helpers import SWARMCTL, Daemon, generate_equals_hf

from libswarm import AutoDistributedModelForCausalLM

RECOVER_LIMIT_S = 60.0


def span_of(d: Daemon) -> list[int] | None:
    return d.ctl("status")["serve"]["blocks"]


def auto(root: str, name: str, model_dir: str, step_s: float, interval_s: int) -> Daemon:
    d = Daemon(root, name, model_dir, "auto", {"serve": {"num_blocks": 2, "rebalance_interval_s": interval_s}})
    return d.seed_speed(step_s)


def test_auto_spans_cover_the_model_take_the_weakest_blocks_and_recover_from_a_death(model_dirs, tmp_path):
    d = model_dirs("llama")  # 6 blocks; each server holds 2
    root = str(tmp_path)
    fast, slow = 0.001, 0.004
    daemons = [auto(root, "d0", d, fast, 2), auto(root, "d1", d, fast, 2), auto(root, "d2", d, slow, 2)]
    try:
        for x in daemons:  # one after another, each knowing the first
            x.start([daemons[0].address]).wait_ready()
        assert [span_of(x) for x in daemons] == [[0, 2], [2, 4], [4, 6]]
        generate_equals_hf(d, daemons[0].socket)

        joiner = auto(root, "d3", d, fast, 2)
        daemons.append(joiner)
        joiner.start([daemons[0].address]).wait_ready()
        assert span_of(joiner) == [4, 6]  # the weakest blocks: only the slow server held them

        dead_id = daemons[1].node_id
        daemons[1].kill()  # the only holder of 2:4
        t0 = time.monotonic()

        def noticed() -> bool:
            # d0 sees the gap, or at least the death: another server may have noticed first and
            # filled the gap before d0's table ever showed one
            st = daemons[0].ctl("status")
            return bool(st["coverage"][0]["gaps"]) or any(
                p["node_id"] == dead_id and p["state"] != "online" for p in st["peers"])

        while not noticed():  # first the swarm notices
            assert time.monotonic() - t0 < 15
            time.sleep(0.2)
        while True:
            cov = daemons[0].ctl("status")["coverage"][0]
            if cov["complete"]:
                break
            assert time.monotonic() - t0 < RECOVER_LIMIT_S, cov["gaps"]
            time.sleep(0.5)
        print(f"blocks 2:4 re-covered {time.monotonic() - t0:.1f} s after the kill")
        spans = sorted(span_of(x) for x in daemons if x.alive)
        assert [2, 4] in spans and spans.count([0, 2]) == 1
        generate_equals_hf(d, daemons[0].socket)
    finally:
        for x in daemons:
            x.stop()


def test_swarmctl_rebalance_dry_run_then_a_move_during_a_generation(model_dirs, tmp_path):
    d = model_dirs("llama", layers=4)
    root = str(tmp_path)
    mover = auto(root, "mover", d, 0.002, 3600)  # no periodic moves: only the command moves it
    mover.start([]).wait_ready()
    assert span_of(mover) == [0, 2]  # alone: the first window
    a = Daemon(root, "a", d, "0:2").seed_speed(0.003)
    b = Daemon(root, "b", d, "2:4").seed_speed(0.004)  # slow: blocks 2:4 are the bottleneck
    daemons = [mover, a, b]
    try:
        for x in (a, b):
            x.start([mover.address]).wait_ready()
        t0 = time.monotonic()
        while len({p["node_id"] for p in mover.ctl("peers")["peers"] if p["state"] == "online"}) < 3:
            assert time.monotonic() - t0 < 10
            time.sleep(0.2)

        plan = mover.ctl("rebalance", "--dry-run")
        assert plan["current"] == [0, 2] and plan["proposed"] == [2, 4] and not plan["moving"]
        assert plan["after"] > plan["before"] > 0
        text = subprocess.run([SWARMCTL, "--socket", mover.socket, "rebalance", "--dry-run"], capture_output=True,
                              text=True, timeout=20).stdout
        assert "0:2" in text and "2:4" in text and "dry run" in text
        time.sleep(1.0)
        assert span_of(mover) == [0, 2]  # a dry run moves nothing

        # a generation through the mover's old blocks, with the move in the middle of it
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=mover.socket)
        ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(11))
        kw = dict(do_sample=False, max_new_tokens=120, min_new_tokens=120, pad_token_id=0)
        out: dict = {}

        def generate() -> None:
            out["tokens"] = model.generate(ids, **kw)

        t = threading.Thread(target=generate)
        t.start()
        time.sleep(0.3)
        reply = mover.ctl("rebalance")
        assert reply["moving"] and reply["proposed"] == [2, 4]
        t.join(120)
        assert torch.equal(out["tokens"], hf_reference(d).generate(ids, **kw))
        t0 = time.monotonic()
        while span_of(mover) != [2, 4]:
            assert time.monotonic() - t0 < 10
            time.sleep(0.1)
        status = mover.ctl("status")
        assert status["serve"]["moves"] == 1 and status["serve"]["last_move"]["to"] == [2, 4]
        generate_equals_hf(d, mover.socket)
    finally:
        for x in daemons:
            x.stop()
