"""SmolLM2-135M-Instruct (real weights: outliers, a real tokenizer, a chat template) through
three daemons of 10 blocks each, against Hugging Face's own model on the same weights."""

import threading

import pytest
import torch
from helpers import running_swarm
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from libswarm import AutoDistributedModelForCausalLM

SPANS = ["0:10", "10:20", "20:30"]
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colors of the rainbow.",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def swarm(real_model):
    with running_swarm(real_model, SPANS, gateway=False) as (servers, first):
        tokenizer = AutoTokenizer.from_pretrained(real_model)
        model = AutoDistributedModelForCausalLM.from_pretrained(real_model, socket=first.socket)
        ref = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
        yield tokenizer, model, ref


def chat_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def test_chat_answers_equal_hf_token_for_token_and_logits_within_1e_4(swarm):
    tokenizer, model, ref = swarm
    for prompt in PROMPTS:
        ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
        kw = dict(do_sample=False, max_new_tokens=24)
        out = model.generate(ids, **kw)
        expected = ref.generate(ids, **kw)
        assert torch.equal(out, expected), (tokenizer.decode(out[0]), tokenizer.decode(expected[0]))
        with torch.no_grad():
            ours, theirs = model(out).logits, ref(out).logits
        assert (ours - theirs).abs().max().item() < 1e-4
    answer = tokenizer.decode(model.generate(chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[0]}]),
                                             do_sample=False, max_new_tokens=24)[0], skip_special_tokens=True)
    assert "Paris" in answer


def test_beam_search_and_beam_sampling_equal_hf(swarm):
    tokenizer, model, ref = swarm
    ids = chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[1]}])
    for opts in (dict(num_beams=3), dict(num_beams=4, length_penalty=0.6, num_return_sequences=2),
                 dict(num_beams=2, do_sample=True, top_k=30)):
        torch.manual_seed(3)
        ours = model.generate(ids, max_new_tokens=16, **opts)
        torch.manual_seed(3)
        assert torch.equal(ours, ref.generate(ids, max_new_tokens=16, **opts)), opts


def early_exit_draft(model_dir: str, blocks: int):
    """A draft model for speculative decoding: the same model's first `blocks` blocks, then its
    final norm and LM head (same tokenizer, a third of the work per token)."""
    draft = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    draft.model.layers = draft.model.layers[:blocks]
    draft.config.num_hidden_layers = blocks
    return draft


def test_speculative_and_prompt_lookup_decoding_equal_hf_greedy_with_fewer_passes(swarm, real_model):
    tokenizer, model, ref = swarm
    text = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
    ids = chat_ids(tokenizer, [{"role": "user", "content": text}])
    expected = ref.generate(ids, do_sample=False, max_new_tokens=30)
    draft = early_exit_draft(real_model, 10)
    for opts in (dict(assistant_model=draft), dict(prompt_lookup_num_tokens=4)):
        with model.inference_session(max_length=ids.shape[1] + 64) as session:
            steps = counted_steps(session)
            out = model.generate(ids, do_sample=False, max_new_tokens=30, **opts)
        assert torch.equal(out, expected), list(opts)
        generated = out.shape[1] - ids.shape[1]
        assert max(steps[1:]) > 1, (list(opts), steps)  # passes carried drafts
        if "assistant_model" in opts:
            # libswarm's loop: this draft is rarely right (~10 % here), so after a few passes that
            # carry drafts it measures that they do not pay and steps plainly (HF's loop goes on
            # drafting at least one a pass): never more passes than plain decoding
            assert len(steps) <= generated and steps[1:].count(1) > len(steps) // 2, steps
        else:
            assert len(steps) < generated, (list(opts), len(steps), generated)  # several tokens verified per pass
    # libswarm's own loop, drafting while passes are out, with the draft's layers in packed int8
    from libswarm import speculative

    out, stats = speculative.generate(model, speculative.packed_draft(early_exit_draft(real_model, 10), "int8"),
                                      ids, 30, tokenizer.eos_token_id)
    assert torch.equal(out, expected)
    # this draft is rarely right (~10 % here): after a few passes that carry drafts, the loop
    # measures that they do not pay and steps plainly, drafting now and then
    assert stats.drafted > 0 and stats.passes <= out.shape[1] - ids.shape[1] - 1, stats
    assert stats.carried.count(0) > stats.passes // 2, stats


