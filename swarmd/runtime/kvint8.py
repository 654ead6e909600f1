"""The int8 KV cache (serve.cache.kv_dtype: int8): keys and values stored as int8 with one
float16 scale per (row, head, position), i.e. per head_dim values.

Format: for each vector x of head_dim values, scale = max|x| / 127 rounded to float16 (at
least 2**-24, float16's smallest step), q = round(x / scale) clipped to [-127, 127]. It costs
1 + 2 / head_dim bytes per value, against 2 for a bfloat16 cache (1.94x the tokens per byte at
head_dim 64, 1.97x at 128) and 4 for float32. The error of a value is at most half a step,
max|x| / 254.

`quantize` and `dequantize` below are the reference (torch, any device). On CUDA, when cupy
works, the same format is written and read by the kernels of this module: one thread block
quantizes a vector as the step appends it, and one pass dequantizes keys and values together
into the attention's dtype. A server checks those kernels against the reference once at start
(`kernels_for`) and keeps to the reference if they disagree or cannot compile."""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger("swarmd.runtime")

SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0**-24  # float16's smallest subnormal: a scale never rounds to zero


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] floating -> (int8 [..., D], float16 scales [...])."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / 127.0).clamp_min(MIN_SCALE).to(SCALE_DTYPE)
    q = torch.round(xf / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference inverse: int8 [..., D] and float16 scales [...] -> `dtype` [..., D]."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


class Int8KV:
    """One block's keys and values for a session: int8 [B, kv_heads, max_length, head_dim]
    each, with float16 scales [B, kv_heads, max_length]. Attention gets them back in `dtype`."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                 kernels: Kernels | None = None):
        self.k = torch.zeros(shape, dtype=torch.int8, device=device)
        self.v = torch.zeros(shape, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device)
        self.v_scale = torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device)
        self.dtype = dtype
        self.kernels = kernels

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale))

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [B, kv_heads, T, D] at [start, start+T); return every
        key/value so far, [B, kv_heads, start+T, D] in the attention's dtype."""
        end = start + k.shape[2]
        qz = self.kernels.quantize if self.kernels is not None else quantize
        for src, buf, scale in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, s = qz(src)
            buf[:, :, start:end] = q
            scale[:, :, start:end] = s
        if self.kernels is not None:
            return self.kernels.dequantize_pair(self.k, self.k_scale, self.v, self.v_scale, end, self.dtype)
        return (dequantize(self.k[:, :, :end], self.k_scale[:, :, :end], self.dtype),
                dequantize(self.v[:, :, :end], self.v_scale[:, :, :end], self.dtype))

    def write_at(self, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor,
                 attend: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A static-shape decode step (a CUDA graph): keys/values [B, kv_heads, 1, D] stored
        at `slot` (a device tensor [1]); returns the first `attend` slots in the attention's
        dtype. Torch operations only, so that the step can be captured."""
        for src, buf, scale in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, s = quantize(src)
            buf.index_copy_(2, slot, q)
            scale.index_copy_(2, slot, s)
        return (dequantize(self.k[:, :, :attend], self.k_scale[:, :, :attend], self.dtype),
                dequantize(self.v[:, :, :attend], self.v_scale[:, :, :attend], self.dtype))

    def reorder(self, index: torch.Tensor, n: int) -> None:
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            t[:, :, :n] = t[index, :, :n]


# --- CUDA kernels (cupy) ---------------------------------------------------------------------------
# Half and bfloat16 values are passed as their 16-bit patterns (cupy has no bfloat16) and
# converted with PTX instructions or bit arithmetic, so that no CUDA header is needed.
_SOURCE = r"""
__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float bf16_to_float(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }
__device__ __forceinline__ unsigned short float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even (values here are finite)
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float identity(float f) { return f; }
__device__ __forceinline__ float load_in(const IN_T* p, long i) { return IN_LOAD(p[i]); }

// one block of 32 * WARPS threads per vector of D values: amax by warp shuffles, then q and scale
extern "C" __global__ void quantize_rows(const IN_T* x, signed char* q, unsigned short* scale, long rows, int D) {
    long row = blockIdx.x;
    if (row >= rows) return;
    const IN_T* xr = x + row * D;
    float m = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) m = fmaxf(m, fabsf(load_in(xr, d)));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    __shared__ float warp_max[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_max[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = lane < (blockDim.x >> 5) ? warp_max[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) warp_max[0] = m;
    }
    __syncthreads();
    float s = fmaxf(warp_max[0] / 127.0f, MIN_SCALE);
    unsigned short s16 = float_to_half(s);
    s = half_to_float(s16);  // quantize with the scale as stored
    if (threadIdx.x == 0) scale[row] = s16;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float r = rintf(load_in(xr, d) / s);
        q[row * D + d] = (signed char)fminf(fmaxf(r, -127.0f), 127.0f);
    }
}

// keys and values of positions [0, end) of a [BH, L, D] cache -> contiguous [BH, end, D] each
extern "C" __global__ void dequantize_pair(const signed char* kq, const unsigned short* ks,
                                           const signed char* vq, const unsigned short* vs,
                                           OUT_T* kout, OUT_T* vout, long bh, long L, long end, int D) {
    long n = bh * end * D;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long d = i % D, t = (i / D) % end, r = i / (D * end);
        long src = (r * L + t) * D + d, srow = r * L + t;
        kout[i] = OUT_STORE((float)kq[src] * half_to_float(ks[srow]));
        vout[i] = OUT_STORE((float)vq[src] * half_to_float(vs[srow]));
    }
}
"""
# dtype -> (C type, load to float, store from float, torch view dtype)
_TYPES = {
    torch.float32: ("float", "identity", "identity", torch.float32),
    torch.float16: ("unsigned short", "half_to_float", "float_to_half", torch.int16),
    torch.bfloat16: ("unsigned short", "bf16_to_float", "float_to_bf16", torch.int16),
}
THREADS = 256


class Kernels:
    """The int8 cache's cupy kernels for one CUDA device, compiled per dtype on first use."""

    def __init__(self, cupy_module):
        self.cp = cupy_module
        self._compiled: dict[tuple[str, torch.dtype], object] = {}
        self._lock = threading.Lock()

    def _kernel(self, name: str, dtype: torch.dtype):
        with self._lock:
            fn = self._compiled.get((name, dtype))
            if fn is None:
                ctype, load, store, _ = _TYPES[dtype]
                src = (_SOURCE.replace("IN_T", ctype).replace("OUT_T", ctype).replace("IN_LOAD", load)
                       .replace("OUT_STORE", store).replace("MIN_SCALE", f"{MIN_SCALE!r}f"))
                fn = self._compiled[(name, dtype)] = self.cp.RawModule(code=src).get_function(name)
            return fn

    def _array(self, t: torch.Tensor):
        view = _TYPES[t.dtype][3] if t.dtype in _TYPES else t.dtype
        return self.cp.asarray(t.view(view) if view != t.dtype else t)

    def _stream(self, device: torch.device):
        return self.cp.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()
        D = x.shape[-1]
        rows = x.numel() // D
        q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        scale = torch.empty(x.shape[:-1], dtype=SCALE_DTYPE, device=x.device)
        if rows:
            threads = min(THREADS, max(32, (D + 31) // 32 * 32))
            with self._stream(x.device):
                self._kernel("quantize_rows", x.dtype)(
                    (rows,), (threads,), (self._array(x), self._array(q), self._array(scale.view(torch.int16)),
                                          self.cp.int64(rows), self.cp.int32(D)))
        return q, scale

    def dequantize_pair(self, k: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, vs: torch.Tensor, end: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, L, D = k.shape
        kout = torch.empty((B, H, end, D), dtype=dtype, device=k.device)
        vout = torch.empty_like(kout)
        n = B * H * end * D
        if n:
            blocks = min((n + THREADS - 1) // THREADS, 65535)
            with self._stream(k.device):
                self._kernel("dequantize_pair", dtype)(
                    (blocks,), (THREADS,),
                    (self._array(k), self._array(ks.view(torch.int16)), self._array(v),
                     self._array(vs.view(torch.int16)), self._array(kout), self._array(vout), self.cp.int64(B * H),
                     self.cp.int64(L), self.cp.int64(end), self.cp.int32(D)))
        return kout, vout


def check_kernels(kernels: Kernels, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the kernels cannot be trusted on this device (None: they equal the reference on
    random inputs of an odd shape, quantized and dequantized)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 7, head_dim, generator=g) * 3).to(device, dtype)
    q_ref, s_ref = quantize(x)
    q, s = kernels.quantize(x)
    if not torch.equal(s, s_ref) or (q.int() - q_ref.int()).abs().max().item() > 1:
        return "quantize differs from the reference"
    L = 11
    kq = torch.randint(-127, 128, (2, 3, L, head_dim), generator=g, dtype=torch.int8).to(device)
    vq = torch.randint(-127, 128, (2, 3, L, head_dim), generator=g, dtype=torch.int8).to(device)
    ks = (torch.rand(2, 3, L, generator=g) + 0.01).to(device, SCALE_DTYPE)
    vs = (torch.rand(2, 3, L, generator=g) + 0.01).to(device, SCALE_DTYPE)
    k, v = kernels.dequantize_pair(kq, ks, vq, vs, 9, dtype)
    for got, q, sc in ((k, kq, ks), (v, vq, vs)):
        if not torch.equal(got, dequantize(q[:, :, :9], sc[:, :, :9], dtype)):
            return "dequantize differs from the reference"
    return None


_kernels: dict[str, Kernels | None] = {}


def kernels_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernels | None:
    """The checked kernels for `device`, or None: the torch reference (CPU; no cupy; kernels
    that fail to compile or disagree with the reference, logged once)."""
    if device.type != "cuda":
        return None
    key = f"{device}:{dtype}:{head_dim}"
    if key not in _kernels:
        try:
            import cupy

            k: Kernels | None = Kernels(cupy)
            assert k is not None
            why = check_kernels(k, device, dtype, head_dim)
        except Exception as e:  # an import, compile or launch failure: the reference still works
            why = f"{type(e).__name__}: {e}"
        if why is not None:
            log.error("int8 KV cache: the cupy kernels are not used on %s (%s); using torch", device, why)
            k = None
        _kernels[key] = k
    return _kernels[key]
