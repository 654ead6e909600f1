"""The server's own blocks against Hugging Face's model on the same weights, in-process."""

import pytest
import torch
from conftest import embed, head, hf_reference

from libswarm.checkpoint import Checkpoint, model_id_of
from libswarm.errors import CacheFullError, ConfigError, LimitError, ModelError
from libswarm.layers import positions_from_mask
from swarmd.runtime.cache import CacheBudget, SessionCache
from swarmd.runtime.span import Span

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma3", "bloom"]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_two_spans_with_padding_equal_hf_logits(model_dirs, family):
    d = model_dirs(family)
    ref = hf_reference(d)
    ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    expected = ref(ids, attention_mask=mask).logits
    ck = Checkpoint(d)
    spans = [Span(ck, 0, 3, torch.device("cpu"), torch.float32).load(),
             Span(ck, 3, 6, torch.device("cpu"), torch.float32).load()]
    pos = positions_from_mask(mask) if family == "bloom" else torch.arange(20).expand(2, 20)
    h = embed(ref, ids)
    for s in spans:
        h = s.run(h, pos, mask.bool(), s.start, s.end)
    got = head(ref, h)
    assert (got[0] - expected[0]).abs().max() <= 1e-4
    assert (got[1, 5:] - expected[1, 5:]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cached_steps_of_several_tokens_equal_one_forward(model_dirs, family):
    d = model_dirs(family)
    ref = hf_reference(d)
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(2))
    expected = ref(ids).logits
    span = Span(Checkpoint(d), 0, 6, torch.device("cpu"), torch.float32).load()
    cache = SessionCache(first=0, last=6, batch=1, max_length=32, kv_heads=span.num_kv_heads,
                         head_dim=span.head_dim, dtype=torch.float32, device=torch.device("cpu"))
    h, outs = embed(ref, ids), []
    for a, b in [(0, 7), (7, 8), (8, 13), (13, 14), (14, 24)]:  # prefill, single tokens, multi-token steps
        outs.append(span.run(h[:, a:b], torch.arange(a, b)[None], None, 0, 6, cache=cache))
    assert cache.length == 24
    assert (head(ref, torch.cat(outs, 1)) - expected).abs().max() <= 1e-4


def test_span_reads_only_its_blocks_from_a_sharded_checkpoint(model_dirs, monkeypatch):
    d = model_dirs("llama", shard_kb=60)
    ck = Checkpoint(d)
    assert len(set(ck.index.values())) > 1, "the test model should be sharded"
    read: list[str] = []
    orig = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, names: (read.extend(names), orig(self, names))[1])
    Span(ck, 2, 4, torch.device("cpu"), torch.float32).load()
    assert read and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in read)


def test_bad_checkpoints_raise_model_errors(tmp_path, model_dirs):
    with pytest.raises(ModelError, match="does not exist"):
        Checkpoint(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ModelError, match="unsupported architecture"):
        Checkpoint(str(tmp_path))
    with pytest.raises(ConfigError, match="out of range"):
        Span(Checkpoint(model_dirs("llama")), 4, 9, torch.device("cpu"), torch.float32)


def test_model_id_ignores_dtype_and_version_but_not_shape():
    base = {"model_type": "llama", "hidden_size": 64, "torch_dtype": "float32", "transformers_version": "5.1"}
    same = dict(base, torch_dtype="bfloat16", transformers_version="5.24")
    other = dict(base, hidden_size=128)
    assert model_id_of(base) == model_id_of(same) != model_id_of(other)
    assert model_id_of(dict(base, model_id="mine")) == "mine"


def test_cache_budget_and_limits():
    budget = CacheBudget(1000)
    budget.reserve(600)
    with pytest.raises(CacheFullError, match="needs 500 bytes"):
        budget.reserve(500)
    budget.release(600)
    assert budget.free_bytes == 1000
    cache = SessionCache(first=0, last=1, batch=1, max_length=4, kv_heads=1, head_dim=2, dtype=torch.float32,
                         device=torch.device("cpu"))
    assert cache.nbytes == SessionCache.bytes_needed(blocks=1, batch=1, max_length=4, kv_heads=1, head_dim=2,
                                                     dtype=torch.float32) == 2 * 4 * 2 * 4
    with pytest.raises(LimitError, match="max_length 4"):
        cache.check_step(1, 5)


