"""A GGUF file to a sharded safetensors checkpoint, one tensor at a time.

transformers' own GGUF loader dequantizes every tensor into one dictionary and builds the float
model from it: the whole float32 model in memory, twice at its peak (6 GB and more for a 1.5B
model), before a byte is written. Here each tensor is read from the file, dequantized (by the
`gguf` package, as transformers does), given the layout transformers gives it (its per-
architecture `TensorProcessor`: Llama's q/k rows unpermuted, Gemma's norms less one) and its
Hugging Face name (transformers' own name map), cast to the dtype asked, and written out before
the next one is read. The two largest (the embeddings and the output head) are dequantized a few
thousand rows at a time straight into their place in the file. The peak is one block's tensors
or one slice of a large one, whatever the model's size.

The shards follow the model's structure: one file per transformer block and one per tensor
outside them (`model-00003-of-00031.safetensors`, with the standard
`model.safetensors.index.json`), so a server holding blocks 10:20 maps only those ten files.

The files are written by a small streaming writer of the safetensors format (a little-endian
header length, a JSON header of names, dtypes, shapes and offsets, then the raw bytes):
safetensors' own `save_file` takes the whole shard as tensors and then as bytes, which is the
memory this module exists to avoid. Every file written is read back by safetensors itself in
the tests (tests/unit/test_convert.py), tensor for tensor against transformers' loader."""

from __future__ import annotations

import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from libswarm import quantized
from libswarm.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# Models of up to this many parameters are kept in float32 when no dtype is asked: a float32
# checkpoint is what the swarm's exactness is tested against, and at this size it is under 4 GB.
# Larger ones default to bfloat16: half the disk and memory of every server holding them, and a
# GGUF's 4-6 bit values lose far less to bfloat16's rounding (8 significant bits, 0.4 % at most)
# than to their own quantization, with float32's range (float16 would flush the smallest to zero).
FLOAT32_UP_TO_PARAMETERS = 1_000_000_000
SLICE_BYTES = 64 << 20  # a large tensor is dequantized this many float32 bytes at a time
_BLOCK_RE = re.compile(r"^(?:.*?)(?:layers|h)\.(\d+)\.")

Progress = Callable[[str], None]


