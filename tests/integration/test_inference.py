"""Generation through a chain of three real swarmd servers and a gateway-only daemon, for every
family, against Hugging Face's own model on the same weights (fp32)."""

import pytest
import torch
from conftest import hf_reference
from helpers import running_swarm
from transformers.generation.streamers import BaseStreamer

from libswarm import AutoDistributedModelForCausalLM, SessionError

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma3", "bloom"]
GEN = dict(pad_token_id=0)


@pytest.fixture(scope="module", params=FAMILIES)
def family_swarm(request, model_dirs):
    d = model_dirs(request.param)
    with running_swarm(d, ["0:2", "2:4", "4:6"]) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        yield request.param, model, hf_reference(d), servers, gw


def prompt(batch=1, length=10, seed=0):
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_hf(family_swarm):
    _, model, ref, _, _ = family_swarm
    ids = prompt(length=16)
    assert (model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-4


def test_greedy_generate_equals_hf(family_swarm):
    _, model, ref, _, _ = family_swarm
    ids = prompt(seed=1)
    ours = model.generate(ids, do_sample=False, max_new_tokens=20, min_new_tokens=20, **GEN)
    theirs = ref.generate(ids, do_sample=False, max_new_tokens=20, min_new_tokens=20, **GEN)
    assert ours.shape == (1, 30)
    assert torch.equal(ours, theirs)


def test_seeded_sampling_equals_hf(family_swarm):
    _, model, ref, _, _ = family_swarm
    ids = prompt(seed=2)
    opts = dict(do_sample=True, top_k=50, top_p=0.9, temperature=0.8, repetition_penalty=1.3,
                max_new_tokens=16, min_new_tokens=16, **GEN)
    torch.manual_seed(123)
    ours = model.generate(ids, **opts)
    torch.manual_seed(123)
    theirs = ref.generate(ids, **opts)
    assert torch.equal(ours, theirs)


def test_batch_of_two_left_padded_prompts_equals_hf(family_swarm):
    _, model, ref, _, _ = family_swarm
    ids = prompt(batch=2, length=12, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # the second prompt is 4 tokens shorter
    opts = dict(attention_mask=mask, do_sample=False, max_new_tokens=12, min_new_tokens=12, **GEN)
    ours = model.generate(ids, **opts)
    theirs = ref.generate(ids, **opts)
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_session_steps_of_several_tokens_equal_one_forward(family_swarm):
    _, model, ref, _, _ = family_swarm
    ids = prompt(length=20, seed=4)
    full = ref(ids).logits
    with model.inference_session(max_length=32):
        parts = [model(ids[:, a:b]).logits for a, b in [(0, 6), (6, 7), (7, 11), (11, 12), (12, 20)]]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-4


def test_generate_calls_continue_one_session(family_swarm):
    family, model, ref, _, _ = family_swarm
    ids = prompt(length=8, seed=5)
    expected = ref.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16, **GEN)
    more = prompt(length=3, seed=6)
    expected2 = ref.generate(torch.cat([expected, more], 1), do_sample=False, max_new_tokens=4,
                             min_new_tokens=4, **GEN)
    with model.inference_session(max_length=64) as sess:
        first = model.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8, **GEN)
        # the whole sequence so far, as HF users pass it
        second = model.generate(first, do_sample=False, max_new_tokens=8, min_new_tokens=8, **GEN)
        assert torch.equal(second, expected)
        # only the new tokens, as a chat loop passes them
        third = model.generate(more, do_sample=False, max_new_tokens=4, min_new_tokens=4, **GEN)
        assert torch.equal(third, expected2)
        assert sess.position == expected2.shape[1] - 1


@torch.no_grad()
def test_labels_give_the_same_loss_as_hf(family_swarm):
    _, model, ref, _, _ = family_swarm
    ids = prompt(batch=2, length=12, seed=7)
    labels = ids.clone()
    labels[:, :3] = -100
    ours, theirs = model(ids, labels=labels), ref(ids, labels=labels)
    assert abs(ours.loss.item() - theirs.loss.item()) <= 1e-4