def test_serve_dtype_auto_on_a_cpu_times_both_dtypes_once_and_takes_bfloat16_only_when_clearly_faster(
        model_dirs, tmp_path, monkeypatch):
    """serve.dtype auto on a CPU: without native bfloat16 it is float32 and nothing is timed;
    with it, one block is timed in both, bfloat16 taken only at <= AUTO_BF16_SHARE of
    float32's step, and the choice kept: a restart (or a hand-written choice) is not re-timed,
    a malformed one is."""
    import json

    from swarmd.runtime import speed

    ckpt = Checkpoint(model_dirs("llama"))
    state = str(tmp_path)
    assert speed.auto_cpu_dtype(ckpt, state, ckpt.model_id, native=False) == torch.float32
    assert not (tmp_path / "throughput.json").exists()

    chosen = speed.auto_cpu_dtype(ckpt, state, ckpt.model_id, native=True)
    kept = json.loads((tmp_path / "throughput.json").read_text())[f"{ckpt.model_id}:cpu:auto"]
    f32, bf16 = kept["step_s"]["float32"], kept["step_s"]["bfloat16"]
    assert 0 < f32 < 1 and 0 < bf16 < 1
    assert chosen == (torch.bfloat16 if bf16 <= speed.AUTO_BF16_SHARE * f32 else torch.float32)
    assert kept["dtype"] == str(chosen)[6:]

    def no_timing(*a, **k):
        raise AssertionError("timed again")

    monkeypatch.setattr(speed.Span, "load", no_timing)
    assert speed.auto_cpu_dtype(ckpt, state, ckpt.model_id, native=True) == chosen
    for dtype in ("bfloat16", "float32"):
        (tmp_path / "throughput.json").write_text(json.dumps({f"{ckpt.model_id}:cpu:auto": {"dtype": dtype}}))
        assert speed.auto_cpu_dtype(ckpt, state, ckpt.model_id, native=True) == getattr(torch, dtype)
    monkeypatch.undo()
    (tmp_path / "throughput.json").write_text(json.dumps({f"{ckpt.model_id}:cpu:auto": {"dtype": "int3"}}))
    assert speed.auto_cpu_dtype(ckpt, state, ckpt.model_id, native=True) in (torch.float32, torch.bfloat16)
    assert json.loads((tmp_path / "throughput.json").read_text())[f"{ckpt.model_id}:cpu:auto"]["dtype"] != "int3"
    (tmp_path / "throughput.json").write_text("[1, 2]")  # not a table: timed again, the file made right
    speed.auto_cpu_dtype(ckpt, state, ckpt.model_id, native=True)
    assert f"{ckpt.model_id}:cpu:auto" in json.loads((tmp_path / "throughput.json").read_text())


@pytest.mark.parametrize("step_s", [0.0, -1.0, float("nan"), float("inf")])
def test_an_impossible_kept_speed_is_measured_again(model_dirs, tmp_path, step_s):
    """throughput.json with step_s 0 (hand-edited, corrupted) crashed placement with a division
    by zero; it is measured again instead."""
    from swarmd.runtime.speed import BlockSpeed, measure_block_speed, save_speed, speed_key

    ckpt = Checkpoint(model_dirs("llama"))
    key = speed_key(ckpt.model_id, "cpu", torch.float32)
    save_speed(str(tmp_path), key, BlockSpeed(step_s, 1000.0, 100_000))
    speed = measure_block_speed(ckpt, torch.device("cpu"), torch.float32, str(tmp_path), ckpt.model_id)
    assert 0 < speed.step_s < 1 and speed.span_throughput(3) > 0
