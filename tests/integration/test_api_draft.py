"""swarm-api with `api.draft_model`: greedy requests drafted by a small model of the same
tokenizer run in swarm-api, checked by one pass through the swarm each, give exactly the tokens
of plain greedy decoding (Hugging Face's, on the whole model); a draft that always agrees takes
fewer passes than tokens; requests that sample are not drafted."""

import openai
import pytest
import torch
from helpers import running_swarm
from localswarm import running_api
from make_test_model import make_model  # tools/, on the path by conftest

PROMPT = "The swarm serves a large language model"


def steps(servers) -> int:
    return sum(s.ctl("status")["stats"]["steps"] for s in servers)


@pytest.fixture(scope="module")
def tiny(model_dirs, tmp_path_factory):
    d = model_dirs("llama")
    other = make_model("llama", str(tmp_path_factory.mktemp("draft-other")), layers=2, kv_heads=2, seed=7)
    return d, other


@pytest.mark.parametrize("draft", ["same", "other"])
def test_drafted_greedy_completions_equal_hf_and_an_agreeing_draft_saves_passes(tiny, draft):
    from conftest import hf_reference

    d, other = tiny
    # peer messages delayed 20 ms, a pass's round trips: what drafting saves (on bare loopback a
    # draft as large as the model costs as much as the pass it saves, and the loop may not draft)
    with running_swarm(d, ["0:3", "3:6"], gateway=False, env_all={"SWARMD_NET_DELAY_MS": "20"}) as (servers, first):
        # the other draft runs on torch's packed int8 kernels (api.draft_quant): its tokens change, not the answer
        settings = {"draft_model": d} if draft == "same" else {"draft_model": other, "draft_quant": "int8"}
        with running_api(first, settings) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            name = client.models.list().data[0].id
            ref = hf_reference(d)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(d)
            ids = torch.tensor([tok(PROMPT)["input_ids"]])
            want = ref.generate(ids, do_sample=False, max_new_tokens=30)[0, ids.shape[1]:]
            text = tok.decode(want, skip_special_tokens=True)
            before = steps(servers[:1])
            r = client.completions.create(model=name, prompt=PROMPT, temperature=0, max_tokens=30)
            passes = steps(servers[:1]) - before
            assert r.choices[0].text == text and r.usage.completion_tokens == want.shape[0]
            if draft == "same":  # every draft is taken, several a pass
                assert passes <= 6, passes
            else:  # a random model of the same tokenizer: its drafts are rarely the model's, yet
                assert passes <= want.shape[0], passes  # a pass never yields less than one token
            before = steps(servers[:1])
            r = client.completions.create(model=name, prompt=PROMPT, temperature=0.8, seed=3, max_tokens=12)
            assert steps(servers[:1]) - before == r.usage.completion_tokens  # sampled: a pass a token
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model=name, prompt=PROMPT, temperature=0, max_tokens=30, stream=True) if c.choices)
            assert streamed == text