def test_session_over_max_length_is_refused_and_swarm_keeps_serving(family_swarm):
    _, model, ref, _, _ = family_swarm
    ids = prompt(length=8)
    with model.inference_session(max_length=10):
        model(ids)
        with pytest.raises(SessionError, match="max_length 10"):
            model(prompt(length=3))
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=2, **GEN),
                       ref.generate(ids, do_sample=False, max_new_tokens=2, **GEN))


def test_steps_are_pushed_server_to_server(family_swarm):
    """Each decode step goes gateway -> s0 -> s1 -> s2 -> gateway: n+1 hops, not 2n."""
    _, model, _, servers, gw = family_swarm
    ids = prompt(length=5, seed=8)
    # a server's first push to the next is not sent (the connection is made meanwhile, and the
    # gateway hands that output over itself): one generation first, so that every link is up
    model.generate(ids, do_sample=False, max_new_tokens=2, **GEN)
    before = [s.ctl("status")["stats"] for s in servers]
    resends_before = gw.ctl("status")["gateway"]["resends"]
    with model.inference_session(max_length=16) as sess:
        model.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6, **GEN)
        assert [hop[1:] for hop in sess.route] == [[0, 2], [2, 4], [4, 6]]
    after = [s.ctl("status")["stats"] for s in servers]
    steps = after[0]["steps"] - before[0]["steps"]
    assert steps == 6  # prefill + 5 decode steps (the last token is never fed back)
    d = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)]
    assert [x["steps"] for x in d] == [steps] * 3
    # every step is pushed from each server to the next; on a loaded machine a step whose answer
    # is late is resent to its server ("Lost messages" in docs/protocol.md), which answers it as a
    # repeat and pushes it again: such extra pushes, and no others, are allowed
    resent = gw.ctl("status")["gateway"]["resends"] - resends_before
    sent, received = [x["pushes_sent"] for x in d], [x["pushes_received"] for x in d]
    assert sent[2] == 0 and received[0] == 0
    assert sent[0] >= steps and sent[1] >= steps and sent[0] + sent[1] - 2 * steps <= resent
    assert received[1] >= steps and received[2] >= steps and received[1] + received[2] - 2 * steps <= resent


# HF's generation modes, each either equal to HF through the swarm or refused in one line before
# anything runs: never other tokens than the whole model's (beam search used to return some).
EQUAL_MODES = {
    "greedy": dict(do_sample=False),
    "sampling, 2 sequences": dict(do_sample=True, top_k=20, num_return_sequences=2),
    "greedy with scores": dict(do_sample=False, output_scores=True, return_dict_in_generate=True),
    "beam search, 3 beams": dict(num_beams=3),
    "beam search, 4 beams, length penalty, 2 sequences": dict(num_beams=4, length_penalty=0.5,
                                                              num_return_sequences=2),
    "beam sampling": dict(num_beams=2, do_sample=True),
    "prompt lookup": dict(do_sample=False, prompt_lookup_num_tokens=3),
}
REFUSED_MODES = {
    "group beam search": dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5),
    "constrained beam search": dict(num_beams=2, force_words_ids=[[7]]),
    "contrastive search": dict(penalty_alpha=0.6, top_k=4),
    "DoLa": dict(dola_layers="low"),
    "hidden states": dict(output_hidden_states=True, return_dict_in_generate=True),
    "attentions": dict(output_attentions=True, return_dict_in_generate=True),
}


def test_assisted_greedy_stops_where_greedy_does_and_its_session_goes_on(family_swarm):
    """generate(assistant_model=) runs libswarm's drafting loop: a pass that took drafts past the
    end token leaves the servers with the positions of plain greedy decoding (all tokens but the
    last), so the session's next generate() equals HF's on the whole sequence."""
    family, model, ref, _, _ = family_swarm
    # the end token: the 4th new token (one not among the 3 before it). The draft, HF's own model,
    # is always right, and the first pass after the prompt's carries 4 drafts: new tokens 2 to 6
    for seed in range(4, 40):
        ids = prompt(seed=seed)
        plain = ref.generate(ids, do_sample=False, max_new_tokens=12, **GEN)[0, ids.shape[1]:].tolist()
        if plain[3] not in plain[:3]:
            break
    end = plain[3]
    streamed: list = []

    class Streamer(BaseStreamer):  # what HF's streamers are given: the prompt, then each new token
        def put(self, value):
            streamed.append(value.flatten().tolist())

        def end(self):
            streamed.append("end")

    with model.inference_session(max_length=64) as session:
        out = model.generate(ids, do_sample=False, max_new_tokens=12, assistant_model=ref, eos_token_id=end,
                             streamer=Streamer(), **GEN)
        assert streamed == [ids[0].tolist(), *([t] for t in out[0, ids.shape[1]:].tolist()), "end"]
        assert torch.equal(out, ref.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=end, **GEN)), family
        assert out.shape[1] == ids.shape[1] + 4 and session.position == out.shape[1] - 1
        more = model.generate(out, do_sample=False, max_new_tokens=6, **GEN)
        assert torch.equal(more, ref.generate(out, do_sample=False, max_new_tokens=6, **GEN)), family


