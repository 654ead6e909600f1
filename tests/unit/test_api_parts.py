"""swarm-api's parts that need no daemon: its config (read by swarm-api and checked by swarmd),
stop strings, nucleus sampling, bearer keys, and each module of the app: errors, access, the
shared service, request parameters, prompts and replies."""

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
    ({"draft_quant": "int2"}, "api.draft_quant"),
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
    # logit_bias: added to those logits before choosing; -100 bars a token, +100 forces one
    job.sampling = Sampling(max_tokens=1, temperature=0, logit_bias=((1, -100.0),))
    assert job._choose(logits, torch.zeros(4), gen) == 2
    job.sampling = Sampling(max_tokens=1, temperature=1.0, logit_bias=((3, 100.0),))
    assert {job._choose(logits, torch.zeros(4), gen) for _ in range(100)} == {3}


def test_a_tokens_logprob_is_the_log_softmax_of_the_models_logits_with_the_likeliest():
    from libswarm.api.engine import prompt_logprobs, token_logprob

    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    want = torch.log_softmax(logits, -1)
    x = token_logprob(logits, 2, 2)
    assert x.token == 2 and x.logprob == pytest.approx(float(want[2]))
    assert [t for t, _ in x.top] == [1, 2] and x.top[0][1] == pytest.approx(float(want[1]))
    assert token_logprob(logits, 0, 0).top == ()
    rows = torch.stack([logits, logits.flip(0), logits])
    got = prompt_logprobs(rows, [3, 0, 1], 1)  # the first token has none; token i is scored by row i - 1
    assert got[0].logprob is None and got[1].logprob == pytest.approx(float(want[0]))
    assert got[2].logprob == pytest.approx(float(torch.log_softmax(logits.flip(0), -1)[1]))


class _Client:
    """What Slots asks of a request: whether its client has gone."""

    def __init__(self):
        self.gone = False

    async def is_disconnected(self) -> bool:
        return self.gone


def test_slots_run_max_concurrent_queue_the_next_in_order_and_refuse_beyond_the_queue():
    import asyncio

    from libswarm.api.errors import ApiError
    from libswarm.api.slots import Slots

    async def scenario():
        slots = Slots(2, 2)
        a, b, c, d = _Client(), _Client(), _Client(), _Client()
        assert await slots.take(2, a)
        order: list[str] = []

        async def wait(name, k, client):
            ok = await slots.take(k, client)
            order.append(f"{name}:{ok}")

        tb = asyncio.create_task(wait("b", 1, b))
        tc = asyncio.create_task(wait("c", 2, c))
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as e:  # two wait already
            await slots.take(1, d)
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
        slots.give(1)  # b fits; c (2) waits behind it
        await asyncio.sleep(0.05)
        assert order == ["b:True"] and slots.free == 0
        c.gone = True  # c's client leaves while waiting: its place goes
        await asyncio.wait_for(tc, 2)
        assert order == ["b:True", "c:False"] and slots.waiting == []
        slots.give(1)
        slots.give(1)
        assert slots.free == 2 and await slots.take(2, d)
        await tb

    asyncio.run(scenario())


def test_keys_file_is_read_again_when_it_changes(tmp_path):
    from starlette.requests import Request

    from libswarm.api.access import Keys
    from libswarm.api.errors import ApiError

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


