import os

import pytest
import yaml

from libswarm.errors import ConfigError
from swarmd.config import DEFAULTS, load_config
from swarmd.identity import NodeIdentity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(tmp_path, data) -> str:
    p = tmp_path / "swarmd.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg = load_config(write(tmp_path, {"model": "/models/x", "discovery": {"seeds": []}}))
    assert cfg.serve.blocks == "auto" and cfg.serve.device == "auto" and cfg.serve.cache.max_bytes is None
    assert cfg.network.listen == "tcp://0.0.0.0:31330" and cfg.network.socket == "/run/swarmd/swarmd.sock"
    assert cfg.discovery.seeds == ()


def test_repo_default_config_documents_every_key():
    """etc/swarmd.yaml and DEFAULTS must describe the same keys with the same defaults."""
    with open(os.path.join(ROOT, "etc", "swarmd.yaml")) as f:
        documented = yaml.safe_load(f)
    assert documented == DEFAULTS


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"model": "/m", "serve": {"blokcs": "0:2"}}, r"serve\.blokcs: unknown key"),
        ({"model": "/m", "serve": {"blocks": "4:2"}}, r"serve\.blocks: must be"),
        ({"model": "/m", "serve": {"blocks": "a:b"}}, r"serve\.blocks: must be"),
        ({"model": "/m", "serve": {"dtype": "float8"}}, r"serve\.dtype: must be one of"),
        ({"model": "/m", "serve": {"device": "tpu"}}, r"serve\.device"),
        ({"model": "/m", "serve": {"cache": {"max_bytes": "lots"}}}, r"serve\.cache\.max_bytes: must be a size"),
        ({"model": "/m", "serve": {"max_batch": 0}}, r"serve\.max_batch: must be a positive integer"),
        ({"model": "/m", "network": {"listen": "udp://x"}}, r"network\.listen: must be an address"),
        ({"model": "/m", "discovery": {"seeds": ["tcp://h:99999"]}}, r"discovery\.seeds\[0\]"),
        ({"model": "/m", "discovery": {"mdns": "yes"}}, r"discovery\.mdns: must be true or false"),
        ({"model": "/m", "swarm": {"verify": "always"}}, r"swarm\.verify: must be one of"),
        ({"model": "/m", "swarm": {"verify_probability": 0}}, r"swarm\.verify_probability: must be a number in"),
        ({"model": "/m", "swarm": {"verify_probability": 1.5}}, r"swarm\.verify_probability: must be a number in"),
        ({"model": "/m", "swarm": {"verify_probability": "often"}}, r"swarm\.verify_probability: must be a number"),
        ({"model": "/m", "network": {"relay": "yes"}}, r"network\.relay: must be true or false"),
        ({"model": "/m", "network": {"relay_max_bytes_per_s": "fast"}}, r"relay_max_bytes_per_s: must be a size"),
        ({"model": "/m", "network": {"relay_max_bytes_per_s": -1}}, r"network\.relay_max_bytes_per_s"),
        ({"model": "/m", "network": {"relay_max_servers": 0}}, r"relay_max_servers: must be a positive"),
        ({"model": "/m", "serve": {"batch_window_ms": "soon"}}, r"serve\.batch_window_ms: must be auto or"),
        ({"model": "/m", "serve": {"batch_window_ms": -1}}, r"serve\.batch_window_ms: must be auto or"),
        ({"model": "/m", "serve": {"batch_window_ms": 5000}}, r"serve\.batch_window_ms: must be auto or"),
        ({"model": "/m", "serve": {"quant": "int3"}}, r"serve\.quant: must be one of"),
        ({"model": "/m", "serve": {"quant": "int4", "device": "cuda"}}, r"serve\.quant: int4 runs on CPUs"),
        ({"model": "/m", "serve": {"cache": {"kv_dtype": "fp8"}}}, r"serve\.cache\.kv_dtype: must be one of"),
        ({"model": "/m", "serve": {"limits": {"queued_per_key": 0}}}, r"queued_per_key: must be a positive integer"),
        ({"model": "/m", "serve": {"limits": {"queued_per_key": "many"}}}, r"queued_per_key: must be a positive"),
        ({"model": "/m", "serve": {"limits": {"queued_bytes_per_key": "lots"}}}, r"queued_bytes_per_key: must be a"),
        ({"model": "/m", "serve": {"limits": {"queued_bytes_per_key": -5}}}, r"queued_bytes_per_key"),
        ({"model": "/m", "swarm": {"quantized": "never"}}, r"swarm\.quantized: must be one of"),
        ({"model": "/m", "serve": {"cuda_graphs": "yes"}}, r"serve\.cuda_graphs: must be true or false"),
        ({"serve": {"blocks": "0:2"}}, r"model: not set"),
        ({"model": "/m", "log_level": "loud"}, r"log_level"),
        ("model: [unclosed", r"not valid YAML"),
        ("- a list", r"must be a mapping"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, data, needle):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(path)
    assert str(e.value).startswith(path)
    assert "\n" not in str(e.value)


def test_quantized_weights_without_bitsandbytes_are_refused_in_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    path = write(tmp_path, {"model": "/m", "serve": {"quant": "nf4"}})
    with pytest.raises(ConfigError, match=r"serve\.quant: nf4 weights need bitsandbytes") as e:
        load_config(path)
    assert "\n" not in str(e.value)
    path = write(tmp_path, {"model": "/m", "serve": {"quant": "int8", "device": "cuda"}})
    with pytest.raises(ConfigError, match=r"serve\.quant: int8 weights on a GPU need bitsandbytes"):
        load_config(path)
    for quant in ("int8", "int4"):  # on a CPU: torch's own kernels
        path = write(tmp_path, {"model": "/m", "serve": {"quant": quant, "device": "cpu"}})
        assert load_config(path).serve.quant == quant


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_sizes_and_spans_parse(tmp_path):
    cfg = load_config(write(tmp_path, {"model": "m", "serve": {"blocks": "2:5", "cache": {"max_bytes": "1.5GiB"}},
                                       "discovery": {"seeds": []}}))
    assert cfg.serve.blocks == (2, 5)
    assert cfg.serve.cache.max_bytes == int(1.5 * 2**30)
    assert cfg.model == str(tmp_path / "m")  # relative to the config file


def test_seeds_from_yaml_file_with_keys(tmp_path):
    seeds = tmp_path / "seeds.yaml"
    key = NodeIdentity(b"\x07" * 32).public_key
    seeds.write_text(yaml.safe_dump(["tcp://10.0.0.1:31330", {"address": "tcp://h.example:4000", "key": key}]))
    cfg = load_config(write(tmp_path, {"model": "/m", "discovery": {"seeds": str(seeds)}}))
    assert [s.address for s in cfg.discovery.seeds] == ["tcp://10.0.0.1:31330", "tcp://h.example:4000"]
    assert cfg.discovery.seeds[1].key == key
    seeds.write_text(yaml.safe_dump([{"address": "tcp://h.example:4000", "key": "K"}]))
    with pytest.raises(ConfigError, match=r"discovery\.seeds\[0\]\.key: must be a 40-character node public key"):
        load_config(write(tmp_path, {"model": "/m", "discovery": {"seeds": str(seeds)}}))
