"""On a GPU: real daemons serving on CUDA, placed by `serve.blocks: auto`, generate what
Hugging Face generates (skipped without CUDA)."""

import time

import pytest
import torch
from conftest import hf_reference
from helpers import running_swarm

from libswarm import AutoDistributedModelForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_auto_placed_cuda_daemons_generate_like_hf(model_dirs):
    d = model_dirs("llama")
    extra = {"serve": {"device": "cuda", "dtype": "float32", "num_blocks": 3, "rebalance_interval_s": 2,
                       "cache": {"max_bytes": "256MiB"}}}
    with running_swarm(d, ["auto", "auto"], extra=extra, seeds="first") as (servers, gw):
        # started together, both may take 0:3 first; then one of them moves to the gap
        t0 = time.monotonic()
        while sorted(s.ctl("status")["serve"]["blocks"] for s in servers) != [[0, 3], [3, 6]]:
            assert time.monotonic() - t0 < 60
            time.sleep(0.5)
        status = servers[0].ctl("status")
        assert status["serve"]["device"].startswith("cuda") and status["serve"]["block_speed"]["step_s"] > 0
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(5))
        kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), hf_reference(d).generate(ids, **kw))