TOOLS_TEMPLATE = "{% if tools %}<tools>{{ tools | tojson }}</tools> answer in <tool_call>{}</tool_call>{% endif %}"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tool_calls_are_parsed_out_of_the_text_and_a_broken_one_stays_text():
    import json

    from libswarm.api.tools import parse_calls, visible_end

    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}')  # the last one unclosed at the end
    content, calls = parse_calls(text)
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    assert parse_calls("<tool_call>{not json}</tool_call> hi") == ("<tool_call>{not json}</tool_call> hi", [])
    assert parse_calls('<tool_call>["no", "name"]</tool_call>')[1] == []
    assert parse_calls("just text") == ("just text", [])
    # the call's object alone, bare or fenced (small models drop the tags), naming an offered tool
    fenced = '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'
    assert parse_calls(fenced, ["get_weather"])[0] is None
    assert json.loads(parse_calls(fenced, ["get_weather"])[1][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert parse_calls(fenced, ["other_tool"]) == (fenced, [])  # not a tool offered: text
    assert parse_calls("Use " + fenced, ["get_weather"])[1] == []  # not the whole answer: text
    # streamed: text goes out up to the first call, less what may begin one
    assert visible_end("Hello <tool") == len("Hello ")
    assert visible_end("Hello <tool_call>{") == len("Hello ")
    assert visible_end("Hello <tox") == len("Hello <tox")
    assert visible_end(" ``") == 0 and visible_end('```json\n{"na') == 0 and visible_end('{"name"') == 0


def test_tools_and_tool_choice_are_checked_and_a_template_without_tools_is_refused():
    from libswarm.api.tools import ToolError, Tools, template_messages

    t = Tools({"tools": [WEATHER]}, TOOLS_TEMPLATE)
    assert t.active and t.prefill == "" and t.functions[0]["function"]["name"] == "get_weather"
    assert Tools({"tools": [WEATHER], "tool_choice": "required"}, TOOLS_TEMPLATE).prefill == "<tool_call>\n"
    named = Tools({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                  TOOLS_TEMPLATE)
    assert named.prefill == '<tool_call>\n{"name": "get_weather", "arguments": '
    assert not Tools({"tools": [WEATHER], "tool_choice": "none"}, TOOLS_TEMPLATE).active
    assert not Tools({}, None).active
    for data, template, param in [
        ({"tools": [WEATHER]}, "{{ messages }}", "tools"),  # the template has no tools
        ({"tools": [WEATHER]}, "{% if tools %}{{ tools }}{% endif %}", "tools"),  # nor <tool_call> tags
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, TOOLS_TEMPLATE, "tools[0]"),
        ({"tools": "get_weather"}, TOOLS_TEMPLATE, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, TOOLS_TEMPLATE,
         "tool_choice"),
        ({"tool_choice": "required"}, TOOLS_TEMPLATE, "tool_choice"),
    ]:
        with pytest.raises(ToolError) as e:
            Tools(data, template)
        assert e.value.param == param, data
    shaped = template_messages([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}])
    assert shaped[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # as templates take them
    with pytest.raises(ToolError):
        template_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}])


def test_a_json_schema_constrains_each_token_and_refusals_are_one_line(real_model):
    from transformers import AutoTokenizer

    from libswarm.grammar import Constraint, GrammarError, check, json_grammar

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"],
              "additionalProperties": False}
    c = Constraint(tokenizer, json_grammar(schema), 49152)
    ids = tokenizer('{"age": 42}', add_special_tokens=False)["input_ids"]
    logits = torch.zeros(49152)
    for t in ids:
        masked = c.mask(logits)
        assert masked[t] == 0 and torch.isinf(masked).sum() > 40000  # this token may come; most may not
        c.advance(t)
    assert c.done
    c = Constraint(tokenizer, json_grammar(schema), 49152)
    assert torch.isinf(c.mask(logits)[tokenizer("Hello", add_special_tokens=False)["input_ids"][0]])
    with pytest.raises(GrammarError):
        c.advance(tokenizer("Hello", add_special_tokens=False)["input_ids"][0])
    for bad in ({"type": "strng"}, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}):
        with pytest.raises(GrammarError) as e:
            check(tokenizer, json_grammar(bad), 49152)
        assert "\n" not in str(e.value)


