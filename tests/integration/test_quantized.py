"""Servers with quantized weights and int8 KV caches (serve.quant, serve.cache.kv_dtype) in a
swarm of real daemons on SmolLM2-135M: what they hold, what they say, how gateways route
around them (swarm.quantized) and check them (against any server of their blocks, at the
tolerance of that pair of numerics)."""

import subprocess

import psutil
import pytest
import torch
from helpers import SWARMCTL, running_swarm, until
from transformers import AutoModelForCausalLM, AutoTokenizer

from libswarm import AutoDistributedModelForCausalLM, quantized
from libswarm.checkpoint import Checkpoint
from libswarm.client import SwarmClient
from libswarm.convert import convert_gguf
from libswarm.quantized import PackedLinear

# s0 serves the first half; s1 the second with int8 (or int4) weights and an int8 KV cache, s2
# the same blocks unquantized but announced slow, so that a gateway that takes quantized servers
# uses s1. On this CPU int8 and int4 run on torch's packed kernels (swarmd/runtime/quant.py).
SPANS = ["0:15", "15:30", "15:30"]
CACHE = "16MiB"
# of the float32 weights' bytes: int8 rows with a bfloat16 scale each; int4 with a bfloat16
# scale and minimum per 32 weights (5 bits a weight); the norms stay float32
SHARE = {"int8": 0.27, "int4": 0.17}
# s0's own gateway takes quantized servers and checks a span of every step elsewhere; the
# gateway-only daemon refuses quantized servers
USES = {"swarm": {"quantized": "use", "verify": "sample", "verify_probability": 1.0}}


@pytest.fixture(scope="module", params=["int8", "int4"])
def swarm(real_model, request):
    extra = {"swarm": {"quantized": "refuse"}, "serve": {"cache": {"max_bytes": CACHE}}}
    quantized = {"serve": {"quant": request.param, "cache": {"max_bytes": CACHE, "kv_dtype": "int8"}}}
    with running_swarm(real_model, SPANS, extra=extra, speeds={2: 0.5},
                       server_extra={0: USES, 1: quantized}) as (servers, gw):
        yield servers, gw, request.param


