"""swarm-api with the official `openai` client, against real daemons serving SmolLM2-135M-Instruct
(two servers of 15 blocks) and against Hugging Face's own model on the same weights."""

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from helpers import Daemon, running_swarm
from localswarm import running_api, until
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = "smollm2-135m-instruct"
KEY = "sk-test-7f3a9c"
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def api(real_model, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"# swarm-api keys\n{KEY}\nsk-other-key\n")
    # servers take 2048 positions of the model's 8192: a longer request is the request's fault
    with running_swarm(real_model, ["0:15", "15:30"], gateway=False,
                       extra={"serve": {"max_length": 2048}}) as (servers, first):
        with running_api(first, {"keys_file": str(keys), "route_timeout_s": 5}) as url:
            tokenizer = AutoTokenizer.from_pretrained(real_model)
            ref = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            yield url, client, tokenizer, ref, servers


def chat_ids(tokenizer, content: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def hf_greedy(ref, tokenizer, ids: torch.Tensor, n: int) -> tuple[str, int]:
    """HF's greedy answer (text without special tokens) and how many tokens it generated."""
    out = ref.generate(ids, do_sample=False, max_new_tokens=n)[0, ids.shape[1]:]
    return tokenizer.decode(out, skip_special_tokens=True), out.shape[0]


def raw(url: str, path: str, body: bytes | None, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def server_sessions(servers) -> int:
    return sum(s.ctl("status")["sessions"]["server"] for s in servers)


def test_chat_completion_equals_hf_greedy_streamed_and_not_with_usage(api):
    url, client, tokenizer, ref, _ = api
    ids = chat_ids(tokenizer, QUESTION)
    expected, generated = hf_greedy(ref, tokenizer, ids, 40)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                       temperature=0, max_tokens=40)
    assert r.choices[0].message.content == expected
    assert "Paris" in expected
    assert r.choices[0].finish_reason == ("stop" if generated < 40 else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (ids.shape[1], generated, ids.shape[1] + generated)

    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                 temperature=0, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # token by token, not at once
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == generated and chunks[-1].usage.prompt_tokens == ids.shape[1]


def test_completion_equals_hf_greedy_and_stop_cuts_the_text(api):
    url, client, tokenizer, ref, _ = api
    prompt = "The three primary colors are"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    expected, generated = hf_greedy(ref, tokenizer, ids, 24)
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24)
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == ids.shape[1] and r.usage.completion_tokens == generated
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stream=True) if c.choices)
    assert streamed == expected
    # a stop string: the text ends before it, streamed or not
    words = expected.split()
    stop = words[len(words) // 2]
    cut = expected[:expected.index(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stop=[stop, "\n\n\n"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_seed_makes_sampling_reproducible(api):
    url, client, *_ = api

    def sample(seed: int) -> str:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                           temperature=1.0, top_p=0.95, seed=seed, max_tokens=24)
        return r.choices[0].message.content

    first = sample(11)
    assert sample(11) == first
    assert len({first, sample(12), sample(13)}) > 1  # a seed does pick the draws


def test_errors_come_back_in_openai_shape_with_their_status(api):
    url, client, tokenizer, *_ = api
    status, body = raw(url, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8190)
    assert e.value.code == "context_length_exceeded" and "8192" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # within the model's context, beyond the servers'
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3000)
    assert e.value.code == "context_length_exceeded" and "2048" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=17)
    assert e.value.body["param"] == "n"
    for bad, param in [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                       ({"logit_bias": {"abc": 5}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                       ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"), ({"logit_bias": {"\u0663": 1}}, "logit_bias"),
                       ({"logit_bias": {str(len(tokenizer) + 10**6): 1}}, "logit_bias")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **bad)
        assert e.value.body["param"] == param, bad
    with pytest.raises(openai.BadRequestError) as e:  # SmolLM2's chat template has no tools
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    assert e.value.body["param"] == "tools" and "template has no tools" in e.value.message
    for bad, param in [({"n": 3, "best_of": 2}, "best_of"), ({"best_of": 2, "stream": True}, "best_of"),
                       ({"logprobs": 21}, "logprobs"), ({"echo": "yes"}, "echo")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="hi", **bad)
        assert e.value.body["param"] == param, bad
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    # bearer keys
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert e.value.code == "invalid_api_key"
    status, body = raw(url, "/v1/models", None, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="sk-other-key").models.list()] == [MODEL]
    status, body = raw(url, "/v1/nothing-here", None)
    assert status == 404 and "error" in body


def test_a_huge_prompt_is_tokenized_off_the_event_loop(api):
    """A 3.6 MiB prompt takes seconds to tokenize (then fails: longer than any context);
    meanwhile other requests are answered at once, not after it."""
    url, *_ = api
    body = json.dumps({"model": MODEL, "prompt": "word " * 760_000, "max_tokens": 1}).encode()
    done = {}

    def big():
        done["status"] = raw(url, "/v1/completions", body)[0]
        done["at"] = time.monotonic()

    t = threading.Thread(target=big)
    t.start()
    time.sleep(0.4)  # uploaded, and tokenizing
    t0 = time.monotonic()
    status, _ = raw(url, "/v1/models", None)
    answered = time.monotonic()
    t.join(120)
    assert status == 200 and done["status"] == 400
    assert answered < done["at"], "the models request waited for the prompt's tokenizing"
    assert answered - t0 < 1.0


def test_two_clients_at_once_both_get_their_own_answer(api):
    url, client, tokenizer, ref, _ = api
    questions = ["Name three colors of the rainbow.", "Write a haiku about the sea."]
    expected = [hf_greedy(ref, tokenizer, chat_ids(tokenizer, q), 32)[0] for q in questions]
    answers: dict[int, str] = {}
    spans: dict[int, tuple[float, float]] = {}

    def ask(i: int) -> None:
        t0 = time.monotonic()
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": questions[i]}],
                                                temperature=0, max_tokens=32, stream=True)
        answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        spans[i] = (t0, time.monotonic())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == {0: expected[0], 1: expected[1]}
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # they did run at the same time


def test_a_client_that_leaves_mid_stream_frees_its_session(api):
    url, client, tokenizer, ref, servers = api
    until(lambda: server_sessions(servers) == 0, 20, "no sessions left from earlier tests")
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 400, "temperature": 0.7,
                       "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    r = urllib.request.urlopen(req, timeout=60)
    lines = [r.readline() for _ in range(10)]  # a few tokens in: the session is open on both servers
    assert any(b"content" in line for line in lines)
    assert server_sessions(servers) == 2
    r.close()
    t0 = time.monotonic()
    # freed at once: within a step or two, not at the end of 400 tokens or the servers' idle timeout
    took = until(lambda: server_sessions(servers) == 0, 5, "the servers to drop the left client's session")
    assert took < 3.0, took
    assert time.monotonic() - t0 < 5


def test_no_route_and_no_swarmd_are_503_with_the_reason(real_model, tmp_path):
    """A daemon that knows no server of the model: swarm-api answers 503 and says why; with the
    daemon stopped, 503 again, and swarm-api keeps serving what it can."""
    lonely = Daemon(str(tmp_path), "alone", real_model, "none")
    lonely.start([])
    try:
        lonely.wait_ready()
        with running_api(lonely, {"route_timeout_s": 2}) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            t0 = time.monotonic()
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert e.value.status_code == 503 and e.value.code == "no_route"
            assert "block" in e.value.message  # the gateway's reason: which blocks nobody serves
            assert time.monotonic() - t0 < 30
            assert lonely.stop() == 0
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert e.value.status_code == 503 and e.value.code == "swarmd_unavailable"
            assert "swarmd is not running" in e.value.message
            assert [m.id for m in client.models.list()] == [MODEL]

            # without keys it answers only to its address: not to a name a page rebound to it
            port = url.rsplit(":", 1)[1]
            for host, code in ((f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200),
                               (f"attacker.example:{port}", 421)):
                req = urllib.request.Request(url + "/v1/models", headers={"Host": host})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        got = r.status
                except urllib.error.HTTPError as e:
                    got = e.code
                    assert json.loads(e.read())["error"]["code"] == "misdirected_request"
                assert got == code, host
            # and reads no body a page could send cross-site without asking (text/plain, a form)
            req = urllib.request.Request(url + "/v1/chat/completions", method="POST", headers={
                "Content-Type": "text/plain"}, data=json.dumps({"model": MODEL, "messages": []}).encode())
            with pytest.raises(urllib.error.HTTPError) as he:
                urllib.request.urlopen(req, timeout=30)
            assert he.value.code == 415 and "application/json" in json.loads(he.value.read())["error"]["message"]
            # JSON nested beyond the parser's depth: OpenAI's error shape, not a plain-text 500
            status, body = raw(url, "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, key=None)
            assert status == 400 and "nests too deeply" in body["error"]["message"]
    finally:
        lonely.stop()


def hf_logprobs(ref, ids: torch.Tensor) -> torch.Tensor:
    """HF's log-softmax at every position of `ids` ([1, T]): row i scores token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(ref(ids).logits[0].float(), dim=-1)


def test_logprobs_and_top_logprobs_equal_hf_streamed_and_not(api):
    url, client, tokenizer, ref, _ = api
    ids = chat_ids(tokenizer, QUESTION)
    want = ref.generate(ids, do_sample=False, max_new_tokens=12)
    lp = hf_logprobs(ref, want)
    ask = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12,
               logprobs=True, top_logprobs=5)
    content = client.chat.completions.create(**ask).choices[0].logprobs.content
    streamed = [x for c in client.chat.completions.create(**ask, stream=True)
                if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    generated = want[0, ids.shape[1]:].tolist()
    shown = generated[:-1] if generated[-1] in (tokenizer.eos_token_id, ref.generation_config.eos_token_id) \
        else generated  # every token but the end-of-text one
    assert len(shown) >= 5
    for got in (content, streamed):
        assert [x.token for x in got] == [tokenizer.decode([t]) for t in shown]
        for j, x in enumerate(got):
            row = lp[ids.shape[1] - 1 + j]
            assert abs(x.logprob - float(row[generated[j]])) < 1e-4
            values, top = row.topk(5)
            assert [t.token for t in x.top_logprobs] == [tokenizer.decode([t]) for t in top.tolist()]
            assert max(abs(t.logprob - float(v)) for t, v in zip(x.top_logprobs, values)) < 1e-4
            assert x.bytes == list(x.token.encode())


def test_echo_gives_the_prompts_logprobs_as_hf_and_logit_bias_moves_the_choice(api):
    url, client, tokenizer, ref, _ = api
    prompt = "The three primary colors are"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, echo=True, logprobs=3)
    text, got = r.choices[0].text, r.choices[0].logprobs
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert "".join(got.tokens) == text
    assert got.text_offset == [len("".join(got.tokens[:i])) for i in range(len(got.tokens))]
    full = torch.tensor([tokenizer(text)["input_ids"]])
    assert full.shape[1] == len(got.tokens)
    lp = hf_logprobs(ref, full)
    for i in range(1, full.shape[1]):
        assert abs(got.token_logprobs[i] - float(lp[i - 1, full[0, i]])) < 1e-4, i
        assert len(got.top_logprobs[i]) == 3

    # logit_bias: -100 on the greedy token makes the next likeliest one chosen; +100 forces one
    first = int(lp[ids.shape[1] - 1].argmax())
    second = int(lp[ids.shape[1] - 1].topk(2).indices[1])
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1,
                                  logit_bias={str(first): -100}, logprobs=0)
    assert r.choices[0].logprobs.tokens == [tokenizer.decode([second])]
    assert abs(r.choices[0].logprobs.token_logprobs[0] - float(lp[ids.shape[1] - 1, second])) < 1e-4  # the model's own
    forced = tokenizer(" banana")["input_ids"][0]
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0.8, max_tokens=3, seed=1,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == tokenizer.decode([forced] * 3)


def test_n_choices_sample_apart_reproducibly_and_best_of_keeps_the_likeliest(api):
    url, client, *_ = api
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=1.0,
               max_tokens=10, seed=5)
    r = client.chat.completions.create(**ask, n=3)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert 3 <= r.usage.completion_tokens <= 30  # every choice's tokens
    streamed: dict[int, str] = {}
    for c in client.chat.completions.create(**ask, n=3, stream=True):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts  # choice i samples with seed + i, streamed or not
    assert client.chat.completions.create(**{**ask, "seed": 6}).choices[0].message.content == texts[1]

    prompt = "Once upon a time"
    opts = dict(model=MODEL, prompt=prompt, temperature=1.0, max_tokens=8, seed=9)
    r = client.completions.create(**opts, n=3, logprobs=0)
    three = r.choices

    def mean(c) -> float:
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)

    best = client.completions.create(**opts, n=1, best_of=3)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None  # ranked by them, not asked for them
    assert best.choices[0].text == max(three, key=mean).text
    assert best.usage.completion_tokens == r.usage.completion_tokens  # the same three generations


def test_requests_beyond_the_running_wait_their_turn_and_beyond_the_queue_get_429(api):
    """api.max_concurrent 1, max_queued 1: the second request waits for the first and gets its
    answer; a third, while both are there, is refused at once with Retry-After."""
    url, client, tokenizer, ref, servers = api
    question = "Name three colors of the rainbow."
    expected = hf_greedy(ref, tokenizer, chat_ids(tokenizer, question), 24)[0]
    with running_api(servers[0], {"max_concurrent": 1, "max_queued": 1}) as small:
        one = openai.OpenAI(base_url=small + "/v1", api_key="-", max_retries=0, timeout=120)
        answers: dict[int, str] = {}

        def ask(i: int, tokens: int, **more) -> None:
            r = one.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=tokens, **more)
            answers[i] = r.choices[0].message.content

        until(lambda: server_sessions(servers) == 0, 20, "no sessions left from earlier tests")
        eos = ref.generation_config.eos_token_id
        barred = {str(t): -100 for t in ([eos] if isinstance(eos, int) else eos) + [tokenizer.eos_token_id]}
        # the first runs its 100 tokens (its end-of-text token barred): seconds, while the rest is tried
        first = threading.Thread(target=ask, args=(0, 100), kwargs={"logit_bias": barred})
        first.start()
        until(lambda: server_sessions(servers) >= 2, 20, "the first request's session")
        second = threading.Thread(target=ask, args=(1, 24))
        second.start()
        time.sleep(0.5)  # waiting in the queue
        assert server_sessions(servers) == 2  # the second has no session yet
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        req = urllib.request.Request(small + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 429 and int(e.value.headers["Retry-After"]) >= 1
        assert json.loads(e.value.read())["error"]["code"] == "too_many_requests"
        first.join(120)
        second.join(120)
        assert answers[1] == expected and 0 in answers


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 24}}, "required": ["name", "age", "city"], "additionalProperties": False}


def test_json_schema_answers_validate_every_time_sampled_and_json_object_is_an_object(api):
    """response_format json_schema held while decoding (llguidance): 20 sampled answers, each
    valid against the schema (pydantic); json_object gives an object; a schema the grammar
    engine refuses is a 400 naming response_format."""
    import pydantic

    url, client, tokenizer, *_ = api

    class Person(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        name: str = pydantic.Field(max_length=24)
        age: int = pydantic.Field(ge=0, le=120)
        city: str = pydantic.Field(max_length=24)

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answers = []
    for seed in range(0, 20, 5):  # 4 requests of 5 choices (seeds seed .. seed + 4): 20 sampled answers
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
                                           response_format=fmt, temperature=1.0, n=5, seed=seed, max_tokens=80)
        answers += [(c.message.content, c.finish_reason) for c in r.choices]
    assert len(answers) == 20
    for text, finish in answers:
        assert finish == "stop", text
        Person.model_validate_json(text)
    assert len({text for text, _ in answers}) > 10  # sampled, not one answer
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person."}], response_format=fmt,
        temperature=0, max_tokens=80, stream=True) if c.choices)
    Person.model_validate_json(streamed)

    # any JSON object: this small model often runs on (its answers cut at max_tokens are the
    # start of an object), and every answer it ends is one
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
                                       response_format={"type": "json_object"}, temperature=1.0, n=4, seed=3,
                                       max_tokens=40)
    assert all(c.message.content.lstrip().startswith("{") for c in r.choices)
    ended = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert all(isinstance(json.loads(text), dict) for text in ended)
    for bad in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}, {"type": "xml"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           response_format=bad)
        assert e.value.body["param"] == "response_format", bad


def test_the_grammar_holds_libswarms_own_generate_to_a_schema(api):
    """The same constraint as a Hugging Face logits processor: generate() on the distributed
    model gives JSON that validates."""
    from libswarm import AutoDistributedModelForCausalLM
    from libswarm.grammar import GrammarLogitsProcessor, json_grammar

    url, client, tokenizer, ref, servers = api
    model = AutoDistributedModelForCausalLM.from_pretrained(ref.name_or_path, socket=servers[0].socket)
    ids = chat_ids(tokenizer, "Invent a person.")
    out = model.generate(ids, do_sample=False, max_new_tokens=80,
                         logits_processor=[GrammarLogitsProcessor(tokenizer, json_grammar(PERSON), 49152)])
    got = json.loads(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert set(got) == {"name", "age", "city"} and isinstance(got["age"], int)
