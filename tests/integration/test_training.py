"""Training through the swarm: gradients flow back through real daemons (fp32; the reference
is Hugging Face's model on the same weights, run locally)."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import hf_reference
from helpers import running_swarm

from libswarm import AutoDistributedModelForCausalLM


@pytest.fixture(scope="module")
def swarm(model_dirs):
    d = model_dirs("llama")
    # known speeds (1 ms per block and position in forwards), so that the gateway's split of large
    # batches, which follows the servers' measured throughput, does not depend on this machine
    with running_swarm(d, ["0:2", "2:4", "4:6", "2:6"], speeds={i: 0.001 for i in range(4)}) as (servers, gw):
        yield d, servers, gw


def optimize(opt, loss_fn, steps: int) -> list[float]:
    """`steps` optimizer steps on loss_fn(); the losses."""
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def grads(model, ids, labels):
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=emb, labels=labels).loss
    loss.backward()
    return loss.detach(), emb.grad


def test_gradient_wrt_input_embeddings_equals_hf(swarm):
    d, servers, gw = swarm
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(21))
    ref_loss, ref_grad = grads(hf_reference(d), ids, ids)
    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    loss, grad = grads(model, ids, ids)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    rel = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    assert rel <= 1e-4, rel
    assert sum(s.ctl("status")["stats"].get("backwards", 0) for s in servers) > 0


def test_prompt_tuning_lowers_the_loss_like_the_local_model(swarm):
    """Trainable prompt embeddings prepended on the client; 20 Adam steps through the swarm
    follow the same steps run locally."""
    d, servers, gw = swarm
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(22))

    def train(model) -> list[float]:
        torch.manual_seed(0)
        prompt = torch.nn.Parameter(torch.randn(1, 4, model.config.hidden_size) * 0.1)
        opt = torch.optim.Adam([prompt], lr=0.05)
        labels = torch.cat([torch.full((2, 4), -100), ids], dim=1)
        return optimize(opt, lambda: model(inputs_embeds=torch.cat(
            [prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1), labels=labels).loss, 20)

    remote = train(AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket))
    local = train(hf_reference(d).requires_grad_(False))
    assert remote[-1] < remote[0]
    assert max(abs(a - b) for a, b in zip(remote, local)) <= 1e-4


@pytest.mark.parametrize("example", ["prompt_tuning.py", "prompt_tuning.py --deep", "finetune_lora.py"])
def test_examples_run_and_the_loss_falls(swarm, example):
    d, servers, gw = swarm
    name, *flags = example.split()
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", name)
    r = subprocess.run([sys.executable, path, d, "--socket", gw.socket, "--steps", "12", *flags], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(line.split()[-1]) for line in r.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses


def test_lora_training_steps_match_peft_locally_and_server_memory_stays_flat(swarm, tmp_path):
    """20 AdamW steps of the same adapter, through the swarm and in PEFT on the local model."""
    import psutil
    from peft import LoraConfig, get_peft_model

    d, servers, gw = swarm
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(25))
    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    torch.manual_seed(0)
    lora = model.add_lora(rank=4, alpha=8, target_modules=["q_proj", "down_proj"])
    model.save_lora(str(tmp_path / "init"))  # the same starting point for PEFT
    ref = get_peft_model(hf_reference(d), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(ref, load_file(str(tmp_path / "init" / "adapter_model.safetensors")))

    def train(m, params, steps=20) -> list[float]:
        return optimize(torch.optim.AdamW(params, lr=1e-2), lambda: m(input_ids=ids, labels=ids).loss, steps)

    rss = [psutil.Process(s.proc.pid).memory_info().rss for s in servers]
    remote = train(model, list(lora.parameters()))
    local = train(ref, [p for p in ref.parameters() if p.requires_grad])
    assert remote[-1] < remote[0] and max(abs(a - b) for a, b in zip(remote, local)) <= 1e-3, (remote, local)
    train(model, list(lora.parameters()), steps=80)  # 100 steps in all: nothing of ours may pile up there
    grown = [psutil.Process(s.proc.pid).memory_info().rss - r for s, r in zip(servers, rss)]
    assert max(grown) < 64 * 2**20, grown


@pytest.mark.parametrize("shape", [(2, 9), (8, 70)])  # split in 2 and in 4 (seeded speeds: over 20 ms)
def test_client_lora_gradients_equal_peft_and_the_saved_adapter_loads_in_peft(swarm, tmp_path, shape):
    from peft import PeftModel

    from libswarm.lora import TARGETS

    d, servers, gw = swarm
    ids = torch.randint(3, 500, shape, generator=torch.Generator().manual_seed(24))
    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    targets = ["q_proj", "v_proj", "down_proj"]
    lora = model.add_lora(rank=4, alpha=8, target_modules=targets)
    with torch.no_grad():  # B starts at zero; make it nonzero so that A gets gradients too
        for p in lora.B.values():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    backwards = sum(s.ctl("status")["stats"]["backwards"] for s in servers)
    loss = model(ids, labels=ids).loss
    loss.backward()
    calls = sum(s.ctl("status")["stats"]["backwards"] for s in servers) - backwards
    assert calls >= (8 if shape[0] * shape[1] >= 512 else 2)  # a chain has 2 or 3 hops; 4 chains when split
    model.save_lora(str(tmp_path / "adapter"))

    ref = PeftModel.from_pretrained(hf_reference(d), str(tmp_path / "adapter"), is_trainable=True)
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    n = model.checkpoint.num_layers
    for t in targets:
        for part, ours in (("lora_A", lora.A[t].grad), ("lora_B", lora.B[t].grad)):
            theirs = torch.stack([ref.get_parameter(f"base_model.model.model.layers.{i}.{TARGETS['llama'][t]}."
                                                    f"{part}.default.weight").grad for i in range(n)])
            rel = ((ours - theirs).norm() / theirs.norm()).item()
            assert rel <= 1e-4, (t, part, rel)
    with torch.no_grad():  # the adapter trained here gives the same outputs in PEFT on the local model
        assert (model(ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_deep_prompt_gradients_equal_hf_with_the_same_prompts_added_locally(swarm):
    import torch.nn.functional as F

    d, servers, gw = swarm
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(26))
    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    prompts = model.add_prompts(3, deep=True)
    with torch.no_grad():
        prompts["deep"].normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    out = model(ids, labels=ids)
    assert out.logits.shape[1] == ids.shape[1]  # the caller's positions only
    out.loss.backward()

    ref = hf_reference(d).requires_grad_(False)
    p_in = prompts["input"].detach().clone().requires_grad_(True)
    p_deep = prompts["deep"].detach().clone().requires_grad_(True)

    def adder(i):
        def hook(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            hs = torch.cat([hs[:, :3] + p_deep[i], hs[:, 3:]], dim=1)
            if args:
                return (hs, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hs}
        return hook

    handles = [layer.register_forward_pre_hook(adder(i), with_kwargs=True) for i, layer in enumerate(ref.model.layers)]
    try:
        emb = torch.cat([p_in.expand(2, -1, -1), ref.model.embed_tokens(ids)], dim=1)
        logits = ref(inputs_embeds=emb).logits[:, 3:]
    finally:
        for h in handles:
            h.remove()
    ref_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    ref_loss.backward()
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-5
    for ours, theirs in ((prompts["input"].grad, p_in.grad), (prompts["deep"].grad, p_deep.grad)):
        assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4


def test_bad_lora_gets_clear_errors(swarm):
    from libswarm.errors import TensorError

    d, servers, gw = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    with pytest.raises(ValueError, match="unknown LoRA target modules"):
        model.add_lora(target_modules=["qq_proj"])
    h = torch.zeros(1, 3, model.config.hidden_size)
    n = model.checkpoint.num_layers
    wrong = {"lora_A.self_attn.q_proj": torch.zeros(n, 4, 7), "lora_B.self_attn.q_proj": torch.zeros(n, 64, 4)}
    with pytest.raises(TensorError, match="want A"):
        model.client.forward(model.model_id, h, lora=wrong, lora_scaling=2.0)
    unknown = {"lora_A.self_attn.nope": torch.zeros(n, 4, 64), "lora_B.self_attn.nope": torch.zeros(n, 64, 4)}
    with pytest.raises(TensorError, match="not a module of these blocks"):
        model.client.forward(model.model_id, h, lora=unknown, lora_scaling=2.0)
    model.add_lora(rank=2)
    with pytest.raises(ValueError, match="not in inference"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, pad_token_id=0)


def test_a_server_killed_between_forward_and_backward_does_not_fail_the_step(swarm):
    d, servers, gw = swarm
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(23))
    _, ref_grad = grads(hf_reference(d), ids, ids)
    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=emb, labels=ids).loss
    victim = next(s for s in servers if s.ctl("status")["serve"]["blocks"] in ([2, 4], [4, 6]))
    victim.kill(signal.SIGKILL)  # its blocks are also held by the 2:6 server
    loss.backward()
    assert ((emb.grad - ref_grad).norm() / ref_grad.norm()).item() <= 1e-4
