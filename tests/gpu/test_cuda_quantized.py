"""On a GPU: the int8 KV cache's cupy kernels against the torch reference, decode steps replayed
as CUDA graphs against the eager path, and a swarm with nf4 weights and an int8 KV cache
(skipped without CUDA)."""

import pytest
import torch
from conftest import hf_reference
from helpers import running_swarm

from libswarm import AutoDistributedModelForCausalLM
from libswarm.checkpoint import Checkpoint
from swarmd.runtime import kvint8
from swarmd.runtime.span import Span

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (3, 5, 7, 128), (2, 3, 33, 80), (1, 2, 5, 17)])
def test_cupy_kernels_equal_the_torch_reference(dtype, shape):
    kernels = kvint8.Kernels(pytest.importorskip("cupy"))
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[2])[None, None, :, None]).to(CUDA, dtype)
    q, s = kernels.quantize(x)
    q_ref, s_ref = kvint8.quantize(x)
    assert torch.equal(s, s_ref)
    assert (q.int() - q_ref.int()).abs().max().item() <= 1  # a tie may round either way
    assert (q != 0).any()
    B, H, L, D = shape
    L += 4
    kq, vq = (torch.randint(-127, 128, (B, H, L, D), generator=g, dtype=torch.int8).to(CUDA) for _ in range(2))
    ks, vs = ((torch.rand(B, H, L, generator=g) + 0.01).to(CUDA, kvint8.SCALE_DTYPE) for _ in range(2))
    for end in (1, L - 3, L):
        k, v = kernels.dequantize_pair(kq, ks, vq, vs, end, dtype)
        assert torch.equal(k, kvint8.dequantize(kq[:, :, :end], ks[:, :, :end], dtype))
        assert torch.equal(v, kvint8.dequantize(vq[:, :, :end], vs[:, :, :end], dtype))
    assert kvint8.check_kernels(kernels, CUDA, dtype, D) is None


@pytest.mark.parametrize("int8", [False, True])
@torch.no_grad()
def test_decode_steps_replayed_as_cuda_graphs_equal_the_eager_path(model_dirs, int8):
    d = model_dirs("mistral")  # a sliding window too
    ck = Checkpoint(d)
    graphed = Span(ck, 0, ck.num_layers, CUDA, torch.bfloat16, kv_int8=int8).load()
    eager = Span(ck, 0, ck.num_layers, CUDA, torch.bfloat16, kv_int8=int8, cuda_graphs=False).load()
    assert graphed.graphs is not None and eager.graphs is None
    h = torch.randn(2, 40, ck.config.hidden_size, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(40).expand(2, 40)
    outs = []
    for sp in (graphed, eager):
        c = sp.new_cache(0, sp.end, 2, 48)
        parts = [sp.run(h[:, :8], pos[:, :8], None, 0, sp.end, cache=c).float().cpu()]
        parts += [sp.run(h[:, t:t + 1], pos[:, t:t + 1], None, 0, sp.end, cache=c).float().cpu()
                  for t in range(8, 40)]
        outs.append(torch.cat(parts, 1))
        if sp is graphed:
            sp.forget(c)
    assert graphed.graphs.off is None and graphed.graphs.captured == 1 and not graphed.graphs.graphs
    rel = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
    assert rel <= 2e-2, rel  # bfloat16: the masked full-cache attention sums in another order


def test_a_cuda_swarm_with_nf4_weights_and_an_int8_cache_generates(model_dirs):
    d = model_dirs("llama", hidden=128, heads=2)  # head_dim 64, widths that nf4 blocks divide
    extra = {"serve": {"device": "cuda", "dtype": "bfloat16", "quant": "nf4",
                       "cache": {"max_bytes": "256MiB", "kv_dtype": "int8"}}}
    with running_swarm(d, ["0:3", "3:6"], extra=extra) as (servers, gw):
        status = servers[0].ctl("status")
        assert status["serve"]["quant"] == "nf4" and status["cache"]["kv_dtype"] == "int8"
        assert status["serve"]["cuda_graphs"] is not None
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(5))
        kw = dict(do_sample=False, max_new_tokens=16, pad_token_id=0)
        out = model.generate(ids, **kw)
        assert out.shape == (1, 23)
        # 4-bit random tiny weights: the logits keep their direction, not the greedy token
        # (cosine 0.7-0.8 measured with the same spans on the CPU)
        ref = hf_reference(d)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(model(ids).logits.float().flatten(),
                                                        ref(ids).logits.flatten(), dim=0).item()
        assert cos >= 0.6, cos
        assert servers[0].ctl("status")["serve"]["cuda_graphs"]["off"] is None
