"""Two checkpoints with the same config.json but different weights share a model id; the
fingerprints of their blocks (a hash of every byte) keep them from being mixed in one route,
even when they differ in one element of one middle row."""

import pytest
import torch
from conftest import hf_reference, tampered_copy
from helpers import running_swarm
from localswarm import Daemon, until

from libswarm import AutoDistributedModelForCausalLM, NoRouteError
from libswarm.checkpoint import Checkpoint


def test_server_with_other_weights_is_never_routed_to(model_dirs, tmp_path):
    ours = model_dirs("llama")
    other = model_dirs("llama", seed=99)  # same shapes and config, other random weights
    assert Checkpoint(ours).block_fingerprint(4) != Checkpoint(other).block_fingerprint(4)
    theirs = tampered_copy(ours, str(tmp_path / "tampered"), block=3)  # one element of a middle row
    assert Checkpoint(ours).model_id == Checkpoint(theirs).model_id
    assert [Checkpoint(ours).block_fingerprint(b) == Checkpoint(theirs).block_fingerprint(b)
            for b in range(6)] == [True, True, True, False, True, True]
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(15))
    opts = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    expected = hf_reference(ours).generate(ids, **opts)
    impostor = Daemon(str(tmp_path), "impostor", theirs, "3:6")
    with running_swarm(ours, ["0:3", "3:6"]) as (servers, gw):
        impostor.start([])
        try:
            impostor.wait_ready()
            gw.cfg["discovery"]["seeds"].append(impostor.address)
            gw.stop()
            gw.start(gw.cfg["discovery"]["seeds"]).wait_ready()

            def settled() -> bool:  # the restarted gateway's first contact with each seed takes a round
                states = {p["address"]: p["state"] for p in gw.ctl("peers")["peers"]}
                return states.get(impostor.address) not in (None, "contacting") and \
                    states.get(servers[1].address) not in (None, "contacting")

            until(settled, 15, "the gateway's first contacts")
            peers = {p["address"]: p for p in gw.ctl("peers")["peers"]}
            assert peers[impostor.address]["state"] == "mismatch"
            assert "weights of block 3 differ" in peers[impostor.address]["error"]
            assert peers[servers[1].address]["state"] == "online"
            model = AutoDistributedModelForCausalLM.from_pretrained(ours, socket=gw.socket)
            assert torch.equal(model.generate(ids, **opts), expected)
            servers[1].kill()  # the impostor is the only other server for 3:6, and must not be used
            model.route_timeout_s = 2
            with pytest.raises(NoRouteError, match="blocks 3:6"):
                model.generate(ids, **opts)
        finally:
            impostor.stop()