def test_a_required_or_named_tool_call_is_held_to_the_functions_and_their_schemas(real_model):
    from transformers import AutoTokenizer

    from libswarm.grammar import Constraint, tool_call_grammar

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

    def takes(grammar: str, text: str) -> bool:
        c = Constraint(tokenizer, grammar, 49152)
        for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if not c.allowed(49152)[t]:
                return False
            c.advance(t)
        return c.done

    named = tool_call_grammar([weather], named=True)  # after '{"name": "get_weather", "arguments": '
    assert takes(named, '{"city": "Paris"}}')
    assert not takes(named, '{"town": "Paris"}}')  # not its schema
    either = tool_call_grammar([weather, clock], named=False)  # after '<tool_call>\n'
    assert takes(either, '{"name": "get_time", "arguments": {}}')
    assert takes(either, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert not takes(either, '{"name": "get_date", "arguments": {}}')  # no such tool


def test_swarm_errors_become_openai_statuses_and_a_too_long_request_is_the_requests_fault():
    from libswarm.api.errors import swarm_error
    from libswarm.errors import CacheFullError, LimitError, NoRouteError, SwarmError

    e = swarm_error(LimitError("session of 3000 positions over serve.max_length 2048\n(the server's limit)"))
    assert (e.status, e.param, e.code) == (400, "max_tokens", "context_length_exceeded") and "\n" not in e.message
    for error, status, code in [(LimitError("too many sessions"), 429, "limit"), (NoRouteError("no span"), 503,
                                "no_route"), (CacheFullError("full"), 503, "cache_full"),
                                (SwarmError("odd"), 502, "swarm_error"), (ValueError("boom"), 500, None)]:
        e = swarm_error(error)
        assert (e.status, e.code) == (status, code), error
    assert e.message == "internal error: boom" and e.response().status_code == 500


def test_without_keys_only_an_address_or_localhost_may_name_the_server_in_host():
    from starlette.requests import Request

    from libswarm.api.access import check_host
    from libswarm.api.errors import ApiError

    def ask(host: str, keys_file: str | None = None) -> None:
        check_host(Request({"type": "http", "headers": [(b"host", host.encode())]}), keys_file)

    for named in ("127.0.0.1:8000", "[::1]:8000", "localhost:8000", "10.0.0.5"):
        ask(named)
    with pytest.raises(ApiError) as e:  # a name rebound to this address by a page's DNS
        ask("rebound.example.com:8000")
    assert e.value.status == 421 and e.value.code == "misdirected_request"
    ask("rebound.example.com:8000", keys_file="/etc/swarmd/api-keys")  # with keys, the key decides


# Slots (libswarm/api/slots.py) and Keys (access.py) are pinned above, by
# test_slots_run_max_concurrent_queue_the_next_in_order_and_refuse_beyond_the_queue and
# test_keys_file_is_read_again_when_it_changes

VOCAB = 300


def service_of(tmp_path, max_concurrent: int = 4, positions: int | None = 64):
    """swarm-api's Service over a trained test tokenizer and, at the edge, a stand-in for the
    distributed model: what the API reads of it (no swarmd runs)."""
    from types import SimpleNamespace

    from make_test_model import make_tokenizer

    from libswarm.api.config import ApiConfig, ApiSettings
    from libswarm.api.service import Service

    settings = ApiSettings(listen=("127.0.0.1", 0), keys_file=None, max_tokens=16, max_concurrent=max_concurrent,
                           route_timeout_s=1.0)
    config = ApiConfig(path=str(tmp_path / "swarmd.yaml"), model=str(tmp_path), model_name="m",
                       socket=str(tmp_path / "swarmd.sock"), api=settings)
    model = SimpleNamespace(model_id="m-0123abcd", generation_config=SimpleNamespace(eos_token_id=[7, 9]),
                            config=SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=positions))
    return Service(config, model, make_tokenizer(VOCAB))


def test_service_ends_at_every_eos_of_model_and_tokenizer_and_assumes_2048_positions_unsaid(tmp_path):
    service = service_of(tmp_path, positions=None)
    model = service.model()
    assert service.eos(model) == {7, 9, service.tokenizer.eos_token_id}
    assert service.context(model) == 2048
    assert service.vocab_size() == VOCAB and service.model_id == "m-0123abcd" and service.draft() is None


