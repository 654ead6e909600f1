"""GGUF files converted tensor by tensor (libswarm/convert.py): every tensor equal to what
transformers' own GGUF reader gives, in every dtype, sharded one file per block, and read back
by safetensors itself."""

import json
import os
import subprocess
import sys

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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_tensor_equals_transformers_reader_in_the_dtype_asked(tmp_path, real_gguf, hf_state, dtype):
    state, config = hf_state
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


def test_each_block_is_a_shard_of_its_own_so_a_span_maps_only_its_files(tmp_path, real_gguf):
    convert_gguf(real_gguf, str(tmp_path), "float32")
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
    grows is the tokenizer's and the file's metadata, parsed (measured: 342 MB)."""
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
