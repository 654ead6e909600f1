"""What an operator meets with fixed spans that do not overlap: the swarm says that each block
has one server only, a gap's age counts from when it began (however seldom anyone asks), the
app hears why its request waits while it waits, and a gap closed and opened again starts anew."""

import logging
import time

import pytest
import torch
from localswarm import running_swarm, until

from libswarm import AutoDistributedModelForCausalLM
from libswarm.errors import NoRouteError


def log_count(daemon, text: str) -> int:
    return daemon.tail(1 << 20).count(text)


def gap_for_s(status: dict, blocks: list[int]) -> float | None:
    for m in status["coverage"][0]["missing"]:
        if m["blocks"] == blocks:
            return m["for_s"]
    return None


def test_fixed_spans_warn_of_single_servers_and_gaps_are_timed_and_told_to_the_app(model_dirs, caplog):
    d = model_dirs("llama")
    with running_swarm(d, ["0:3", "3:6"]) as (servers, gw):
        # a swarm that any one loss stops: status says so at once, the log once the table settled
        single = gw.ctl("status")["coverage"][0]["single"]
        assert [s["blocks"] for s in single] == [[0, 3], [3, 6]]
        until(lambda: log_count(gw, "one server only") >= 1, 30, "the single-server warning in the log")

        servers[1].kill()
        # the swarm notices (another daemon's view); then nobody asks the gateway for a while
        until(lambda: gap_for_s(servers[0].ctl("status"), [3, 6]) is not None, 30, "the gap seen")
        seen = time.monotonic()
        time.sleep(8)
        aged = gap_for_s(gw.ctl("status"), [3, 6])
        assert aged is not None and aged >= 8 - 3, aged  # counted from when it began, not from this look

        # the app is told why it waits, while it waits
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(3))
        caplog.set_level(logging.WARNING, logger="libswarm")
        with pytest.raises(NoRouteError), model.inference_session(max_length=16, route_timeout_s=9):
            model(ids)
        said = [r.getMessage() for r in caplog.records if r.name == "libswarm"]
        assert any("no server holds blocks 3:6" in m for m in said), said

        # back, then gone again: the second gap is aged from its own start
        servers[1].revive([s.address for s in servers])
        until(lambda: log_count(gw, "are served again") >= 1, 30, "the gateway seeing the gap close")
        servers[1].kill()
        killed = time.monotonic()
        until(lambda: log_count(gw, "no server holds blocks 3:6") >= 2, 30, "the second gap in the log")
        aged = gap_for_s(gw.ctl("status"), [3, 6])
        assert aged is not None and aged <= time.monotonic() - killed + 1.5, (aged, time.monotonic() - seen)