def test_params_refuse_naming_the_parameter_and_best_of_asks_for_logprobs(tmp_path):
    from libswarm.api.errors import ApiError
    from libswarm.api.params import Params

    service = service_of(tmp_path, max_concurrent=4)
    p = Params({"model": "m", "n": 2, "best_of": 3}, service, "completion")
    # best_of ranks its choices by their log-probabilities: reported whether asked for or not
    assert p.best_of == 3 and p.sampling(5, 64, 16, "prompt").logprobs == 0
    assert Params({"model": "m-0123abcd"}, service, "chat").best_of == 1  # the model's id names it too
    for data, kind, status, param in [
        ({"model": "other"}, "chat", 404, "model"),
        ({"model": "m", "n": 2, "best_of": 1}, "completion", 400, "best_of"),
        ({"model": "m", "n": 5}, "chat", 400, "n"),  # over api.max_concurrent
        ({"model": "m", "top_logprobs": 3}, "chat", 400, "top_logprobs"),  # without logprobs: true
        ({"model": "m", "logit_bias": {str(VOCAB): 1}}, "chat", 400, "logit_bias"),
        ({"model": "m", "temperature": True}, "chat", 400, "temperature"),
        ({"model": "m", "stop": ["a", "b", "c", "d", "e"]}, "completion", 400, "stop"),
    ]:
        with pytest.raises(ApiError) as e:
            Params(data, service, kind)
        assert (e.value.status, e.value.param) == (status, param), data
    # past the context, the refusal names the length parameter the request used
    with pytest.raises(ApiError) as e:
        Params({"model": "m", "max_completion_tokens": 60}, service, "chat").sampling(10, 64, 16, "messages")
    assert e.value.param == "max_completion_tokens" and e.value.code == "context_length_exceeded"


def test_prompts_go_through_the_chat_template_and_token_ids_stay_within_the_vocabulary():
    from make_test_model import make_tokenizer

    from libswarm.api.errors import ApiError
    from libswarm.api.prompts import chat_prompt, prompt_text, text_prompt

    tokenizer = make_tokenizer(VOCAB)
    with pytest.raises(ApiError) as e:
        chat_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert e.value.param == "messages" and "/v1/completions" in e.value.message  # no chat template
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    ids = chat_prompt(tokenizer, [{"role": "developer", "content": [{"type": "text", "text": "be "},
                                                                    {"type": "text", "text": "brief"}]},
                                  {"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids[0].tolist()) == "[system]be brief[user]hi"  # developer: the system role
    with pytest.raises(ApiError) as e:
        chat_prompt(tokenizer, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert e.value.param == "messages[0].content"
    assert text_prompt(tokenizer, [[5, 6]]).tolist() == [[5, 6]]  # one prompt, as a list of one
    with pytest.raises(ApiError) as e:
        text_prompt(tokenizer, [5, len(tokenizer)])
    assert e.value.param == "prompt"
    ids = text_prompt(tokenizer, "the cat")
    assert prompt_text(tokenizer, {"prompt": ids[0].tolist(), "echo": True}, "completion", ids) == "the cat"
    assert prompt_text(tokenizer, {"prompt": "the cat"}, "completion", ids) == ""  # no echo


def test_best_of_shows_the_choices_of_best_mean_logprob_and_usage_counts_every_choice(tmp_path):
    from libswarm.api.engine import Result, TokenLogprob
    from libswarm.api.params import Params
    from libswarm.api.reply import Reply

    service = service_of(tmp_path)
    reply = Reply(Params({"model": "m", "n": 1, "best_of": 3}, service, "completion"), service.tokenizer, [5, 6, 7])

    def result(text: str, logprobs: list[float]) -> Result:
        return Result(text=text, tokens=list(range(len(logprobs))), finish_reason="length",
                      logprobs=[TokenLogprob(10 + i, lp) for i, lp in enumerate(logprobs)],
                      starts=list(range(len(logprobs))))

    whole = reply.whole([result("ab", [-1.0, -3.0]), result("cd", [-0.5, -1.0]), result("e", [-0.2])])
    assert [(c["index"], c["text"], c["logprobs"]) for c in whole["choices"]] == [(0, "e", None)]
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert whole["id"].startswith("cmpl-") and whole["object"] == "text_completion"
    assert Reply.sse({"a": 1}) == 'data: {"a":1}\n\n'
