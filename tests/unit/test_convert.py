"""GGUF files converted tensor by tensor (libswarm/convert.py): every tensor equal to what
transformers' own GGUF reader gives, in every dtype, sharded one file per block, and read back
by safetensors itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from libswarm.checkpoint import Checkpoint
from libswarm.convert import convert_gguf, default_dtype
from libswarm.errors import ModelError


@pytest.fixture(scope="module")
def hf_state(real_gguf):
    from transformers import AutoModelForCausalLM

    folder, file = os.path.split(real_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    return model.state_dict(), model.config


@pytest.fixture(scope="module")
def float32_converted(real_gguf, tmp_path_factory) -> tuple[str, dict]:
    """The file converted to float32 once, for the tests that only read what was written."""
    out = tmp_path_factory.mktemp("float32")
    return str(out), convert_gguf(real_gguf, str(out), "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_tensor_equals_transformers_reader_in_the_dtype_asked(tmp_path, real_gguf, hf_state, dtype, request):
    state, config = hf_state
    if dtype == "float32":
        out, done = request.getfixturevalue("float32_converted")
        tmp_path = Path(out)
    else:
        done = convert_gguf(real_gguf, str(tmp_path), dtype)
    assert done["dtype"] == dtype and done["parameters"] == 134_515_008
    c = Checkpoint(str(tmp_path))
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(c.index) == set(state) - tied
    got = c.read(sorted(c.index))
    for name, want in state.items():
        if name in tied:
            continue
        assert got[name].dtype == getattr(torch, dtype), name
        assert torch.equal(got[name], want.to(getattr(torch, dtype))), name
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["num_hidden_layers"] == config.num_hidden_layers and saved["dtype"] == dtype
    assert "quantization_config" not in saved
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path)).chat_template  # the tokenizer and its template


def test_each_block_is_a_shard_of_its_own_so_a_span_maps_only_its_files(float32_converted):
    tmp_path = Path(float32_converted[0])
    c = Checkpoint(str(tmp_path))
    files_of = {}
    for name, path in c.index.items():
        files_of.setdefault(path, set()).add(name)
    blocks = [f for f, names in files_of.items() if all(".layers." in n for n in names)]
    assert len(blocks) == 30  # one per block, and each holds one block's tensors only
    for f in blocks:
        assert len({n.split(".layers.")[1].split(".")[0] for n in files_of[f]}) == 1
    outside = [f for f in files_of if f not in blocks]
    assert all(len(files_of[f]) == 1 for f in outside)  # embeddings, norm: a file each
    with open(tmp_path / "model.safetensors.index.json") as fi:
        index = json.load(fi)
    assert index["metadata"]["total_size"] == sum(os.path.getsize(f) for f in files_of) - sum(
        8 + int.from_bytes(open(f, "rb").read(8), "little") for f in files_of)
    with safe_open(blocks[0], framework="pt") as f:  # safetensors' own reader takes our files
        assert f.metadata() == {"format": "pt"} and len(list(f.keys())) == 9
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]


def test_the_conversion_never_holds_the_model_and_large_tensors_go_a_slice_at_a_time(tmp_path, real_gguf):
    """transformers' reader holds every float32 tensor at once (538 MB for this model, and
    again as the model). Converted tensor by tensor, with the embeddings (49152 x 576, 113 MB)
    in 4 MB slices, the conversion's peak RSS grows by less than the float32 model: what
    grows is the tokenizer's and the file's metadata, parsed once (measured: 243 MiB)."""
    code = ("import sys, resource, libswarm.convert as c; c.SLICE_BYTES = 4 << 20; "
            "import transformers, gguf; base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "c.convert_gguf(sys.argv[1], sys.argv[2], 'float32'); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
    out = subprocess.run([sys.executable, "-c", code, real_gguf, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    grown = int(out.split()[-1])
    assert grown < 134_515_008 * 4, f"the conversion grew RSS by {grown >> 20} MiB"


def test_the_default_dtype_is_float32_up_to_a_billion_parameters_and_bad_input_is_one_line(tmp_path, real_gguf):
    assert default_dtype(134_515_008) == "float32" and default_dtype(1_543_714_304) == "bfloat16"
    with pytest.raises(ModelError, match="one of float32"):
        convert_gguf(real_gguf, str(tmp_path), "int3")
    cut = tmp_path / "cut.gguf"
    with open(real_gguf, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelError) as e:
        convert_gguf(str(cut), str(tmp_path / "out"))
    assert "\n" not in str(e.value) and "cut.gguf" in str(e.value)


def _q4k_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
    """Q4_K bytes [rows, row bytes] of random values: per 256 weights a finite float16 d and dmin,
    then 12 bytes of 6-bit scales and mins and 128 bytes of 4-bit values (gguf-py cannot
    quantize to Q4_K; any bytes with finite d and dmin are a valid tensor)."""
    rng = np.random.default_rng(seed)
    n = rows * cols // 256
    d = rng.uniform(1e-4, 1e-2, (n, 2)).astype(np.float16)
    body = rng.integers(0, 256, (n, 140), dtype=np.uint8)
    return np.concatenate([d.view(np.uint8), body], axis=1).reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_a_4_bit_gguf_tensor_maps_to_int4_values_scales_and_minimums_exactly(kind):
    """The 4-bit values, scales and minimums read from a GGUF tensor's own bytes give back
    exactly what the gguf package dequantizes it to (ggml's layouts: the nibble order, Q4_K's
    6-bit scales), and stored as libswarm/quantized.py's parts only the scale and zero round to
    bfloat16 (as torch's kernel takes them): 2^-8 of a group's amplitude at most."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    from libswarm import quantized
    from libswarm.convert import _int4_values

    rows, cols = 32, 512
    qtype = GGMLQuantizationType[kind]
    if kind == "Q4_K":
        raw = _q4k_blocks(rows, cols, 0)
    else:
        raw = quantize(np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32), qtype)
    want = torch.from_numpy(dequantize(raw, qtype)).float().reshape(rows, cols)
    q, scale, low = _int4_values(raw, kind, cols)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (rows, cols // 32)
    got = (q.float().view(rows, -1, 32) * scale[..., None] + low[..., None]).view(rows, cols)
    assert torch.equal(got, want)
    stored = quantized.dequantize("int4", [quantized.pack_int4(q), scale.to(torch.bfloat16),
                                           (low + 8 * scale).to(torch.bfloat16)])
    amplitude = (15 * scale.abs() + low.abs()).repeat_interleave(32, dim=1)
    assert ((stored - want).abs() <= amplitude * 2 ** -8 + 1e-12).all()


def test_a_gguf_imported_with_its_quantization_kept_holds_a_third_of_the_bytes_and_the_same_weights(
        tmp_path, real_gguf, hf_state, request):
    """SmolLM2's Q4_1 file kept as it is: its 4-bit weights as int4 (the Q6_K/Q8_0 ones as
    int8), every weight within the bfloat16 rounding of its group's scale of transformers'
    reader (Llama's q and k rows in transformers' order), a third of the float32 bytes, a model
    id of its own, and a span loads them into the packed layers without a float copy."""
    from libswarm import quantized
    from swarmd.runtime.quant import PackedLinear
    from swarmd.runtime.span import Span

    state, _ = hf_state
    (tmp_path / "q").mkdir()
    done = convert_gguf(real_gguf, str(tmp_path / "q"), "float32", keep_quant=True)
    assert done["kept"]["int4"] > 100 and done["kept"].get("float", 0) == 62  # norms and embeddings
    c = Checkpoint(str(tmp_path / "q"))
    assert c.stored_quant == "int4"
    float_bytes = sum(v.numel() * 4 for v in state.values())
    assert done["bytes"] < 0.4 * float_bytes
    seen = 0
    for name in sorted(c.index):
        hit = quantized.stored_kind(name)
        if hit is None:
            continue
        weight, kind = hit
        parts = list(c.read(quantized.part_names(weight, kind)).values())
        want = state[weight]
        got = quantized.dequantize(kind, parts)
        rows_max = want.abs().amax(dim=1, keepdim=True)
        assert ((got - want).abs() <= rows_max * 2 ** -6).all(), weight
        seen += 1
    assert seen == 30 * 7
    assert Checkpoint(request.getfixturevalue("float32_converted")[0]).model_id != c.model_id

    cpu = torch.device("cpu")
    packed = Span(c, 3, 5, cpu, torch.float32, quant="int4").load()
    floats = Span(c, 3, 5, cpu, torch.float32, quant="none").load()  # the same values, dequantized
    layers = [m for m in packed.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(isinstance(m, PackedLinear) for m in layers)
    assert packed.weight_bytes() < 0.25 * floats.weight_bytes()
    hidden = torch.randn(1, 6, 576, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6)[None]
    a, b = packed.run(hidden, positions, None, 3, 5), floats.run(hidden, positions, None, 3, 5)
    assert ((a - b).norm(dim=-1) / b.norm(dim=-1)).max() < 0.02  # bfloat16 inputs to the kernels
