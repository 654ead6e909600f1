"""What the gateway believes of a server's outputs: every reply checked for shape, dtype,
finiteness and a norm within what servers agreed on at that block (always, cheap), outputs
of two servers for the same input compared within a tolerance of their dtypes, and the
servers caught lying distrusted (docs/security.md).

A server is distrusted on evidence only: a reply that no honest computation gives (non-finite,
the wrong shape), or an output that a second server contradicts and a third one confirms the
second. A norm far outside the band is only implausible: it calls for that second opinion.
Distrust lasts an hour, doubling with each further offence up to a week; it is not a score
that a server could earn back by answering well for a while between lies."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from libswarm.errors import RemoteError, WrongOutputError

log = logging.getLogger("swarmd.gateway")

VERIFY_MODES = ("off", "sample", "strict")
DEFAULT_VERIFY_PROBABILITY = 0.05

# How far two honest servers' outputs for one input may differ, per position, in two measures
# (`errors`): `row`, the norm of the difference over the smaller of the two outputs' (how far the
# whole vector moved), and `element`, the largest |a - b| over |b| + that (how far its worst
# element moved: a lie hidden in a few elements moves the row little).
# Measured by tools/measure_tolerance.py on SmolLM2-135M (docs/security.md has the table), every
# numerics a server can announce against the exact output (float32, unquantized) and against its
# own kind, as the gateway compares them: the server's steps (a prefill, then one position a step,
# with its KV cache) against a checker's replay of every position in one prefill, from the same
# input; the worst of three prompts, every position, spans of 1, 4, 10 and 30 blocks at the start,
# middle and end of the model. Errors of (row, element) at those lengths, by source:
MEASURED_LENGTHS = (1, 4, 10, 30)
MEASURED = {
    # the dtype's rounding (float32: the prefill against the steps, the floor of every pair)
    "float32": ((6.7e-07, 2.6e-06), (4.3e-06, 1.2e-05), (1.8e-06, 7.4e-06), (3.8e-06, 1.2e-05)),
    "bfloat16": ((0.011, 0.074), (0.11, 0.26), (0.04, 0.15), (0.068, 0.43)),
    "float16": ((0.0014, 0.0077), (0.0075, 0.02), (0.005, 0.016), (0.0083, 0.022)),
    # weights' quantization and the int8 KV cache, against the exact output. int8 is the larger of
    # LLM.int8() (a GPU's, through bitsandbytes; measured on a CPU) and the CPU's packed int8 (0.02
    # to 0.09 a row): both announce int8. int4 (CPU only) was measured in groups of 64, which on
    # SmolLM2 (from a Q4_1 GGUF, on int4's grid in groups of 32) measure what int4 does to
    # weights off its grid: in groups of 32 it gives those weights back exactly.
    "int8": ((0.068, 0.3), (0.37, 0.98), (0.13, 0.39), (0.28, 0.87)),
    "int4": ((0.13, 0.64), (0.85, 2.2), (0.35, 2.1), (1.0, 4.2)),
    "nf4": ((0.15, 0.67), (0.52, 1.3), (0.39, 1.8), (1.3, 15)),
    "int8 KV": ((0.012, 0.046), (0.088, 0.23), (0.029, 0.091), (0.076, 0.24)),
    # two servers of one quantization, of one dtype (`=`: nf4 dequantizes the same weights on both
    # sides; LLM.int8() quantizes activations per batch, so a prefill and steps round otherwise) and
    # of two (`~`: each quantized the checkpoint rounded to its dtype)
    "int8=int8": ((0.032, 0.085), (0.35, 1.6), (0.09, 0.37), (0.23, 0.98)),
    "int4=int4": ((0.0053, 0.036), (0.014, 0.042), (0.022, 0.19), (0.036, 0.13)),
    "nf4=nf4": ((0.0063, 0.03), (0.014, 0.043), (0.023, 0.16), (0.032, 0.14)),
    "int8 KV=int8 KV": ((0.0031, 0.014), (0.03, 0.077), (0.028, 0.093), (0.046, 0.2)),
    "int8~int8": ((0.061, 0.24), (0.63, 2.8), (0.19, 0.86), (0.38, 2.7)),
    "int4~int4": ((0.025, 0.35), (0.16, 0.66), (0.13, 0.9), (0.2, 0.96)),
    "nf4~nf4": ((0.026, 0.31), (0.043, 0.25), (0.069, 0.67), (0.2, 1.1)),
    "int8 KV~int8 KV": ((0.013, 0.14), (0.15, 0.39), (0.04, 0.14), (0.14, 0.34)),
}
# Not monotonic in the length (a 4-block span in the middle holds the worst positions): a span
# of n blocks is allowed the worst error of any measured length up to the first one >= n, and
# beyond 30 blocks that grown by sqrt(n / 30) (rounding errors add up like a random walk).
# Float32 servers on other hardware (another BLAS, a GPU) round differently than these CPU runs:
# their floor is set at 1e-4 of a row and 1e-3 of an element (as before), not the 4e-6 measured.
FLOAT32_FLOOR = (1e-4, 1e-3)
# The tolerance is TOLERANCE_MARGIN times the sum of the errors of what differs between the two
# servers: 3x leaves room for prompts and models unlike the measured ones (tools/measure_tolerance.py
# shows every pair within it), and a lie of twice the tolerance is caught (tests/unit/test_verify_parts.py).
TOLERANCE_MARGIN = 3.0


def measured_error(source: str, blocks: int) -> tuple[float, float]:
    """The worst honest error (row, element) of `source` over a span of `blocks` blocks."""
    table = MEASURED[source]
    upto = next((i for i, n in enumerate(MEASURED_LENGTHS) if n >= blocks), len(MEASURED_LENGTHS) - 1)
    grow = max(1.0, blocks / MEASURED_LENGTHS[-1]) ** 0.5
    return max(r for r, _ in table[:upto + 1]) * grow, max(e for _, e in table[:upto + 1]) * grow


@dataclass(frozen=True)
class Numerics:
    """How a server computes: its dtype (of its outputs), weights' quantization and KV cache."""

    dtype: str = "float32"
    quant: str = "none"
    kv_dtype: str = "auto"

    def __str__(self) -> str:
        return "+".join([self.dtype] + ([f"{self.quant} weights"] if self.quant != "none" else [])
                        + (["int8 KV"] if self.kv_dtype == "int8" else []))

    def sources(self) -> list[str]:
        return [self.dtype if self.dtype in MEASURED else "bfloat16"] + \
            ([self.quant] if self.quant != "none" else []) + (["int8 KV"] if self.kv_dtype == "int8" else [])

    def error(self, blocks: int) -> tuple[float, float]:
        """Its worst honest error (row, element) against the exact output over `blocks` blocks."""
        parts = [measured_error(s, blocks) for s in self.sources()]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)


