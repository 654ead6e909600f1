"""Network emulation for benchmarks and tests: every peer message a daemon sends crosses an
emulated link with a one-way delay and jitter, a bandwidth cap, message loss and connection
drops. Kernel shaping (tc netem) is not available on the machines we measure on; a TCP proxy
could delay and cap bytes but not lose a whole ZeroMQ message (TCP never loses one; a lost
message in a swarm is a request its server never saw, which the gateway must time out and
fail over), so the emulation sits in the transport, on the sending side, where each message is
whole and its size is known.

    SWARMD_NETEM="delay_ms=50,jitter_ms=2,rate_mbit=100,loss=0.01,drop=0.001,seed=7"

applies to every link from the daemon that has it in its environment (each destination is a
link of its own: its own queue behind the bandwidth cap). Unset, nothing is added to the hot
path but one attribute test. SWARMD_NET_DELAY_MS=D is the same as SWARMD_NETEM="delay_ms=D".

The model, per message of n bytes sent at time t on a link:
- it starts to leave when the link is free (messages queue behind each other) and takes
  n * 8 / rate to serialise;
- it arrives `delay` (+/- uniform `jitter`) after it has left, never before the message sent
  before it on the same link (TCP keeps order);
- with probability `loss` it never arrives; with probability `drop` the connection is cut
  after it (every request waiting on that connection fails, as when a route breaks).
The sending thread waits until the arrival time before handing the message to ZeroMQ: one
message in flight per sending thread, which is what a chain of decode steps does.

    SWARMD_NETEM="jitter_ms=1,places=/path/places.json"

gives each link its own one-way delay from where its two ends are (instead of `delay_ms`):
the file maps node ids to places, {"places": {NODE_ID: {"name": ..., "lat": ..., "lon": ...}}},
and a daemon's own place is that of its node id (`locate`, at start). The delay between two
places is LAST_MILE_MS plus the great-circle distance, inflated by ROUTE_INFLATION for the
paths cables take, at the speed of light in fibre (FIBRE_KM_PER_MS). A link to a node the file
does not name has `delay_ms`."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import random
import threading
import time

from libswarm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LinkProfile:
    delay_s: float = 0.0
    jitter_s: float = 0.0
    rate_bps: float = 0.0  # bits per second; 0: no cap
    loss: float = 0.0  # probability that a message never arrives
    drop: float = 0.0  # probability that the connection is cut after a message
    seed: int | None = None
    places: str = ""  # a file of node ids' places: each link's delay from its two ends

    @property
    def active(self) -> bool:
        return bool(self.delay_s or self.jitter_s or self.rate_bps or self.loss or self.drop or self.places)


_KEYS: dict[str, tuple[str, float | str | None]] = {
    "delay_ms": ("delay_s", 1e-3), "jitter_ms": ("jitter_s", 1e-3), "rate_mbit": ("rate_bps", 1e6),
    "loss": ("loss", 1.0), "drop": ("drop", 1.0), "seed": ("seed", None), "places": ("places", "")}

# The geographic model (see the module's text): light in fibre covers ~200 km a millisecond
# (refractive index ~1.47); cables and routing make paths longer than the great circle (x1.3 fits
# the round trips transatlantic and transcontinental links are published with, ~70-75 ms
# London-New York); each end adds a last mile.
FIBRE_KM_PER_MS = 200.0
ROUTE_INFLATION = 1.3
LAST_MILE_MS = 1.0
EARTH_RADIUS_KM = 6371.0


def parse_profile(spec: str) -> LinkProfile:
    """"delay_ms=50,jitter_ms=2,rate_mbit=100,loss=0.01,drop=0.001,seed=7" -> LinkProfile."""
    values: dict = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, raw = item.partition("=")
        if key not in _KEYS:
            raise ConfigError(f"SWARMD_NETEM: unknown setting {key!r} (known: {', '.join(_KEYS)})")
        field, scale = _KEYS[key]
        if isinstance(scale, str):  # a path
            values[field] = raw
            places_of(raw)  # a file that cannot be read fails at start, in one line
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"SWARMD_NETEM: {key} must be a number, got {raw!r}") from None
        if value < 0 or value != value or (key in ("loss", "drop") and value > 1):
            raise ConfigError(f"SWARMD_NETEM: {key} out of range: {raw}")
        values[field] = int(value) if scale is None else value * scale
    return LinkProfile(**values)


def profile_from_env(env=os.environ) -> LinkProfile | None:
    spec = env.get("SWARMD_NETEM", "")
    delay = env.get("SWARMD_NET_DELAY_MS", "")
    if delay and not spec:
        spec = f"delay_ms={delay}"
    profile = parse_profile(spec) if spec else None
    return profile if profile is not None and profile.active else None


@functools.cache
def process_profile() -> LinkProfile | None:
    """This process's emulated link, read once from its environment."""
    return profile_from_env()


