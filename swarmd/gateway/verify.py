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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from libswarm.errors import RemoteError, WrongOutputError

log = logging.getLogger("swarmd.gateway")

VERIFY_MODES = ("off", "sample", "strict")
DEFAULT_VERIFY_PROBABILITY = 0.05

# |a - b| <= tol * (|b| + rms(row of b)), element by element. Measured (swarm/docs/security.md):
# a one-token decode against a prefill of the same positions differs by 1e-5 of that in
# float32, and by up to 0.1 in bfloat16 (0.3 between a bfloat16 and a float32 server over
# SmolLM2's 30 blocks): the tolerances leave a margin of 100x and 3x. A lie smaller than its
# tolerance goes unseen, and changes the output by no more than honest 16-bit arithmetic does.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1.0, torch.bfloat16: 1.0}
# Servers with quantized weights or KV caches (serve.quant, serve.cache.kv_dtype) are only ever
# compared with servers of the same quantization: against the full-precision model they differ
# by the quantization error itself (nf4 weights: 20 % of the output's norm over 10 of SmolLM2's
# blocks), which no tolerance separates from a lie. Between two of them, the int8 rounding of a
# value that one server's arithmetic puts on the other side of a step changes it by a step (at
# most 1/127 of its vector's largest value), which later blocks carry on: hence 0.1, not 1e-3.
TOLERANCE_QUANTIZED = 0.1

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


def tolerance(*dtypes: torch.dtype, quantized: bool = False) -> float:
    """The coarsest tolerance among the dtypes that took part (and of quantized servers, when
    they were)."""
    return max([TOLERANCE.get(d, 1.0) for d in dtypes] + ([TOLERANCE_QUANTIZED] if quantized else []))


def disagreement(a: torch.Tensor, b: torch.Tensor, tol: float) -> str | None:
    """Why `a` is not `b` within `tol` (None: they agree). Both [B, T, H]."""
    if a.shape != b.shape:
        return f"shapes {list(a.shape)} and {list(b.shape)}"
    a, b = a.float(), b.float()
    rms = b.pow(2).mean(-1, keepdim=True).sqrt()
    excess = (a - b).abs() - tol * (b.abs() + rms)
    if not bool((excess > 0).any()):
        return None
    i = int(excess.flatten().argmax())
    H, T = b.shape[-1], b.shape[-2]
    row, pos, el = i // (T * H), (i // H) % T, i % H
    return (f"row {row}, position {pos}, element {el}: {a[row, pos, el].item():.6g} vs {b[row, pos, el].item():.6g} "
            f"(tolerance {tol:g} of |value| + row rms {rms[row, pos, 0].item():.4g})")


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


class PushLinks:
    """Which servers the gateway lets push their outputs to the next hop of a route: not one
    whose push was disputed lately (`suspect`), and not to one that does not say what it ran
    on (`blind`: a server older than protocol 1.5), since then a push could not be vouched for."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._suspects: dict[str, tuple[float, str]] = {}  # address -> (until, why)
        self._blind: dict[str, None] = {}
        self._lock = threading.Lock()

    def suspect(self, address: str, why: str) -> None:
        log.warning("server %s: %s; its outputs go to the next hop through this gateway for %.0f s", address, why,
                    PUSH_SUSPECT_S)
        with self._lock:
            self._suspects.pop(address, None)
            self._suspects[address] = (self._clock() + PUSH_SUSPECT_S, why)
            while len(self._suspects) > MAX_PUSH_ENTRIES:
                del self._suspects[next(iter(self._suspects))]

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