def counted_steps(session) -> list:
    """A list that grows with every step the session sends through the swarm: its positions."""
    steps: list = []
    original = session.step

    def counting(hidden, *args, **kwargs):
        steps.append(hidden.shape[1])
        return original(hidden, *args, **kwargs)

    session.step = counting
    return steps


def test_a_multi_turn_chat_in_one_session_equals_hf_on_the_whole_conversation(swarm):
    tokenizer, model, ref = swarm
    messages: list[dict] = []
    with model.inference_session(max_length=512) as session:
        for turn in ("Hi! What is 2 + 2?", "And what is that times ten?", "Thanks. Say goodbye in French."):
            messages.append({"role": "user", "content": turn})
            ids = chat_ids(tokenizer, messages)
            known = 0 if session.ids is None else session.ids.shape[1]
            if known:  # the servers hold the conversation so far: only the new turn's tokens are sent
                assert torch.equal(ids[:, :known], session.ids), "the chat template must extend the conversation"
            out = model.generate(ids[:, known:], do_sample=False, max_new_tokens=40)
            expected = ref.generate(ids, do_sample=False, max_new_tokens=40)
            assert torch.equal(out, expected), turn
            reply = out[0, ids.shape[1]:]
            messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})


def test_hf_streamers_work_through_the_swarm(swarm):
    tokenizer, model, _ = swarm
    ids = chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "ids", model.generate(ids, do_sample=False, max_new_tokens=24, streamer=streamer)))
    thread.start()
    pieces = list(streamer)  # arrives while generate() runs
    thread.join(60)
    assert len(pieces) > 3
    assert "".join(pieces).strip() == tokenizer.decode(out["ids"][0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_lora_on_the_real_model_gradients_equal_peft_and_the_example_lowers_the_loss(swarm, real_model, tmp_path):
    import os
    import subprocess
    import sys

    from peft import PeftModel

    from libswarm.lora import TARGETS

    tokenizer, model, ref = swarm
    ids = tokenizer(["The swarm serves every block of the model."], return_tensors="pt").input_ids
    targets = ["q_proj", "v_proj", "down_proj"]
    lora = model.add_lora(rank=4, alpha=8, target_modules=targets)
    with torch.no_grad():  # B starts at zero; make it nonzero so that A gets gradients too
        for p in lora.B.values():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids).loss
    loss.backward()
    model.save_lora(str(tmp_path / "adapter"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32),
                                     str(tmp_path / "adapter"), is_trainable=True)
    peft_loss = peft(input_ids=ids, labels=ids).loss
    peft_loss.backward()
    assert abs(loss.item() - peft_loss.item()) <= 1e-4
    for t in targets:
        for part, ours in (("lora_A", lora.A[t].grad), ("lora_B", lora.B[t].grad)):
            theirs = torch.stack([peft.get_parameter(f"base_model.model.model.layers.{i}.{TARGETS['llama'][t]}."
                                                     f"{part}.default.weight").grad for i in range(30)])
            assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4, (t, part)
    model.lora = None  # the rest of the module's tests run without the adapter
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "finetune_lora.py")
    r = subprocess.run([sys.executable, example, real_model, "--socket", model.client.socket_path, "--steps", "6"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(line.split()[-1]) for line in r.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses


def test_bf16_servers_stay_within_the_stated_tolerance_of_hf_in_bf16(real_model):
    """Servers in bfloat16 against HF's own model in bfloat16 on the same weights. bf16 keeps 8
    bits of mantissa, so any difference in the order of operations shows: the stated tolerance
    is 0.1 logit at most anywhere (about 1 % of the logits' spread; measured here: 0, the same
    kernels in the same order), and the greedy answer must be the same."""
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    ids = chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    ref = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.bfloat16).eval()
    with running_swarm(real_model, SPANS, gateway=False, extra={"serve": {"dtype": "bfloat16"}}) as (_, first):
        model = AutoDistributedModelForCausalLM.from_pretrained(real_model, socket=first.socket, dtype=torch.bfloat16)
        out = model.generate(ids, do_sample=False, max_new_tokens=12)
        expected = ref.generate(ids, do_sample=False, max_new_tokens=12)
        with torch.no_grad():
            ours, theirs = model(expected).logits.float(), ref(expected).logits.float()
    spread = theirs.std().item()
    err = (ours - theirs).abs().max().item()
    print(f"bf16: max |logit difference| {err:.3f}, logits' spread {spread:.2f}")
    assert err <= 0.1, err
    assert torch.equal(out, expected)
