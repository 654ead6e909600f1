"""How fast this machine runs one block of the model: measured once per model, device and
dtype on a real block, and kept in state_dir/throughput.json (a restart does not re-measure).
Also serve.dtype auto's choice on a CPU (`auto_cpu_dtype`), timed the same way."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from libswarm.checkpoint import Checkpoint
from swarmd.runtime.span import Span

log = logging.getLogger("swarmd.runtime")

FORWARD_TOKENS = 128  # the "large batch": one forward of this many positions


@dataclass(frozen=True)
class BlockSpeed:
    step_s: float  # one block, one one-token inference step (batch 1)
    forward_tokens_per_s: float  # one block, a forward of FORWARD_TOKENS positions
    block_bytes: int  # one block's weights in the serving dtype (quantized: with their scales)

    def span_throughput(self, blocks: int, step_bytes: int = 0, bandwidth_bps: float | None = None) -> float:
        """One-token steps per second through a span of `blocks` blocks: its compute, or its
        network when that is slower (each step receives and sends `step_bytes`)."""
        compute = 1.0 / (self.step_s * max(1, blocks))
        if bandwidth_bps and step_bytes:
            compute = min(compute, bandwidth_bps / (2 * step_bytes))
        return round(compute, 3)


def _timed(fn, device: torch.device, runs: int) -> float:
    times = []
    for i in range(runs + 2):  # the first two warm caches and allocators up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def speed_key(model_id: str, device: torch.device | str, dtype: torch.dtype | str, quant: str = "none") -> str:
    """Where a measurement is kept in throughput.json: one per model, device, dtype and weight
    quantization (dtype "auto": serve.dtype auto's choice, auto_cpu_dtype)."""
    return f"{model_id}:{device}:{dtype}" + (f":{quant}" if quant != "none" else "")


def _kept(state_dir: str) -> dict:
    """throughput.json's entries: {} when it is missing, unreadable or not a table."""
    try:
        with open(os.path.join(state_dir, "throughput.json")) as f:
            known = json.load(f)
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _keep(state_dir: str, key: str, entry: dict, known: dict | None = None) -> None:
    """`entry` under `key` in state_dir/throughput.json, beside the `known` entries."""
    path = os.path.join(state_dir, "throughput.json")
    with open(path + ".tmp", "w") as f:
        json.dump({**(known or {}), key: entry}, f)
    os.replace(path + ".tmp", path)


def save_speed(state_dir: str, key: str, speed: BlockSpeed, known: dict | None = None) -> None:
    """Keep `speed` under `key` in state_dir/throughput.json (beside the `known` entries)."""
    _keep(state_dir, key, asdict(speed), known)


def _plausible(speed: BlockSpeed) -> bool:
    """A kept measurement that placement can divide by: positive and finite (a hand-edited or
    corrupted step_s of 0 crashed placement)."""
    return all(math.isfinite(x) and x > 0 for x in (speed.step_s, speed.forward_tokens_per_s)) and \
        speed.block_bytes > 0


def measure_block_speed(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, state_dir: str,
                        model_id: str, quant: str = "none") -> BlockSpeed:
    key = speed_key(model_id, device, dtype, quant)
    path = os.path.join(state_dir, "throughput.json")
    known = _kept(state_dir)
    cached = known.get(key)
    if isinstance(cached, dict):
        try:
            speed = BlockSpeed(float(cached["step_s"]), float(cached["forward_tokens_per_s"]),
                               int(cached["block_bytes"]))
        except (ValueError, KeyError, TypeError):
            speed = None
        if speed is not None and _plausible(speed):
            return speed
        log.warning("%s holds an impossible measurement for this model (%s): measuring again", path, cached)
    log.info("measuring one block's speed on %s as %s%s (once; kept in %s)", device, str(dtype)[6:],
             f" with {quant} weights" if quant != "none" else "", path)
    t0 = time.monotonic()
    span = Span(checkpoint, 0, 1, device, dtype, quant=quant).load()
    block_bytes = span.weight_bytes()
    H = span.hidden_size
    with torch.no_grad():
        x1 = torch.zeros(1, 1, H, dtype=dtype, device=device)
        p1 = torch.zeros(1, 1, dtype=torch.long, device=device)
        step_s = _timed(lambda: span.run(x1, p1, None, 0, 1), device, 7)
        xf = torch.randn(1, FORWARD_TOKENS, H, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        pf = torch.arange(FORWARD_TOKENS, device=device)[None]
        forward_s = _timed(lambda: span.run(xf, pf, None, 0, 1), device, 3)
    speed = BlockSpeed(step_s, FORWARD_TOKENS / forward_s, block_bytes)
    log.info("one block: %.2f ms per step, %.0f tokens/s forward, %.1f MiB (measured in %.1f s)",
             step_s * 1000, speed.forward_tokens_per_s, block_bytes / 2**20, time.monotonic() - t0)
    try:
        save_speed(state_dir, key, speed, known)
    except OSError as e:
        log.warning("cannot keep the measured speed in %s: %s", path, e.strerror)
    return speed


# serve.dtype auto on a CPU: bfloat16 is taken where this CPU computes it natively and a block's
# step in bfloat16 takes at most this share of float32's. bfloat16 rounds every output (a relative
# error of ~4e-3 a block, docs/security.md), a price only a clear gain pays: on small models the
# conversions cost more than the halved weights save (docs/benchmarks.md).
AUTO_BF16_SHARE = 0.9
AUTO_ROUNDS = 9  # alternating timings of the two dtypes: load on the machine hits both alike


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware: x86's AVX512-BF16 or AMX, Arm's BF16."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return bool(set(value.split()) & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def auto_cpu_dtype(checkpoint: Checkpoint, state_dir: str, model_id: str, quant: str = "none",
                   native: bool | None = None) -> torch.dtype:
    """serve.dtype auto on a CPU: float32, or bfloat16 where the CPU computes it natively and
    one block's step in it is at most AUTO_BF16_SHARE of float32's, both timed alternately on
    the model's first block. The choice is kept in state_dir/throughput.json beside the speeds
    (a restart does not time again)."""
    if not (native_bf16() if native is None else native):
        return torch.float32
    device = torch.device("cpu")
    key = speed_key(model_id, device, "auto", quant)
    known = _kept(state_dir)
    chosen = known.get(key)
    if isinstance(chosen, dict) and chosen.get("dtype") in ("float32", "bfloat16"):
        return getattr(torch, chosen["dtype"])
    t0 = time.monotonic()
    spans = {dt: Span(checkpoint, 0, 1, device, dt, quant=quant).load() for dt in (torch.float32, torch.bfloat16)}
    pos = torch.zeros(1, 1, dtype=torch.long)
    times: dict[torch.dtype, list[float]] = {dt: [] for dt in spans}
    with torch.no_grad():
        for _ in range(AUTO_ROUNDS):
            for dt, span in spans.items():
                x = torch.zeros(1, 1, span.hidden_size, dtype=dt)
                times[dt].append(_timed(lambda s=span, x=x: s.run(x, pos, None, 0, 1), device, 3))
    f32, bf16 = (sorted(times[dt])[AUTO_ROUNDS // 2] for dt in (torch.float32, torch.bfloat16))
    dtype = torch.bfloat16 if bf16 <= AUTO_BF16_SHARE * f32 else torch.float32
    log.info("serve.dtype auto: %s (one block's step: bfloat16 %.3f ms, float32 %.3f ms; this CPU computes "
             "bfloat16 natively; timed in %.1f s)", str(dtype)[6:], bf16 * 1e3, f32 * 1e3, time.monotonic() - t0)
    try:
        _keep(state_dir, key, {"dtype": str(dtype)[6:], "step_s": {"float32": f32, "bfloat16": bf16}}, known)
    except OSError as e:
        log.warning("cannot keep serve.dtype auto's choice in %s/throughput.json: %s", state_dir, e.strerror)
    return dtype