@dataclass(frozen=True)
class Tolerance:
    row: float
    element: float


def pair_tolerance(a: Numerics, b: Numerics, blocks: int) -> Tolerance:
    """What two honest servers of numerics `a` and `b` may differ by over `blocks` blocks: the
    sum of the errors of every source of error on either side (each side's dtype; weights and KV
    cache of different kinds each add both sides' error, of one kind their error between
    themselves), times the margin."""
    sources = [a.sources()[0], b.sources()[0]]  # their dtypes
    for x, y, none, kind in ((a.quant, b.quant, "none", "{}"), (a.kv_dtype, b.kv_dtype, "auto", "{} KV")):
        if x != y:
            sources += [kind.format(v) for v in (x, y) if v != none]
        elif x != none:  # of one kind: their error between themselves
            alike = "=" if a.dtype == b.dtype else "~"
            sources.append(f"{kind.format(x)}{alike}{kind.format(x)}")
    parts = [measured_error(s, blocks) for s in sources]
    row = max(FLOAT32_FLOOR[0], sum(p[0] for p in parts))
    element = max(FLOAT32_FLOOR[1], sum(p[1] for p in parts))
    return Tolerance(TOLERANCE_MARGIN * row, TOLERANCE_MARGIN * element)


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of [B, T, H] outputs `a` and `b`: the row error rms(a - b) / m and the element
    error max |a - b| / (|b| + m), each [B, T], where m is the smaller of the two rows' rms.
    The smaller, not the reference's: either side may be the liar (the server checked or its
    checker), and a lie that shrinks a row (zeros, say) must move it as far as one that grows it:
    relative to the liar's own large norm, a lie of scale s moves a row by only s / (1 + s), under
    1 however large, and relative to the honest norm, zeros move it by exactly 1, both within the
    tolerance of the coarsest quantizations (verify.py's int8 pairs allow over 1)."""
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    rms = torch.minimum(a.pow(2).mean(-1), b.pow(2).mean(-1)).sqrt()
    row = diff.pow(2).mean(-1).sqrt() / (rms + TINY_RMS)
    element = (diff / (b.abs() + rms.unsqueeze(-1) + TINY_RMS)).amax(-1)
    return row, element


# The band of a span's growth: per position, the norm (root mean square over the hidden size)
# of its output over that of its input. Learned per span [first, last) only from outputs that a
# second server confirmed (a cross-check that passed, or the side a third server sided with):
# learned from every accepted reply, a liar's first replies (zeros, say) would set it, and every
# honest output would then fall outside it. Enforced once it has seen BAND_MIN_ROWS positions: a
# reply growing a position more than BAND_FACTOR times the most seen there is implausible; before
# that, only ABSOLUTE_MAX_RMS holds. Implausible is not wrong: it sends the reply to a second
# server at once (gateway.py), and only what that check finds can distrust anyone.
# Relative to the input, because an app's inputs set the scale (zeros in, small norms out),
# and upper only: small outputs may be honest (padding), and a lie of small values is for
# the cross-checks to see.
BAND_MIN_ROWS = 8
BAND_FACTOR = 16.0
ABSOLUTE_MAX_RMS = 1e5
TINY_RMS = 1e-6  # keeps a zero input's growth finite (and large: such a row widens the band)

DISTRUST_S = 3600.0
DISTRUST_MAX_S = 7 * 86400.0
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def disagreement(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> str | None:
    """Why `a` is not `b` within `tol` (None: they agree). Both [B, T, H]."""
    if a.shape != b.shape:
        return f"shapes {list(a.shape)} and {list(b.shape)}"
    row, element = errors(a, b)
    for name, err, bound in (("moved by", row, tol.row), ("an element moved by", element, tol.element)):
        if bool((err > bound).any()):
            i = int(err.flatten().argmax())
            r, pos = divmod(i, err.shape[1])
            return (f"row {r}, position {pos}: {name} {float(err.flatten()[i]):.3g} of its norm "
                    f"(at most {bound:.3g} between honest servers)")
    return None


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean(-1).sqrt()


class NormBands:
    """Per span, the largest growth of a position's norm that accepted replies had."""

    def __init__(self):
        self._bands: dict[tuple[int, int], tuple[float, int]] = {}  # span -> (highest growth, rows seen)
        self._lock = threading.Lock()

    def check(self, span: tuple[int, int], x: torch.Tensor, out: torch.Tensor) -> str | None:
        out_rms = _rms(out)
        if float(out_rms.max()) > ABSOLUTE_MAX_RMS:
            return f"a position's norm of {float(out_rms.max()):.4g} (no block output is beyond {ABSOLUTE_MAX_RMS:g})"
        growth = float((out_rms / (_rms(x) + TINY_RMS)).max())
        with self._lock:
            highest, rows = self._bands.get(span, (0.0, 0))
        if rows >= BAND_MIN_ROWS and growth > highest * BAND_FACTOR:
            return (f"a position's norm grown {growth:.4g}x over blocks {span[0]}:{span[1]}, outside the band of the "
                    f"swarm's outputs (at most {highest * BAND_FACTOR:.4g}x: {BAND_FACTOR:g} times the most seen)")
        return None

    def learn(self, span: tuple[int, int], x: torch.Tensor, out: torch.Tensor) -> None:
        growth = _rms(out) / (_rms(x) + TINY_RMS)
        with self._lock:
            highest, rows = self._bands.get(span, (0.0, 0))
            self._bands[span] = (max(highest, float(growth.max())), rows + growth.numel())


class ImplausibleOutput(RemoteError):
    """A reply outside the norm band (or the absolute bound): not proof of a lie, a reason to
    ask a second server at once. Elsewhere than a session's step (a replay, a shadow, a forward
    pass) the server is routed around like a failed one (banned for a while, not distrusted)."""

    def __init__(self, message: str, output: torch.Tensor | None = None):
        super().__init__(message)
        self.output = output


def check_output(x: torch.Tensor, out: torch.Tensor, span: tuple[int, int], bands: NormBands | None) -> None:
    """A reply's hidden states `out` for the input `x`, checked before anything uses them;
    raises WrongOutputError for what no honest server returns (a non-float dtype, another
    shape, NaN or infinity), ImplausibleOutput for a norm outside the band."""
    if out.dtype not in FLOAT_DTYPES:
        raise WrongOutputError(f"output of dtype {str(out.dtype)[6:]}, not a floating point dtype served here")
    if out.shape != x.shape:
        raise WrongOutputError(f"output of shape {list(out.shape)}, expected {list(x.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise WrongOutputError("output holds NaN or infinite values")
    why = bands.check(span, x, out) if bands is not None else None
    if why is not None:
        raise ImplausibleOutput(why, out)


def check_gradient(grad: torch.Tensor, shape: tuple[int, ...]) -> None:
    """A backward reply's gradient: the input's shape, a float dtype, finite (its size has no
    band: a gradient's scale is the app's loss's)."""
    if grad.dtype not in FLOAT_DTYPES or tuple(grad.shape) != tuple(shape):
        raise WrongOutputError(f"gradient of {str(grad.dtype)[6:]} {list(grad.shape)}, expected {list(shape)}")
    if not bool(torch.isfinite(grad).all()):
        raise WrongOutputError("gradient holds NaN or infinite values")


# A server whose push the next hop says differed from what it returned to the gateway is not
# asked to push for this long: the gateway hands its outputs over itself (a network hop more per
# step through it). Neither server is distrusted: the gateway cannot tell which of the two lied
# (a hostile next hop could say so of an honest pusher), and with every input handed over by
# the gateway a lying pusher gains nothing, while a lying next hop is judged on its outputs.
PUSH_SUSPECT_S = 3600.0
MAX_PUSH_ENTRIES = 4096  # addresses remembered (the oldest forgotten first)
# A push that did not come (its step was answered once resent with its input) may be a lost
# message as well as a pusher that lies about pushing: a pusher is suspected once PUSH_MISSES of
# the last PUSH_WINDOW pushes it was to make went missing. A hostile one so costs its routes at
# most that share of steps waiting a resend; an honest one on a lossy link keeps pushing.
PUSH_WINDOW = 20
PUSH_MISSES = 4


class PushLinks:
    """Which servers the gateway lets push their outputs to the next hop of a route: not one
    whose push was disputed lately (`suspect`), and not to one that does not say what it ran
    on (`blind`: a server older than protocol 1.5), since then a push could not be vouched for."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._suspects: dict[str, tuple[float, str]] = {}  # address -> (until, why)
        self._blind: dict[str, None] = {}
        self._outcomes: dict[str, deque[bool]] = {}  # pusher -> its last pushes: came or not
        self._lock = threading.Lock()

    def suspect(self, address: str, why: str) -> None:
        log.warning("server %s: %s; its outputs go to the next hop through this gateway for %.0f s", address, why,
                    PUSH_SUSPECT_S)
        with self._lock:
            self._suspects.pop(address, None)
            self._suspects[address] = (self._clock() + PUSH_SUSPECT_S, why)
            while len(self._suspects) > MAX_PUSH_ENTRIES:
                del self._suspects[next(iter(self._suspects))]

    def delivered(self, pusher: str) -> None:
        """A push the gateway waited for came."""
        with self._lock:
            self._outcome(pusher).append(True)

    def missed(self, pusher: str, why: str) -> None:
        """A push the gateway waited for did not come in time: suspected when too many did not."""
        with self._lock:
            outcomes = self._outcome(pusher)
            outcomes.append(False)
            misses = outcomes.count(False)
            if misses >= PUSH_MISSES:
                outcomes.clear()
        if misses >= PUSH_MISSES:
            self.suspect(pusher, f"{why} ({misses} of its last {PUSH_WINDOW} pushes did not come)")
        else:
            log.info("server %s: %s (a lost message, or a push not made)", pusher, why)

    def _outcome(self, pusher: str) -> deque[bool]:
        outcomes = self._outcomes.get(pusher)
        if outcomes is None:
            outcomes = self._outcomes[pusher] = deque(maxlen=PUSH_WINDOW)
            while len(self._outcomes) > MAX_PUSH_ENTRIES:
                del self._outcomes[next(iter(self._outcomes))]
        return outcomes

    def blind(self, address: str) -> None:
        with self._lock:
            self._blind[address] = None
            while len(self._blind) > MAX_PUSH_ENTRIES:
                del self._blind[next(iter(self._blind))]

    def allowed(self, pusher: str, receiver: str) -> bool:
        with self._lock:
            suspect = self._suspects.get(pusher)
            return (suspect is None or suspect[0] <= self._clock()) and receiver not in self._blind

    def to_json(self) -> list[dict]:
        now = self._clock()
        with self._lock:
            return [{"address": a, "for_s": round(until - now, 1), "reason": why}
                    for a, (until, why) in self._suspects.items() if until > now]


@dataclass
class Standing:
    """One server as this gateway has found it."""

    address: str
    passed: int = 0  # cross-checks its outputs passed
    failed: int = 0  # offences: checks it failed, impossible replies
    distrusted_until: float = 0.0  # time.time()
    reason: str = ""
    evidence: list[str] = field(default_factory=list)


class Reputation:
    """Per node key: checks passed and offences. A distrusted node is set so in the peer table
    (state `distrusted`), which routing and placement skip."""

    def __init__(self, key_of: Callable[[str], str | None], distrust: Callable[[str, str, float], None],
                 clock: Callable[[], float] = time.time):
        self.key_of, self._distrust, self._clock = key_of, distrust, clock
        self._standing: dict[str, Standing] = {}
        self._lock = threading.Lock()

    def _get(self, address: str) -> Standing:
        key = self.key_of(address) or address
        s = self._standing.get(key)
        if s is None:
            if len(self._standing) > 100_000:  # bounded: forget those without offences first
                for k in [k for k, v in self._standing.items() if not v.failed][:50_000]:
                    del self._standing[k]
            s = self._standing[key] = Standing(address)
        s.address = address
        return s

    def passed(self, address: str) -> None:
        with self._lock:
            self._get(address).passed += 1

    def offence(self, address: str, reason: str) -> float:
        """Evidence that the server at `address` computed wrong outputs: distrust it. Returns
        for how long."""
        key = self.key_of(address)
        with self._lock:
            s = self._get(address)
            s.failed += 1
            seconds = min(DISTRUST_MAX_S, DISTRUST_S * 2.0 ** min(s.failed - 1, 20))
            s.distrusted_until = self._clock() + seconds
            s.reason = reason
            s.evidence = (s.evidence + [f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {reason}"])[-5:]
        log.warning("server %s (%s) returned wrong outputs: %s; distrusted for %.0f s", address,
                    key[:8] if key else "key unknown", reason, seconds)
        if key is not None:
            self._distrust(key, reason, seconds)
        return seconds

    def is_distrusted(self, address: str) -> bool:
        with self._lock:
            key = self.key_of(address) or address
            s = self._standing.get(key)
            return s is not None and s.distrusted_until > self._clock()

    def to_json(self) -> list[dict]:
        now = self._clock()
        with self._lock:
            return [{"node_id": k, "address": s.address, "checks_passed": s.passed, "offences": s.failed,
                     "distrusted_s": round(max(0.0, s.distrusted_until - now), 1), "reason": s.reason,
                     "evidence": list(s.evidence)}
                    for k, s in self._standing.items() if s.failed or s.passed]
