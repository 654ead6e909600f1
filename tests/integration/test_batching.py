"""Many sessions at once: servers run the decode steps of different sessions that arrive
together as one batch, and every session's tokens stay those of Hugging Face run alone."""

import threading

import torch
from conftest import decisive_prompts, hf_reference
from helpers import running_swarm

from libswarm import AutoDistributedModelForCausalLM, SessionError

CLIENTS = 8
NEW_TOKENS = 12
GEN = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)


def test_concurrent_sessions_are_batched_and_each_equals_hf_alone(model_dirs):
    d = model_dirs("llama", layers=4)
    hf = hf_reference(d)
    prompts = decisive_prompts(hf, [3 + k for k in range(CLIENTS)], GEN)
    expected = [hf.generate(p, **GEN) for p in prompts]
    # a window longer than a step here, so that steps meet even on a loaded machine
    with running_swarm(d, ["0:2", "2:3", "3:4"], extra={"serve": {"batch_window_ms": 20}}) as (servers, gw):
        models = [AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket) for _ in range(CLIENTS + 1)]
        outputs: dict[int, object] = {}
        start = threading.Barrier(CLIENTS + 1)

        def client(k: int) -> None:
            start.wait()
            try:
                if k == CLIENTS:  # a session too short for its generation: it fails mid-way and is closed
                    with models[k].inference_session(max_length=prompts[0].shape[1] + 4):
                        models[k].generate(prompts[0], **GEN)
                else:
                    outputs[k] = models[k].generate(prompts[k], **GEN)
            except Exception as e:
                outputs[k] = e

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = [s.ctl("status")["stats"] for s in servers]
    assert isinstance(outputs[CLIENTS], SessionError), outputs[CLIENTS]
    for k in range(CLIENTS):
        assert not isinstance(outputs[k], Exception), f"client {k}: {outputs[k]!r}"
        assert torch.equal(outputs[k], expected[k]), f"client {k} differs from HF"
    for st in stats:
        print(f"server: {st['steps']} steps in {st['runs']} runs, {st['batched_steps']} batched")
        assert st["batched_steps"] > 0 and st["runs"] < st["steps"]
    assert sum(st["steps"] - st["runs"] for st in stats) >= CLIENTS * NEW_TOKENS // 2  # most steps shared a run
