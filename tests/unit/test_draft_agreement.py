"""tools/draft_agreement.py replays greedy speculative decoding exactly: a pass keeps the drafts
up to the first disagreement (at most k) plus the model's own token, and no pass spans two
answers."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))

from draft_agreement import tokens_per_pass  # noqa: E402


def test_passes_stop_at_the_first_disagreement_at_k_drafts_and_at_an_answers_end():
    agrees = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    # k=4: [a0 a1 | model's 3rd token], [a3..a6 | model's 8th]: 2 passes for 8 tokens
    assert tokens_per_pass(agrees, [8], 4) == 4.0
    # k=2: [a0 a1 +1], [a3 a4 +1], [a6 a7 | answer ends]: 3 passes
    assert tokens_per_pass(agrees, [8], 2) == 8 / 3
    # the same positions as two answers of 4: [a0 a1 +1], [a3 | end], [a4..a7 | end]: 3 passes
    assert tokens_per_pass(agrees, [4, 8], None) == 8 / 3
    # a draft that always agrees: k drafts and the model's own token a pass, 3 + 3 + 3 + 1 here
    assert tokens_per_pass(torch.ones(10, dtype=torch.bool), [10], 2) == 10 / 4
    # a draft that never agrees: one token a pass, as plain decoding
    assert tokens_per_pass(torch.zeros(5, dtype=torch.bool), [5], 4) == 1.0