@dataclass
class _Planned:
    gguf: Any  # gguf.ReaderTensor
    name: str  # its Hugging Face name
    shape: tuple[int, ...]
    shard: int
    kind: str = "float"  # or int8 / int4: written as libswarm/quantized.py's parts

    def entries(self, dtype: torch.dtype) -> list[tuple[str, str, list[int], int]]:
        """What it is written as: (name, safetensors dtype, shape, bytes) for each part."""
        if self.kind == "float":
            n = int(np.prod(self.shape))
            return [(self.name, SAFETENSORS_DTYPES[dtype], list(self.shape), n * (torch.finfo(dtype).bits // 8))]
        rows, cols = self.shape
        names = quantized.part_names(self.name, self.kind)
        if self.kind == "int8":
            return [(names[0], "I8", [rows, cols], rows * cols), (names[1], "BF16", [rows], 2 * rows)]
        groups = cols // GGUF_INT4_GROUP
        return [(names[0], "U8", [rows, cols // 2], rows * cols // 2),
                *((n, "BF16", [rows, groups], 2 * rows * groups) for n in names[1:])]


# A GGUF's own quantization kept (`keep_quant`): the kinds its linear weights in blocks are
# served as. The 4-bit ones with 32 weights to a scale and a minimum (or none) are int4 exactly
# (libswarm/quantized.py's layout: scales and minimums mapped, the 4-bit values as they are);
# the finer ones (Q5/Q6/Q8) are int8 with a scale per row, from their values; the coarser ones
# int4 in groups of 32 from their values. Float tensors stay float.
GGUF_INT4_GROUP = 32
EXACT_INT4 = ("Q4_0", "Q4_1", "Q4_K")
TO_INT8 = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def kept_kind(type_name: str, shape: tuple[int, ...]) -> str:
    """What a block's linear weight of GGUF type `type_name` and HF shape [out, in] is kept as."""
    if type_name in FLOAT_TYPES or len(shape) != 2:
        return "float"
    rows, cols = shape
    if type_name in TO_INT8:
        return "int8"
    # the CPU int4 kernel takes [out, in] with out a multiple of 16 and in of the group
    return "int4" if rows % 16 == 0 and cols % GGUF_INT4_GROUP == 0 else "int8"


def default_dtype(parameters: int) -> str:
    return "float32" if parameters <= FLOAT32_UP_TO_PARAMETERS else "bfloat16"


def convert_gguf(path: str, out: str, dtype: str | None = None, progress: Progress | None = None,
                 what: str | None = None, keep_quant: bool = False) -> dict:
    """Write the checkpoint of the GGUF file at `path` into the existing directory `out`: config,
    generation config, tokenizer and sharded safetensors in `dtype` (None: by size, see
    `default_dtype`). With `keep_quant`, the blocks' quantized linear weights are written as
    int8/int4 (see `kept_kind`), not dequantized. Returns facts for the model card: dtype,
    parameters, shards, bytes, seconds, and the kinds of weights kept (tensors of each)."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    what = what or path
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    t0 = time.monotonic()
    folder, file = os.path.split(path)
    try:
        with _parsed_once(path):
            parsed = hf_gguf.load_gguf_checkpoint(path, return_tensors=False)["config"]  # metadata only
            config = AutoConfig.from_pretrained(folder, gguf_file=file)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            reader = gguf.GGUFReader(path)
    except Exception as e:  # transformers and gguf raise many kinds on a bad file
        raise ModelError(f"{what}: cannot read it as GGUF (truncated or corrupt?): {_first_line(e)}") from None
    with torch.device("meta"):  # names and shapes, no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    architecture = str(reader.fields["general.architecture"].contents())
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
    names = get_gguf_hf_weights_map(skeleton, processor)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    plan = _plan(reader, names, shapes, what)
    parameters = sum(int(np.prod(p.shape)) for p in plan)
    dtype = dtype or default_dtype(parameters)
    torch_dtype = DTYPES[dtype]
    kept: dict[str, int] = {}
    if keep_quant:
        for p in plan:
            if _BLOCK_RE.match(p.name) and p.name.endswith(".weight"):
                p.kind = kept_kind(p.gguf.tensor_type.name, p.shape)
            kept[p.kind] = kept.get(p.kind, 0) + 1

    shards: dict[int, list[_Planned]] = {}
    for p in plan:
        shards.setdefault(p.shard, []).append(p)
    count = len(shards)
    weight_map, total = {}, 0
    done = 0
    with open(path, "rb") as f:
        for i, (_, tensors) in enumerate(sorted(shards.items())):
            shard = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            total += _write_shard(os.path.join(out, shard), tensors, torch_dtype, f, processor)
            weight_map.update({e[0]: shard for t in tensors for e in t.entries(torch_dtype)})
            done += len(tensors)
            if progress is not None and (i % 4 == 3 or i == count - 1):
                progress(f"converted {done}/{len(plan)} tensors to {dtype} ({i + 1}/{count} shards, "
                         f"{time.monotonic() - t0:.0f} s)")
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fi:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fi, indent=2)

    config.dtype = dtype
    config.save_pretrained(out)
    config_path = os.path.join(out, "config.json")
    with open(config_path) as fc:
        saved = json.load(fc)
    for key in ("quantization_config", "_model_name_or_path"):  # the weights are plain floats now
        saved.pop(key, None)
    coarsest = next((k for k in ("int4", "int8") if kept.get(k)), None)
    if coarsest:
        saved[quantized.CONFIG_KEY] = coarsest
    with open(config_path, "w") as fc:
        json.dump(saved, fc, indent=2, sort_keys=True)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"dtype": dtype, "parameters": parameters, "shards": count, "bytes": total,
            "seconds": time.monotonic() - t0, "kept": kept}


def read_gguf(path: str) -> Any:
    """gguf's reader of the file at `path`, parsed three times faster: the reader slices its
    memory map once per value (a 262k-token vocabulary is a million slices), and slices of a
    np.memmap run Python hooks where a plain array's do not. The map is kept (the plain view
    holds it), only the hooks go: the same fields and tensors, read the same way."""
    from gguf.gguf_reader import GGUFReader  # where it is defined (the package's name is swapped in _parsed_once)

    class Reader(GGUFReader):
        @property  # type: ignore[override]  # a plain view of the map, not the np.memmap itself
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader(path)


@contextmanager
def _parsed_once(path: str) -> Iterator[None]:
    """While the config, the tokenizer and the plan are read, every parse of the file at `path`
    is one parse. transformers reads a GGUF's metadata afresh for each (gguf's reader, then its
    own walk of every value) and the vocabulary is most of it: four parses were 80% of a
    262k-token Gemma's conversion. Both entry points are looked up on their modules at call time
    (transformers imports them inside its functions), so they are swapped here and put back."""
    import copy

    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    real_reader, real_load = gguf.GGUFReader, hf_gguf.load_gguf_checkpoint
    mine = os.path.realpath(path)
    readers: dict[str, Any] = {}
    loaded: dict[str, Any] = {}

    def reader(p, mode="r"):
        if mode != "r" or os.path.realpath(p) != mine:
            return real_reader(p, mode)
        if "r" not in readers:
            readers["r"] = read_gguf(p)
        return readers["r"]

    def load(p, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs or os.path.realpath(p) != mine:
            return real_load(p, return_tensors, *args, **kwargs)
        if "m" not in loaded:
            loaded["m"] = real_load(p, False)
        return copy.deepcopy(loaded["m"])  # callers pop from what they get

    swaps = [(gguf, "GGUFReader", reader, real_reader), (hf_gguf, "load_gguf_checkpoint", load, real_load)]
    for module, name, shared, _ in swaps:
        setattr(module, name, shared)
    try:
        yield
    finally:
        for module, name, _, real in swaps:
            setattr(module, name, real)


def _plan(reader, names: dict[str, str], shapes: dict[str, tuple[int, ...]], what: str) -> list[_Planned]:
    """Every GGUF tensor the model has, with its name, shape and shard (one per block, one per
    tensor outside the blocks, in the order the model uses them)."""
    plan = []
    for t in reader.tensors:
        name = names.get(t.name)
        if name is None:
            continue  # what transformers' loader skips too (rope frequencies llama.cpp precomputes)
        if name not in shapes:
            raise ModelError(f"{what}: tensor {t.name} maps to {name}, which the model does not have")
        plan.append(_Planned(t, name, shapes[name], 0))
    missing = set(shapes) - {p.name for p in plan}
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if missing - tied:
        raise ModelError(f"{what}: the file lacks tensor(s) {', '.join(sorted(missing - tied)[:3])}")

    blocks: dict[int, list[_Planned]] = {}
    embeddings: list[_Planned] = []
    rest: list[_Planned] = []
    for p in plan:
        m = _BLOCK_RE.match(p.name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(p)
        else:
            (embeddings if "embed" in p.name else rest).append(p)
    groups = [[p] for p in sorted(embeddings, key=lambda p: p.name)] + [blocks[i] for i in sorted(blocks)] + \
        [[p] for p in sorted(rest, key=lambda p: p.name)]
    for shard, group in enumerate(groups):
        for p in group:
            p.shard = shard
    return plan


def _write_shard(path: str, tensors: list[_Planned], dtype: torch.dtype, f, processor) -> int:
    """One safetensors file: the header from the planned shapes, then each tensor's bytes as it
    is dequantized (or its parts, for a kept quantization). Returns the bytes of tensor data."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # type: ignore[dict-item]
    offset = 0
    for t in tensors:
        for name, st_dtype, shape, size in t.entries(dtype):
            header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    tmp = path + ".part"
    with open(tmp, "wb") as w:
        w.write(struct.pack("<Q", len(head)))
        w.write(head)
        for t in tensors:
            if t.kind != "float":
                parts = _quantized_parts(t, f, processor)
                for part, (name, _, shape, size) in zip(parts, t.entries(dtype)):
                    raw = part.contiguous().view(torch.uint8).numpy().tobytes()
                    if list(part.shape) != shape or len(raw) != size:
                        raise ModelError(f"{t.gguf.name}: part {name} came out {list(part.shape)}, expected {shape}")
                    w.write(raw)
                continue
            written = 0
            for piece in _dequantized(t, f, processor):
                data = piece.to(dtype).contiguous()
                w.write(data.view(torch.uint8).numpy().tobytes() if dtype == torch.bfloat16 else data.numpy().tobytes())
                written += data.numel()
            if written != int(np.prod(t.shape)):
                raise ModelError(f"{t.gguf.name}: dequantized to {written} values, expected {list(t.shape)}")
    os.replace(tmp, path)
    return offset


def _quantized_parts(t: _Planned, f, processor) -> list[torch.Tensor]:
    """A block's linear weight as libswarm/quantized.py's parts of `t.kind`. A 4-bit GGUF type of
    32 weights a group (EXACT_INT4) gives its own 4-bit values, scales and minimums (only the
    scale and the zero rounded to bfloat16, as the kernel takes them); the others go through
    their float values. transformers' processor may reorder a weight's rows (Llama's q and k):
    the same order is found by running it over the rows' indices and applied to every part."""
    g = t.gguf
    rows, cols = t.shape
    order = processor.process(weights=np.arange(rows, dtype=np.float64).reshape(rows, 1), name=g.name).weights
    order = np.asarray(order).reshape(-1)
    if order.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)):
        raise ModelError(f"{g.name}: transformers' reader changes its values, not only its rows' order; "
                         "import it without keeping its quantization")
    perm = torch.from_numpy(order.astype(np.int64))
    if t.kind == "int4" and g.tensor_type.name in EXACT_INT4:
        raw = np.frombuffer(bytearray(os.pread(f.fileno(), g.n_bytes, g.data_offset)), dtype=np.uint8)
        q, scale, low = _int4_values(raw.reshape(rows, -1), g.tensor_type.name, cols)
        scale, low, q = scale[perm], low[perm], q[perm]
        scale_b = scale.to(quantized.SCALE_DTYPE)
        zero = (low + 8 * scale).to(quantized.SCALE_DTYPE)
        return [quantized.pack_int4(q), scale_b, zero]
    w = next(_dequantized(t, f, processor))  # already in the processor's order
    if t.kind == "int8":
        return list(quantized.int8_rows(w))
    q, scale_b, zero = quantized.int4_groups(w, GGUF_INT4_GROUP)
    return [quantized.pack_int4(q), scale_b, zero]


def _int4_values(raw: np.ndarray, type_name: str, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit GGUF tensor's bytes [rows, row bytes] as (q uint8 [rows, cols] of 0..15, scale and
    low float32 [rows, cols / 32]): each weight is q * scale + low. The layouts (ggml's): Q4_0 is
    blocks of 32 weights, a float16 d then 16 bytes, byte j holding weight j low and j + 16 high,
    the weight d * (q - 8); Q4_1 the same after a float16 d and m, the weight d * q + m; Q4_K is
    super-blocks of 256, a float16 d and dmin, 12 bytes of eight 6-bit scales and mins, then 128
    bytes in four runs of 32, run r holding sub-block 2r low and 2r + 1 high, the weight
    d * scale * q - dmin * min."""
    rows = raw.shape[0]
    if type_name == "Q4_K":
        from gguf.quants import Q4_K

        blocks = raw.reshape(-1, 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 15).reshape(rows, cols)
        scale = (d * sc.astype(np.float32)).reshape(rows, -1)
        low = (-dmin * mn.astype(np.float32)).reshape(rows, -1)
    else:
        width = 18 if type_name == "Q4_0" else 20
        blocks = raw.reshape(-1, width)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        if type_name == "Q4_0":
            low = -8 * d
        else:
            low = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, width - 16:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
        q = (qs & 15).reshape(rows, cols)
        scale, low = d.reshape(rows, -1), low.reshape(rows, -1)
    return torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(scale.copy()), torch.from_numpy(low.copy())


def _dequantized(t: _Planned, f, processor) -> Iterator[torch.Tensor]:
    """The tensor in float32, in the layout transformers gives it: whole, or for a large one
    (more than SLICE_BYTES as float32, outside the blocks, which no processor reorders) a slice
    of rows at a time. Read from the file with pread rather than through the reader's memory
    map: pages of a map touched once stay in this process's RSS until it ends."""
    from gguf import dequantize

    g = t.gguf
    raw_shape = tuple(int(x) for x in g.data.shape)
    rows = int(np.prod(raw_shape[:-1])) if len(raw_shape) > 1 else 1
    row_bytes = g.n_bytes // rows
    out_rows = t.shape[0] if len(t.shape) > 1 else 1
    per_row = int(np.prod(t.shape)) // out_rows
    sliced = (len(t.shape) == 2 and rows == out_rows and not _BLOCK_RE.match(t.name)
              and per_row * out_rows * 4 > SLICE_BYTES)
    step = max(1, SLICE_BYTES // (4 * per_row)) if sliced else rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        buf = bytearray(os.pread(f.fileno(), (r1 - r0) * row_bytes, g.data_offset + r0 * row_bytes))
        raw = np.frombuffer(buf, dtype=g.data.dtype).reshape((r1 - r0,) + raw_shape[1:] if len(raw_shape) > 1 else -1)
        values = dequantize(raw, g.tensor_type)
        result = processor.process(weights=values, name=g.name)
        if result.name != g.name:
            raise ModelError(f"{g.name}: renamed to {result.name} by transformers' reader, which this converter "
                             "does not follow (mixture-of-experts layouts)")
        shape = ((r1 - r0),) + t.shape[1:] if sliced else t.shape
        yield torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32)).reshape(shape)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
