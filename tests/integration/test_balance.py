"""Placement across real daemons: `serve.blocks: auto` chooses spans from the swarm's table,
re-covers blocks when a server dies, and `swarmctl rebalance` moves a server while a
generation runs through it."""

import os
import subprocess
import threading
import time

import torch
from conftest import hf_reference
from helpers import SWARMCTL, Daemon, generate_equals_hf, greedy, online_ids, until

from libswarm import AutoDistributedModelForCausalLM

RECOVER_LIMIT_S = 60.0


def span_of(d: Daemon) -> list[int] | None:
    return d.ctl("status")["serve"]["blocks"]


def auto(root: str, name: str, model_dir: str, step_s: float, interval_s: int | None, blocks: int = 2) -> Daemon:
    serve: dict = {"num_blocks": blocks}
    if interval_s is not None:  # else the default (60 s)
        serve["rebalance_interval_s"] = interval_s
    return Daemon(root, name, model_dir, "auto", {"serve": serve}).seed_speed(step_s)


def ready_times(daemons: list[Daemon], limit_s: float = 90) -> list[float]:
    """When each daemon went online (monotonic), polling them all together."""
    t0, ready = time.monotonic(), {}
    while len(ready) < len(daemons):
        assert time.monotonic() - t0 < limit_s, [x.tail() for x in daemons if x.name not in ready]
        for x in daemons:
            if x.name in ready:
                continue
            assert x.alive, x.tail()
            if os.path.exists(x.socket):
                r = x.ctl("status", timeout=5, check=False)
                if isinstance(r, dict) and r["state"] == "online":
                    ready[x.name] = time.monotonic()
        time.sleep(0.1)
    return [ready[x.name] for x in daemons]


def test_four_auto_daemons_started_together_cover_the_model(model_dirs, tmp_path):
    """A fleet started at once (systemctl start on every machine, or power back after a cut):
    each announces the span it would take before loading, so they do not all take blocks 0:3;
    generation works within 15 s of the last READY, with the default rebalance interval."""
    d = model_dirs("llama")  # 6 blocks; each server holds 3
    root = str(tmp_path)
    daemons = [auto(root, f"d{i}", d, 0.002, None, blocks=3) for i in range(4)]
    addresses = [x.address for x in daemons]
    try:
        t_start = time.monotonic()
        for x in daemons:
            x.start(addresses)
        # launched at once, not one after another's READY (seconds each): under a loaded machine a
        # fork alone took over 0.1 s, so the bound is far from both
        assert time.monotonic() - t_start < 0.5 * len(daemons)
        last_ready = max(ready_times(daemons))

        def complete() -> bool:
            return all(x.ctl("status")["coverage"][0]["complete"] for x in daemons)

        until(complete, 15 - (time.monotonic() - last_ready), "the model covered")
        generate_equals_hf(d, daemons[0].socket)
        took = time.monotonic() - last_ready
        assert took < 15, took
        spans = sorted(span_of(x) for x in daemons)
        moves = sum(x.ctl("status")["serve"]["moves"] for x in daemons)
        print(f"covered and generated {took:.1f} s after the last READY; spans {spans}, {moves} moves")
        assert spans == [[0, 3], [0, 3], [3, 6], [3, 6]]
    finally:
        for x in daemons:
            x.stop()


