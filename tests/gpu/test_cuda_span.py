"""On a GPU: a span served on CUDA computes what Hugging Face computes (skipped without CUDA)."""

import pytest
import torch
from conftest import hf_reference

from libswarm.checkpoint import Checkpoint
from swarmd.runtime.cache import SessionCache
from swarmd.runtime.span import Span

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
@torch.no_grad()
def test_cuda_span_with_cache_matches_hf(model_dirs, family, dtype, tol):
    d = model_dirs(family)
    ref = hf_reference(d)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(3))
    out = ref(ids)
    span = Span(Checkpoint(d), 0, 6, torch.device("cuda"), dtype).load()
    cache = SessionCache(first=0, last=6, batch=1, max_length=16, kv_heads=span.num_kv_heads,
                         head_dim=span.head_dim, dtype=dtype, device=torch.device("cuda"))
    base = ref.base_model
    h = base.get_input_embeddings()(ids)
    if family == "bloom":
        h = base.word_embeddings_layernorm(h)
    steps = [(0, 8), (8, 9), (9, 12)]  # a prefill, one token, several tokens
    parts = [span.run(h[:, a:b], torch.arange(a, b)[None], None, 0, 6, cache=cache) for a, b in steps]
    got = torch.cat(parts, 1).float().cpu()
    norm = base.norm if family == "llama" else base.ln_f
    logits = ref.lm_head(norm(got))
    assert (logits - out.logits).abs().max().item() <= tol * max(1.0, out.logits.abs().max().item())
