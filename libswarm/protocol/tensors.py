"""Tensors <-> raw buffers. A tensor travels as (dtype name, shape) in the header and its bytes
in a frame of its own, sent without copies; nothing received is ever unpickled."""

from __future__ import annotations

import hashlib
import math
import warnings

import torch

from libswarm.errors import TensorError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_NDIM = 8
MAX_DIM = 2**31 - 1  # one dimension; a larger one could not be backed by any frame ZeroMQ takes

# Buffers received from ZeroMQ are read-only; the tensors built on them are only read
# (every server op writes to fresh memory), so torch's warning about that is noise.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def tensor_to_buffer(t: torch.Tensor) -> tuple[dict, memoryview]:
    """(spec, buffer) for a tensor; the buffer shares memory with a contiguous CPU copy."""
    if t.dtype not in DTYPE_NAMES:
        raise TensorError(f"dtype {t.dtype} cannot be sent; use one of {', '.join(DTYPES)}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    spec = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    flat = t.reshape(-1)
    raw = flat.view(torch.uint8) if t.dtype != torch.uint8 else flat
    return spec, memoryview(raw.numpy())  # type: ignore[arg-type]


def tensor_from_buffer(spec: object, buf: memoryview | bytes) -> torch.Tensor:
    """Rebuild a tensor from its header spec and frame, checking both before touching memory."""
    if not isinstance(spec, dict):
        raise TensorError("tensor spec must be an object with dtype and shape")
    name = spec.get("dtype")
    shape = spec.get("shape")
    if name not in DTYPES:
        raise TensorError(f"unknown tensor dtype {name!r}; expected one of {', '.join(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise TensorError(f"bad tensor shape {str(shape)[:80]}: a list of at most {MAX_NDIM} ints in 0..{MAX_DIM}")
    dtype = DTYPES[name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    nbytes = memoryview(buf).nbytes
    if nbytes != expected:
        raise TensorError(f"tensor of dtype {name} and shape {shape} needs {expected} bytes, frame has {nbytes}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


DIGEST_BYTES = 16  # 128 bits: a collision would take ~2**64 hashes; a pusher has to
# find a wrong input whose digest equals the right one's (a second preimage: ~2**128)


def tensor_digest(t: torch.Tensor) -> str:
    """What a step's `consumed` says (docs/protocol.md): sha256 over "dtype|shape|" and the
    tensor's bytes as they travel (C order, little-endian), its first 16 bytes in hex. The dtype
    and shape are in it because the same bytes read as another dtype or shape are another input."""
    spec, buf = tensor_to_buffer(t)
    h = hashlib.sha256(f"{spec['dtype']}|{','.join(map(str, spec['shape']))}|".encode())
    h.update(buf)
    return h.digest()[:DIGEST_BYTES].hex()