@functools.cache
def places_of(path: str) -> dict[str, tuple[float, float]]:
    """Node id -> (latitude, longitude) from a places file (read once)."""
    try:
        with open(path) as f:
            raw = json.load(f)["places"]
        return {node: (float(p["lat"]), float(p["lon"])) for node, p in raw.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"SWARMD_NETEM: places file {path!r} unreadable: {e}") from None


def one_way_s(a: tuple[float, float], b: tuple[float, float]) -> float:
    """The model's one-way delay between two places (latitude, longitude in degrees)."""
    la1, lo1, la2, lo2 = map(math.radians, (*a, *b))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    km = 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
    return (LAST_MILE_MS + km * ROUTE_INFLATION / FIBRE_KM_PER_MS) / 1000


_own_id = [""]


def locate(node_id: str) -> None:
    """This process's node id, whose place a places file gives (the daemon calls it at start)."""
    _own_id[0] = node_id


_seeds = random.Random()
_seed_lock = threading.Lock()
_count = itertools.count()


class Link:
    """One direction to one peer. Not thread-safe: each sending thread has its own links (as it
    has its own ZeroMQ sockets); a ROUTER's replies are sent by the serving thread alone."""

    def __init__(self, profile: LinkProfile, peer: str | None = None):
        """`peer`: the node id at the other end (with a places file, the delay is theirs)."""
        self.profile = profile
        self.delay_s = profile.delay_s
        if profile.places and peer is not None:
            places = places_of(profile.places)
            here, there = places.get(_own_id[0]), places.get(peer)
            if here is not None and there is not None:
                self.delay_s = one_way_s(here, there)
        with _seed_lock:  # with a seed, the links of a daemon differ and a run repeats
            seed = _seeds.randrange(1 << 62) if profile.seed is None else profile.seed * 1_000_003 + next(_count)
        self.rng = random.Random(seed)
        self.free_at = 0.0  # when the link has finished serialising what was queued
        self.last_arrival = 0.0
        self.sent = self.lost = self.dropped = 0

    def admit(self, nbytes: int) -> tuple[float | None, bool]:
        """(seconds to wait before handing the message over, or None when it is lost; whether
        to cut the connection after it)."""
        p, now = self.profile, time.monotonic()
        start = max(now, self.free_at)
        left = start + (nbytes * 8 / p.rate_bps if p.rate_bps else 0.0)
        self.free_at = left
        arrival = left + self.delay_s + (self.rng.uniform(-p.jitter_s, p.jitter_s) if p.jitter_s else 0.0)
        arrival = max(arrival, self.last_arrival, left)
        self.last_arrival = arrival
        self.sent += 1
        cut = bool(p.drop) and self.rng.random() < p.drop
        self.dropped += cut
        if p.loss and self.rng.random() < p.loss:
            self.lost += 1
            return None, cut
        return arrival - now, cut


def frames_size(frames) -> int:
    """Bytes in a multipart message (bytes, memoryviews of tensors, zmq frames)."""
    return sum(getattr(f, "nbytes", None) or len(f) for f in frames)