def chat(tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def sessions_opened(daemon) -> int:
    return SwarmClient(socket=daemon.socket).status()["stats"]["sessions_opened"]


def test_a_quantized_server_holds_less_and_twice_the_tokens_and_says_so(swarm):
    servers, gw, kind = swarm
    plain, quant = (SwarmClient(socket=s.socket).status() for s in (servers[2], servers[1]))
    assert quant["serve"]["quant"] == kind and plain["serve"]["quant"] == "none"
    assert quant["serve"]["weight_bytes"] <= SHARE[kind] * plain["serve"]["weight_bytes"]
    assert quant["cache"]["kv_dtype"] == "int8" and plain["cache"]["kv_dtype"] == "float32"
    assert quant["cache"]["max_bytes"] == plain["cache"]["max_bytes"]
    # the same budget holds 4 / (1 + 2 / 64) times the positions of a float32 cache
    ratio = quant["cache"]["capacity_tokens"] / plain["cache"]["capacity_tokens"]
    assert 3.8 <= ratio <= 3.9, ratio
    # its record says so, and an operator sees it
    peers = {p["address"]: p for p in SwarmClient(socket=gw.socket).peers()}
    assert peers[servers[1].address]["quant"] == kind and peers[servers[1].address]["kv_dtype"] == "int8"
    assert peers[servers[2].address]["quant"] == "none"
    out = subprocess.run([SWARMCTL, "--socket", servers[1].socket, "status"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"{kind} weights" in out.stdout and "int8:" in out.stdout and "tokens free" in out.stdout
    assert f"15:30 {kind}+int8 KV" in out.stdout  # its row among the peers


def test_generation_through_quantized_weights_and_cache_gives_hf_answer_and_passes_checks_by_unquantized_servers(
        swarm, real_model):
    servers, gw, kind = swarm
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    ref = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(real_model, socket=servers[0].socket)
    before = sessions_opened(servers[1])
    ids = chat(tokenizer, "What is the capital of France? Answer in one sentence.")
    kw = dict(do_sample=False, max_new_tokens=12)
    out = model.generate(ids, **kw)
    assert sessions_opened(servers[1]) > before  # it went through the quantized server
    assert torch.equal(out, ref.generate(ids, **kw)), tokenizer.decode(out[0])
    # every step had a span checked elsewhere. s1 (int8, int4) has no twin of its quantization: its
    # outputs are held against the unquantized s2's at the tolerance of that pair (issue 38,
    # finding 3: they used to be checked against nobody), and pass
    until(lambda: any(r["address"] == servers[1].address and r["checks_passed"] > 0
                      for r in SwarmClient(socket=servers[0].socket).status()["gateway"]["verify"]["servers"]),
          30, f"a check of the {kind} server")
    status = SwarmClient(socket=servers[0].socket).status()["gateway"]["verify"]
    assert status["checks"].get("failed", 0) == 0, status
    assert all(s["offences"] == 0 and s["distrusted_s"] == 0 for s in status["servers"])


def test_a_gateway_that_refuses_quantized_servers_routes_around_them(swarm, real_model):
    servers, gw, _ = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(real_model, socket=gw.socket)
    before = [sessions_opened(s) for s in servers[1:]]
    ids = torch.randint(100, 40000, (1, 6), generator=torch.Generator().manual_seed(8))
    model.generate(ids, do_sample=False, max_new_tokens=3)
    until(lambda: sessions_opened(servers[2]) > before[1], 10, "the unquantized server opened no session")
    assert sessions_opened(servers[1]) == before[0]


def test_after_generations_a_quantized_server_holds_less_memory_than_a_float_one_by_about_its_weights(swarm):
    """RSS, anonymous and file-backed, after the generations above: a server quantizing its
    span used to hold more than a float one (the float weights stayed mapped through the norms
    read beside them, and the quantization's temporaries stayed in the C heap)."""
    servers, _, _ = swarm
    plain, quant = (SwarmClient(socket=s.socket).status()["serve"]["weight_bytes"] for s in (servers[2], servers[1]))
    saved = (psutil.Process(servers[2].proc.pid).memory_info().rss
             - psutil.Process(servers[1].proc.pid).memory_info().rss)
    assert saved >= 0.6 * (plain - quant), (saved >> 20, (plain - quant) >> 20)


@pytest.fixture(scope="module")
def kept(tmp_path_factory, real_gguf):
    """SmolLM2's Q4_1 file imported with its quantization kept, served by two daemons that ask
    for no quantization: on this CPU they serve the stored int4 as it is."""
    out = tmp_path_factory.mktemp("kept")
    convert_gguf(real_gguf, str(out), "float32", keep_quant=True)
    with running_swarm(str(out), ["0:15", "15:30"]) as (servers, gw):
        yield str(out), servers, gw


def test_a_gguf_kept_quantized_is_served_as_its_int4_and_answers_as_those_weights_do(kept, real_model):
    path, servers, gw = kept
    statuses = [SwarmClient(socket=s.socket).status()["serve"] for s in servers]
    assert all(s["quant"] == "int4" for s in statuses)  # announced as what it computes with
    # a span's float32 weights: 15 blocks of q, k, v, o (576 x 576, 192 x 576 twice, 576 x 576) and
    # the MLP's three 576 x 1536, and two norms of 576
    float_bytes = 15 * 4 * (576 * (576 + 192 + 192 + 576 + 3 * 1536) + 2 * 576)
    assert all(s["weight_bytes"] <= SHARE["int4"] * float_bytes for s in statuses), statuses
    peers = {p["address"]: p for p in SwarmClient(socket=gw.socket).peers()}
    assert all(peers[s.address]["quant"] == "int4" for s in servers)
    # the reference: Hugging Face's model with the stored values dequantized into its weights
    ref = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    ck = Checkpoint(path)
    weights = dict(ref.named_parameters())
    with torch.no_grad():
        for name in ck.index:
            hit = quantized.stored_kind(name)
            if hit is not None:
                parts = list(ck.read(quantized.part_names(*hit)).values())
                weights[hit[0]].copy_(quantized.dequantize(hit[1], parts))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = chat(tokenizer, "Name three colours of the rainbow.")
    answer = ref.generate(ids, do_sample=False, max_new_tokens=24)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, socket=gw.socket)
    with torch.no_grad():
        got, want = model(answer).logits[0], ref(answer).logits[0]
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree  # the kernels round their inputs to bfloat16; a wrong value would be far off
    assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).median() < 0.05


def test_the_app_runs_a_kept_checkpoints_lm_head_in_int8_unless_told_otherwise(kept):
    """libswarm's head_quant: "auto" packs the LM head in int8 for a checkpoint stored quantized
    (a token's step reads the whole head in the app); "none" keeps it float; the two agree as int8
    rows do, and int4 is taken on request."""
    path, _, gw = kept
    ids = torch.randint(3, 40000, (1, 24), generator=torch.Generator().manual_seed(5))
    heads, logits = {}, {}
    for head in ("auto", "none", "int4"):
        model = AutoDistributedModelForCausalLM.from_pretrained(path, socket=gw.socket, head_quant=head)
        heads[head] = model.lm_head
        with torch.no_grad():
            logits[head] = model(ids).logits[0]
    assert isinstance(heads["auto"], PackedLinear) and heads["auto"].bits == 8
    assert type(heads["none"]) is torch.nn.Linear
    assert isinstance(heads["int4"], PackedLinear) and heads["int4"].bits == 4
    # the tied head is a copy of its own: the embeddings keep their float weights
    assert model.get_input_embeddings().weight.dtype == torch.float32
    for head, bound in (("auto", 0.02), ("int4", 0.15)):
        err = (logits[head] - logits["none"]).norm(dim=-1) / logits["none"].norm(dim=-1)
        assert 0 < err.max() < bound, (head, err.max())  # quantized (not equal), and only by rounding
        assert (logits[head].argmax(-1) == logits["none"].argmax(-1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="head_quant 'int2'"):
        AutoDistributedModelForCausalLM.from_pretrained(path, socket=gw.socket, head_quant="int2")
