"""Server-hosted LoRA adapters (serve.adapters): picked by name, used only where hosted, and
equal to PEFT on the full local model."""

import os

import pytest
import torch
from conftest import hf_reference
from helpers import Daemon
from localswarm import wait_converged

from libswarm import AutoDistributedModelForCausalLM
from libswarm.errors import NoRouteError


def test_hosted_adapter_matches_peft_and_routes_only_to_servers_hosting_it(model_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model

    d = model_dirs("llama")
    peft_model = get_peft_model(hf_reference(d), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    adapter_dir = str(tmp_path / "styled")
    peft_model.save_pretrained(adapter_dir)
    peft_model.eval()

    root = str(tmp_path / "swarm")
    hosted = {"serve": {"adapters": {"styled": adapter_dir}}}
    a = Daemon(root, "a", d, "0:3", hosted)
    b = Daemon(root, "b", d, "3:6", hosted)
    plain = Daemon(root, "plain", d, "0:6").seed_speed(1e-5)  # fast and one hop: the route takes it when it can
    gw = Daemon(root, "gw", d, "none")
    everyone = [a, b, plain, gw]
    try:
        for x in everyone:
            x.start([a.address, b.address, plain.address])
        for x in everyone:
            x.wait_ready()
        wait_converged(everyone, 3)
        rows = {p["address"]: p for p in a.ctl("peers")["peers"]}
        assert rows[a.address]["adapters"] == ["styled"]

        ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(4))
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket, adapter="styled")
        with torch.no_grad():
            assert (model(ids).logits - peft_model(input_ids=ids).logits).abs().max().item() <= 1e-4
        kw = dict(do_sample=False, max_new_tokens=8, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), peft_model.generate(input_ids=ids, **kw))
        stats = plain.ctl("status")["stats"]
        assert stats["sessions_opened"] == 0 and stats["forwards"] == 0  # it does not host the adapter

        base = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        with torch.no_grad():
            assert (base(ids).logits - hf_reference(d)(ids).logits).abs().max().item() <= 1e-4

        model.adapter, model.route_timeout_s = "nope", 1.0
        with pytest.raises(NoRouteError, match="adapter 'nope'"):
            model(ids)
    finally:
        for x in everyone:
            x.stop()


def test_bad_adapter_directory_is_a_config_error(model_dirs, tmp_path):
    import subprocess

    from helpers import SWARMD

    d = Daemon(str(tmp_path), "x", model_dirs("llama"), "0:2", {"serve": {"adapters": {"a": str(tmp_path)}}})
    d.write_config([])
    r = subprocess.run([SWARMD, "--config", d.config_path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "serve.adapters.a" in r.stderr and "adapter_config.json" in r.stderr
    assert os.path.exists(d.config_path)
