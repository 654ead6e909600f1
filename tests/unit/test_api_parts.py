"""swarm-api's parts that need no daemon: its config (read by swarm-api and checked by swarmd),
stop strings, nucleus sampling, bearer keys."""

import os
import time

import pytest
import torch
import yaml

from libswarm.api.config import load_api_config
from libswarm.api.engine import Completion, Sampling, StopText
from libswarm.errors import ConfigError
from swarmd.config import load_config


def write(tmp_path, data: dict) -> str:
    path = tmp_path / "swarmd.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_api_config_reads_model_socket_and_its_section(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    path = write(tmp_path, {"model": "models/m", "network": {"socket": "/tmp/x.sock"},
                            "api": {"listen": "0.0.0.0:9000", "keys_file": "keys", "max_tokens": 64}})
    c = load_api_config(path)
    assert c.model == str(tmp_path / "models" / "m") and c.model_name == "m" and c.socket == "/tmp/x.sock"
    assert c.api.listen == ("0.0.0.0", 9000) and c.api.keys_file == str(tmp_path / "keys")
    assert c.api.max_tokens == 64 and c.api.max_concurrent == 32 and c.api.draft_model is None  # the rest: defaults
    assert load_config(path).api == c.api  # swarmd reads the same section the same way
    c = load_api_config(write(tmp_path, {"model": str(tmp_path / "models" / "m")}))
    assert c.api.listen == ("127.0.0.1", 8000) and c.api.keys_file is None and c.socket == "/run/swarmd/swarmd.sock"


@pytest.mark.parametrize("api, key", [
    ({"listen": "8000"}, "api.listen"),
    ({"listen": "localhost:70000"}, "api.listen"),
    ({"keys_file": 5}, "api.keys_file"),
    ({"max_tokens": 0}, "api.max_tokens"),
    ({"max_concurrent": "many"}, "api.max_concurrent"),
    ({"port": 8000}, "api.port"),
    ("on", "api"),
    ({"listen": "0.0.0.0:8000"}, "api.keys_file"),  # beyond loopback, only with keys
    ({"listen": "192.168.1.10:8000", "keys_file": None}, "api.keys_file"),
    ({"draft_model": 3}, "api.draft_model"),
    ({"draft_model": "no-such-draft"}, "api.draft_model"),  # a name no models directory holds
])
def test_a_bad_api_section_is_one_error_naming_file_and_key_in_both_programs(tmp_path, api, key):
    (tmp_path / "m").mkdir()
    path = write(tmp_path, {"model": str(tmp_path / "m"), "api": api})
    for loader in (load_api_config, load_config):
        with pytest.raises(ConfigError) as e:
            loader(path)
        assert str(e.value).startswith(f"{path}: {key}") and "\n" not in str(e.value)


def test_api_config_without_a_model_or_with_a_missing_one_says_so(tmp_path):
    with pytest.raises(ConfigError, match="model: not set"):
        load_api_config(write(tmp_path, {"network": {}}))
    with pytest.raises(ConfigError, match="no such directory"):
        load_api_config(write(tmp_path, {"model": str(tmp_path / "absent")}))
    with pytest.raises(ConfigError, match="config file not found"):
        load_api_config(str(tmp_path / "nope.yaml"))


def test_stop_strings_cut_the_text_and_hold_back_what_may_start_one():
    s = StopText(("\n\n", "END"))
    assert s.cut("one\n\ntwo") == "one" and s.cut("a END b\n\n") == "a " and s.cut("no stop") is None
    assert s.safe_end("hello E") == len("hello ")  # "E" may begin "END"
    assert s.safe_end("hello EN") == len("hello ")
    assert s.safe_end("hello\n") == len("hello")
    assert s.safe_end("hello") == 5
    assert StopText(()).safe_end("abc") == 3


def test_top_p_samples_only_from_the_smallest_set_that_reaches_it():
    job = Completion(None, None, "", torch.zeros(1, 1, dtype=torch.long),
                     Sampling(max_tokens=1, temperature=1.0, top_p=0.5), lambda e: None, 1.0, set())
    logits = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05]))
    gen = torch.Generator().manual_seed(0)
    assert {job._choose(logits, torch.zeros(4), gen) for _ in range(200)} == {1}
    job.sampling = Sampling(max_tokens=1, temperature=1.0, top_p=0.8)
    assert {job._choose(logits, torch.zeros(4), gen) for _ in range(400)} == {1, 2}
    job.sampling = Sampling(max_tokens=1, temperature=0)
    assert job._choose(logits, torch.zeros(4), gen) == 1
    # OpenAI's frequency penalty: a token already said three times loses 3 x penalty
    job.sampling = Sampling(max_tokens=1, temperature=0, frequency_penalty=2.0)
    assert job._choose(logits, torch.tensor([0.0, 3.0, 0.0, 0.0]), gen) == 2


def test_keys_file_is_read_again_when_it_changes(tmp_path):
    from starlette.requests import Request

    from libswarm.api.app import ApiError, Keys

    path = tmp_path / "keys"
    path.write_text("# comment\nsk-a\n\n")
    keys = Keys(str(path))

    def ask(header: str | None) -> None:
        scope = {"type": "http", "headers": [(b"authorization", header.encode())] if header else []}
        keys.check(Request(scope))

    ask("Bearer sk-a")
    for bad in (None, "Bearer sk-b", "Basic sk-a", "Bearer "):
        with pytest.raises(ApiError) as e:
            ask(bad)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"
    time.sleep(0.01)
    path.write_text("sk-b  # the new key\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    ask("Bearer sk-b")
    with pytest.raises(ApiError):
        ask("Bearer sk-a")
    with pytest.raises(OSError):
        Keys(str(tmp_path / "absent"))  # at start: swarm-api says it cannot read the file


def test_swarm_api_cli_refuses_a_bad_config_in_one_line_with_status_2(tmp_path):
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "swarm-api")
    (tmp_path / "empty").mkdir()
    for data, expected in (({"model": str(tmp_path / "absent")}, "no such directory"),
                           ({"model": str(tmp_path / "empty"), "api": {"listen": "x"}}, "api.listen"),
                           ({"model": str(tmp_path / "empty")}, "cannot load the model's tokenizer")):
        r = subprocess.run([exe, "--config", write(tmp_path, data)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("swarm-api: ") and expected in r.stderr and r.stderr.count("\n") == 1
