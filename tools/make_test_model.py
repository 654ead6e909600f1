#!/usr/bin/env python3
"""Make a tiny random-initialised checkpoint with a working tokenizer, downloading nothing.

    python tools/make_test_model.py --family llama --out /tmp/tiny-llama [--layers 4 --hidden 64 ...]

The checkpoint is written by transformers itself (config.json + safetensors, optionally sharded
with an index), so Hugging Face's own model on it is the correctness reference."""

from __future__ import annotations

import argparse
import os
import sys

import torch

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "bloom": ("BloomConfig", "BloomForCausalLM"),
}

# A few lines of text to train the byte-level BPE on, so that the tokenizer has real merges.
CORPUS = """
The swarm serves a large language model from many small machines. Each machine holds a span of
transformer blocks, and every token flows through a chain of servers that together cover them all.
When a server vanishes, the gateway replays the inputs it kept and the chain carries on.
Once upon a time there was a little robot who wanted to learn how to write poems about the sea.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Hello world! How are you today? I am fine, thank you. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
""".strip()

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )


def family_config(family: str, a: argparse.Namespace) -> dict:
    if family == "bloom":
        return dict(vocab_size=a.vocab, hidden_size=a.hidden, n_layer=a.layers, n_head=a.heads,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw = dict(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate or int(a.hidden * 2.5),
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads or a.heads,
        head_dim=a.hidden // a.heads, max_position_embeddings=a.max_positions,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=a.tie,
    )
    if family in ("mistral", "qwen2", "qwen3") and a.sliding_window:
        kw["sliding_window"] = a.sliding_window
        if family in ("qwen2", "qwen3"):
            kw.update(use_sliding_window=True, max_window_layers=0)
    if family == "gemma3":  # sliding layers (window 12, a rope base of their own) and a global one
        kw.update(sliding_window=a.sliding_window or 12, query_pre_attn_scalar=a.hidden // a.heads,
                  hidden_activation="gelu_pytorch_tanh")
        kw.pop("tie_word_embeddings")  # Gemma ties its head to the embeddings always
    if family == "mixtral":  # 4 experts, 2 a position: a tiny model still routes positions apart
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    if a.rope_scaling:
        kw["rope_scaling"] = {"rope_type": "linear", "factor": a.rope_scaling}
    return kw


def make_model(family: str, out: str, **options) -> str:
    """Programmatic entry point used by the tests; options are the CLI's, with underscores."""
    args = parse_args(["--family", family, "--out", out])
    for k, v in options.items():
        if not hasattr(args, k):
            raise TypeError(f"unknown option {k}")
        setattr(args, k, v)
    return build(args)


def build(a: argparse.Namespace) -> str:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg_name, cls_name = FAMILIES[a.family]
    tokenizer = make_tokenizer(a.vocab)
    kw = family_config(a.family, a)
    # a wide init makes greedy decoding of a random model produce varied tokens, so that a
    # wrong position or mask changes the output instead of hiding behind a repeated token
    kw["initializer_range"] = 0.2
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(a.seed)
    model = getattr(transformers, cls_name)(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    os.makedirs(a.out, exist_ok=True)
    shard = f"{a.shard_kb}KB" if a.shard_kb else "10GB"
    model.save_pretrained(a.out, safe_serialization=True, max_shard_size=shard)
    tokenizer.save_pretrained(a.out)
    return a.out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--out", required=True, help="directory to write the checkpoint to")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (default 2.5 x hidden)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", dest="kv_heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--max-positions", dest="max_positions", type=int, default=512)
    p.add_argument("--sliding-window", dest="sliding_window", type=int, default=0)
    p.add_argument("--rope-scaling", dest="rope_scaling", type=float, default=0.0, help="linear rope factor")
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    p.add_argument("--shard-kb", dest="shard_kb", type=int, default=0, help="shard the weights (sizes in KB)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.hidden % a.heads or (a.family != "bloom" and a.heads % (a.kv_heads or a.heads)):
        print("make_test_model: hidden must divide by heads, and heads by kv-heads", file=sys.stderr)
        return 2
    print(build(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