def test_every_generation_mode_is_equal_to_hf_or_refused_in_one_line(family_swarm):
    from libswarm import UnsupportedError

    family, model, ref, servers, _ = family_swarm
    ids = prompt(seed=9)
    # assisted decoding (speculative): HF's own model drafts, so every draft is accepted and the
    # swarm verifies several tokens per step; sampled, HF's rejection rule keeps the distribution
    assisted = {"assisted, greedy": dict(do_sample=False, assistant_model=ref),
                "assisted, sampling": dict(do_sample=True, top_k=20, assistant_model=ref)}
    for name, opts in {**EQUAL_MODES, **assisted}.items():
        torch.manual_seed(5)
        ours = model.generate(ids, max_new_tokens=8, min_new_tokens=8, **opts, **GEN)
        torch.manual_seed(5)
        theirs = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, **opts, **GEN)
        if isinstance(ours, torch.Tensor):
            assert torch.equal(ours, theirs), name
        else:
            assert torch.equal(ours.sequences, theirs.sequences), name
            for a, b in zip(ours.scores, theirs.scores):  # -inf where min_new_tokens bans EOS: equal too
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)
    steps = sum(s.ctl("status")["stats"]["steps"] for s in servers)
    for name, opts in REFUSED_MODES.items():
        with pytest.raises(UnsupportedError) as e:
            model.generate(ids, max_new_tokens=8, **opts, **GEN)
        assert "not supported through the swarm" in str(e.value) and "\n" not in str(e.value), name
    with model.inference_session(max_length=64), pytest.raises(UnsupportedError, match="session of its own"):
        model.generate(ids, max_new_tokens=8, num_beams=2, **GEN)  # its beams cannot go on as one conversation
    assert sum(s.ctl("status")["stats"]["steps"] for s in servers) == steps  # refused before any step


def test_threads_sharing_one_model_step_at_once(model_dirs):
    """One model object (one SwarmClient) used from several threads: each thread has its own
    connection to swarmd, so a thread waiting a long time on the swarm (here an open for an
    adapter no server hosts, waiting for one to appear) holds up none of the others, and
    concurrent generations are each Hugging Face's."""
    import threading
    import time

    from libswarm import NoRouteError

    d = model_dirs("llama")
    ref = hf_reference(d)
    with running_swarm(d, ["0:3", "3:6"]) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        waited: dict = {}

        def wait_for_adapter():
            t0 = time.monotonic()
            try:
                model.client.open_session(model.model_id, 16, 1, route_timeout_s=6, adapter="hosted-by-nobody")
            except NoRouteError as e:
                waited["error"] = e
            waited["s"] = time.monotonic() - t0

        results: dict[int, bool] = {}

        def generate(seed: int):
            ids = prompt(seed=seed)
            kw = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, **GEN)
            results[seed] = torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))

        slow = threading.Thread(target=wait_for_adapter)
        slow.start()
        time.sleep(0.5)  # its open is with the gateway now
        workers = [threading.Thread(target=generate, args=(seed,)) for seed in (21, 22)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert slow.is_alive(), "the generations waited for the open that waits 6 s"
        assert results == {21: True, 22: True}
        slow.join(30)
        assert isinstance(waited.get("error"), NoRouteError) and waited["s"] >= 5.5, waited
        # the connections of ended threads are closed when another thread opens one
        late = threading.Thread(target=model.client.status)
        late.start()
        late.join(30)
        assert sorted(model.client._socks) == sorted([threading.get_ident(), late.ident])
