"""GreedySpeculator (libswarm/speculative.py) against Hugging Face's greedy generate() on the
same weights: the tokens are the model's whatever the draft proposes, and with a draft that
agrees, the proposals are made while the passes are out."""

import time

import pytest
import torch
from conftest import hf_reference
from make_test_model import make_model  # tools/, on the path by conftest
from transformers import DynamicCache

from libswarm.speculative import CACHE_FIELD, GreedySpeculator


def local_model(model, delay_s: float = 0.0):
    """verify/rollback over `model` with a cache here: what a swarm session does, plus a delay
    standing for a pass's round trips."""
    cache = DynamicCache()

    def verify(fed: list[int]) -> torch.Tensor:
        time.sleep(delay_s)
        with torch.no_grad():
            return model(input_ids=torch.tensor([fed]), use_cache=True, **{CACHE_FIELD: cache}).logits[0]

    def rollback(n: int) -> None:
        if cache.get_seq_length() > n:  # a negative crop removes
            cache.crop(n - cache.get_seq_length())

    return verify, rollback


def speculate(model, draft, prompt: torch.Tensor, n: int, **kw) -> tuple[list[int], GreedySpeculator]:
    verify, rollback = local_model(model, kw.pop("delay_s", 0.0))
    first = int(verify(prompt[0].tolist())[-1].argmax())
    spec = GreedySpeculator(draft, verify, rollback, **kw)
    tokens = [first] + [t for t, _ in spec.decode(prompt[0].tolist() + [first], n - 1)]
    return tokens, spec


@pytest.fixture(scope="module")
def models(model_dirs, tmp_path_factory):
    d = model_dirs("llama")
    other = make_model("llama", str(tmp_path_factory.mktemp("spec-draft")), layers=2, kv_heads=2, seed=7)
    return hf_reference(d), hf_reference(other)


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("which", ["same", "other"])
def test_tokens_are_the_models_greedy_tokens_whatever_the_draft(models, which, ahead):
    model, other = models
    draft = model if which == "same" else other
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, model.config.vocab_size, (1, 5 + 3 * seed), generator=gen)
        want = model.generate(prompt, do_sample=False, max_new_tokens=25)[0, prompt.shape[1]:].tolist()
        # where the draft agrees, a pass takes 200 ms (round trips): drafting pays, even on a loaded machine
        got, spec = speculate(model, draft, prompt, 25, ahead=ahead, delay_s=0.2 if which == "same" else 0.0)
        assert got == want
        s = spec.stats
        assert s.passes <= 24 and s.accepted <= s.drafted
        if which == "same":  # every draft taken, several a pass
            assert s.accepted == s.drafted and s.passes <= 8, s
        else:  # drafts were made and some refused: the caches were cut back
            assert s.accepted < s.drafted, s


def test_a_draft_that_agrees_proposes_while_the_pass_is_out(models):
    """Each pass takes 0.2 s: the draft (ms a token here) has the next proposal ready when it
    returns, so after the first pass none waits for drafting; without `ahead` every one does."""
    model, _ = models
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(11))
    want = model.generate(prompt, do_sample=False, max_new_tokens=40)[0, prompt.shape[1]:].tolist()
    got, spec = speculate(model, model, prompt, 40, delay_s=0.2, first_k=3, max_k=3)
    assert got == want
    s = spec.stats
    # 4 tokens a pass; but the first pass's drafts were made while a pass was out
    assert s.passes == 10 and s.ahead_passes == s.passes - 1 and s.ahead_drafts == s.drafted - 3, s
    got, serial = speculate(model, model, prompt, 40, delay_s=0.2, first_k=3, max_k=3, ahead=False)
    assert got == want and serial.stats.passes == 10
    assert serial.stats.ahead_passes == serial.stats.ahead_drafts == 0


def test_logits_processors_choose_the_tokens_as_in_hf_greedy(models):
    """generate(assistant_model=) hands the loop Hugging Face's logits processors: each position's
    token is chosen from its processed logits, given the sequence before it, drafts included."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    model, _ = models
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.8), NoRepeatNGramLogitsProcessor(2)])

    def pick(tokens: list[int], row: torch.Tensor) -> int:
        return int(processors(torch.tensor([tokens]), row[None].float()).argmax())

    for seed in range(3):
        prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(20 + seed))
        want = model.generate(prompt, do_sample=False, max_new_tokens=25, repetition_penalty=1.8,
                              no_repeat_ngram_size=2)[0, prompt.shape[1]:].tolist()
        plain = model.generate(prompt, do_sample=False, max_new_tokens=25)[0, prompt.shape[1]:].tolist()
        assert want != plain  # the processors change the tokens: the test tells them apart
        verify, rollback = local_model(model)
        seq = prompt[0].tolist()
        first = pick(seq, verify(seq)[-1])
        spec = GreedySpeculator(model, verify, rollback, pick=pick)  # the draft knows nothing of them
        got = [first] + [t for t, _ in spec.decode(seq + [first], 24)]
        assert got == want
        assert spec.stats.accepted < spec.stats.drafted  # drafts the processors turned down were cut back