def test_the_only_holder_dies_and_its_blocks_are_covered_at_once(model_dirs, tmp_path):
    """A gap is an emergency: it is filled within 10 s of the death being noticed, not at the
    next rebalance interval (60 s by default)."""
    d = model_dirs("llama")  # 6 blocks; each server holds 3
    root = str(tmp_path)
    daemons = [auto(root, f"d{i}", d, 0.002, None, blocks=3) for i in range(3)]
    try:
        for x in daemons:  # one after another: 0:3, 3:6, then 0:3 again (the lowest start of equals)
            x.start([daemons[0].address]).wait_ready()
        assert [span_of(x) for x in daemons] == [[0, 3], [3, 6], [0, 3]]
        watcher = daemons[0]
        until(lambda: len(online_ids(watcher)) == 3, 15, "all three online at d0")
        dead = daemons[1]
        dead_id = dead.node_id
        dead.kill()  # the only holder of 3:6

        def noticed() -> bool:
            st = watcher.ctl("status")
            return bool(st["coverage"][0]["gaps"]) or any(
                p["node_id"] == dead_id and p["state"] != "online" for p in st["peers"])

        until(noticed, 30, "the death noticed")
        t_noticed = time.monotonic()
        until(lambda: watcher.ctl("status")["coverage"][0]["complete"], 10, "blocks 3:6 covered again")
        print(f"blocks 3:6 covered again {time.monotonic() - t_noticed:.1f} s after the death was noticed")
        assert sorted(span_of(x) for x in daemons if x.alive) == [[0, 3], [3, 6]]
        generate_equals_hf(d, watcher.socket)
    finally:
        for x in daemons:
            x.stop()


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
        for x in (b, a):  # b first: with a first, blocks 2:4 would be a gap the mover fills at once
            x.start([mover.address]).wait_ready()
        # placement counts the servers the mover reached itself (coverage shows the same)
        until(lambda: len({s for blk in mover.ctl("status")["coverage"][0]["blocks"] for s in blk["servers"]}) == 3,
              20, "the mover to reach both servers")

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


def test_two_servers_each_alone_trade_places_by_double_holding_during_generations(model_dirs, tmp_path):
    """The corner single moves cannot leave (placement.py): a holds blocks 0:2 alone, b holds
    block 3 alone, and the plan puts b on 0:2 and a on 2:4 (c is fixed on 2:3). b, whose memory
    holds both spans, takes 0:2 and keeps serving 2:4 (its record says `also`), a moves, then b
    lets 2:4 go. Generations run all along and equal Hugging Face's; no block is ever
    uncovered."""
    d = model_dirs("llama", layers=4)
    root = str(tmp_path)
    c = Daemon(root, "c", d, "2:3").seed_speed(0.005)  # fixed: 200 steps/s
    a = auto(root, "a", d, 0.0025, 2)  # 2 blocks at 200 steps/s
    b = auto(root, "b", d, 1 / 600, 2)  # 2 blocks at 300 steps/s
    daemons = [c, a, b]
    try:
        c.start([]).wait_ready()
        a.start([c.address]).wait_ready()
        b.start([c.address]).wait_ready()
        assert (span_of(a), span_of(b)) == ([0, 2], [2, 4])  # a alone on 0:2, b alone on 3:4
        capacities = {x.name: x.ctl("status")["serve"]["capacity"] for x in (a, b)}
        assert capacities == {"a": 4, "b": 4}  # the tiny model fits whole: room for both spans

        stop, results, errors = threading.Event(), [], []

        def generate() -> None:
            seed = 0
            while not stop.is_set():
                try:
                    results.append(greedy(d, c.socket, seed, 24))
                except Exception as e:  # noqa: BLE001 - reported by the test's thread
                    errors.append(repr(e))
                seed += 1

        t = threading.Thread(target=generate)
        t.start()
        seen_also, covered = [], []
        t0 = time.monotonic()
        while not (span_of(a) == [2, 4] and span_of(b) == [0, 2] and b.ctl("status")["serve"]["also"] is None):
            assert time.monotonic() - t0 < RECOVER_LIMIT_S, [x.tail() for x in daemons]
            st = c.ctl("status")
            covered.append(st["coverage"][0]["complete"])
            seen_also += [p["also"] for p in st["peers"] if p.get("also")]
            time.sleep(0.1)
        time.sleep(1.0)
        stop.set()
        t.join(120)
        assert not errors, errors
        assert results and all(torch.equal(ours, theirs) for ours, theirs in results)
        assert all(covered), "a block was uncovered during the trade"
        assert [2, 4] in seen_also  # b announced the old span while it held both
        kinds = [x.ctl("status")["serve"]["last_move"].get("kind") for x in (a, b)]
        assert kinds == ["move", "drop"]
        print(f"traded in {time.monotonic() - t0:.1f} s with {len(results)} generations")
    finally:
        for x in daemons:
            x.stop()
