"""swarmd.yaml -> frozen dataclasses, validated, with errors that name the file and the key.

etc/swarmd.yaml documents every key with its default; DEFAULTS below is the same document
as data, and a test keeps the two in step."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from libswarm.api.config import API_DEFAULTS, ApiSettings, host_port, parse_api, read_config_file
from libswarm.errors import ConfigError
from libswarm.models import model_from_config
from swarmd.identity import is_key

DEFAULTS: dict[str, Any] = {
    "model": None,
    "model_id": None,
    "serve": {
        "blocks": "auto",
        "num_blocks": "auto",
        "device": "auto",
        "dtype": "auto",
        "quant": "none",
        "max_length": 8192,
        "max_batch": 64,
        "batch_window_ms": "auto",
        "cuda_graphs": True,
        "session_idle_timeout_s": 600,
        "rebalance_interval_s": 60,
        "drain_timeout_s": 300,
        "stall_timeout_s": 300,
        "threads": "auto",
        "adapters": {},
        "cache": {"max_bytes": "auto", "kv_dtype": "auto"},
        "limits": {"sessions_per_key": 1024, "cache_share_per_key": 0.5, "unused_session_timeout_s": 30,
                   "requests_per_s_per_key": 5000, "queued_per_key": 64, "queued_bytes_per_key": "4GiB"},
    },
    "network": {
        "listen": "tcp://0.0.0.0:31330",
        "announce": [],
        "socket": "/run/swarmd/swarmd.sock",
        "operator_group": "swarmd-admin",
        "max_message_bytes": "1GiB",
        "relay": False,
        "relay_max_bytes_per_s": "50MB",
        "relay_max_servers": 16,
    },
    "discovery": {
        "mdns": True,
        "mdns_interfaces": "all",
        "seeds": "/etc/swarmd/seeds.yaml",
    },
    "swarm": {"access": "open", "allowed_keys_dir": "/etc/swarmd/peers.d", "verify": "sample",
              "verify_probability": 0.05, "quantized": "use"},
    "metrics": {"listen": None},
    "api": dict(API_DEFAULTS),  # read by swarm-api (libswarm/api); checked here too
    "state_dir": "/var/lib/swarmd",
    "log_level": "info",
}

QUANTIZED_POLICIES = ("use", "avoid", "refuse")
QUANT_MODES = ("none", "int8", "int4", "nf4")  # serve.quant, and a record's quant
KV_DTYPES = ("auto", "int8")  # serve.cache.kv_dtype, and a record's kv_dtype
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_ENDPOINT_RE = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+|\*):(\d{1,5})$")


def is_endpoint(value: object, wildcard: bool = False) -> bool:
    """Whether `value` is a tcp://host:port ZeroMQ can connect to (or, with `wildcard`, bind):
    a host name, IPv4 or [IPv6] address, and a port in 1..65535 (0 too for a bind)."""
    if not isinstance(value, str) or len(value) > 255:
        return False
    m = _ENDPOINT_RE.match(value)
    if m is None or (m.group(1) == "*" and not wildcard):
        return False
    return (0 if wildcard else 1) <= int(m.group(2)) < 65536


@dataclass(frozen=True)
class CacheConfig:
    max_bytes: int | None  # None = auto
    kv_dtype: str


@dataclass(frozen=True)
class LimitsConfig:
    """What one peer key may hold or ask of this server (docs/protocol.md, Limits)."""

    sessions_per_key: int
    cache_share_per_key: float  # of the KV cache budget
    requests_per_s_per_key: int
    queued_per_key: int = 64  # requests waiting for the compute thread
    queued_bytes_per_key: int = 4 << 30  # their tensors
    # a session that has held no position this long after it opened is closed: `open`s alone
    # hold no cache (a gateway steps at once after opening; one that waits reopens by replay)
    unused_session_timeout_s: float = 30.0


@dataclass(frozen=True)
class ServeConfig:
    blocks: tuple[int, int] | str  # (start, end), "auto" or "none"
    num_blocks: int | None
    device: str
    dtype: str
    quant: str
    max_length: int
    max_batch: int
    session_idle_timeout_s: float
    rebalance_interval_s: float
    drain_timeout_s: float
    stall_timeout_s: float
    threads: int | None  # torch's compute threads on CPU; None: torch's default (one per core)
    adapters: tuple[tuple[str, str], ...]  # (name, PEFT adapter directory)
    cache: CacheConfig
    limits: LimitsConfig
    batch_window_s: float | None = None  # decode steps of several sessions wait this long to run together; None: auto
    cuda_graphs: bool = True  # on CUDA, sessions' one-position steps replayed as CUDA graphs


@dataclass(frozen=True)
class NetworkConfig:
    listen: str
    announce: tuple[str, ...]
    socket: str
    max_message_bytes: int
    relay: bool = False  # relay for servers that accept no connections (docs/operations.md, Ports)
    relay_max_bytes_per_s: int = 50_000_000  # all that it forwards, both ways
    relay_max_servers: int = 16  # servers it relays for at once
    # besides root and the daemon's own user, who may drain and rebalance over the socket (None: nobody)
    operator_group: str | None = "swarmd-admin"


@dataclass(frozen=True)
class Seed:
    address: str
    key: str | None = None


@dataclass(frozen=True)
class DiscoveryConfig:
    mdns: bool
    mdns_interfaces: tuple[str, ...] | str
    seeds: tuple[Seed, ...]
    seeds_file: str | None


@dataclass(frozen=True)
class SwarmConfig:
    access: str
    allowed_keys_dir: str
    verify: str = "sample"  # off / sample / strict: how the gateway checks servers' outputs (docs/security.md)
    verify_probability: float = 0.05  # with sample: the chance that a step has one span checked elsewhere
    quantized: str = "use"  # use / avoid / refuse: routes through servers with quantized weights or KV caches


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None  # (host, port), or None: off


@dataclass(frozen=True)
class Config:
    path: str
    model: str
    model_id: str | None
    serve: ServeConfig
    network: NetworkConfig
    discovery: DiscoveryConfig
    swarm: SwarmConfig
    metrics: MetricsConfig
    api: ApiSettings
    state_dir: str
    log_level: str


class _Reader:
    """Walks the YAML document, checking keys and types, and names `file: key` in every error."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")

    def merge(self, data: Any, defaults: dict, prefix: str = "") -> dict:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.fail(prefix.rstrip(".") or "(top level)", "must be a mapping")
        out = {}
        for key in data:
            if key not in defaults:
                raise self.fail(f"{prefix}{key}", f"unknown key (known: {', '.join(defaults)})")
        for key, default in defaults.items():
            value = data.get(key, default)
            if isinstance(default, dict) and default:  # a section; an empty default is a free mapping
                out[key] = self.merge(data.get(key), default, f"{prefix}{key}.")
            else:
                out[key] = value
        return out

    def choice(self, key: str, value: Any, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def positive_int(self, key: str, value: Any, allow_auto: bool = False) -> int | None:
        if allow_auto and value == "auto":
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.fail(key, f"must be a positive integer{' or auto' if allow_auto else ''}, got {value!r}")
        return value

    def fraction(self, key: str, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
            raise self.fail(key, f"must be a number in (0, 1], got {value!r}")
        return float(value)

    def size(self, key: str, value: Any, allow_auto: bool = False) -> int | None:
        if allow_auto and value == "auto":
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        m = _SIZE_RE.match(str(value)) if isinstance(value, str) else None
        if not m:
            raise self.fail(key, f"must be a size like 8GiB or 500MB{' or auto' if allow_auto else ''}, got {value!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
        if n <= 0:
            raise self.fail(key, "must be greater than zero")
        return n

    def endpoint(self, key: str, value: Any) -> str:
        if not is_endpoint(value, wildcard=True):
            raise self.fail(key, f"must be an address like tcp://0.0.0.0:31330, got {value!r}")
        return value

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value


def _window(r, value: Any) -> float | None:
    """serve.batch_window_ms: auto (None), or milliseconds in 0..1000 (0: no batching)."""
    if value == "auto":
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1000:
        raise r.fail("serve.batch_window_ms", f"must be auto or milliseconds in 0..1000, got {value!r}")
    return value / 1000


def parse_blocks(r: _Reader, value: Any) -> tuple[int, int] | str:
    if value in ("auto", "none") or value is None:
        return "none" if value is None else value
    m = re.match(r"^\s*(\d+)\s*:\s*(\d+)\s*$", str(value))
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise r.fail("serve.blocks", f'must be auto, none or "START:END" with START < END, got {value!r}')
    return int(m.group(1)), int(m.group(2))


def parse_seeds(r: _Reader, value: Any, base_dir: str) -> tuple[tuple[Seed, ...], str | None]:
    """Inline list, or a YAML file holding such a list. A missing default file means no seeds."""
    seeds_file = None
    if isinstance(value, str):
        seeds_file = value if os.path.isabs(value) else os.path.join(base_dir, value)
        if not os.path.exists(seeds_file):
            return (), seeds_file
        try:
            with open(seeds_file) as f:
                value = yaml.safe_load(f) or []
        except (OSError, yaml.YAMLError) as e:
            raise r.fail("discovery.seeds", f"cannot read {seeds_file}: {e}") from None
        if isinstance(value, dict):
            value = value.get("seeds", [])
    if value is None:
        value = []
    if not isinstance(value, list):
        raise r.fail("discovery.seeds", "must be a file path or a list of tcp://host:port")
    seeds = []
    for i, item in enumerate(value):
        key = f"discovery.seeds[{i}]"
        if isinstance(item, str):
            seeds.append(Seed(r.endpoint(key, item)))
        elif isinstance(item, dict) and set(item) <= {"address", "key"}:
            seed_key = item.get("key")
            if seed_key is not None and not is_key(seed_key):
                raise r.fail(f"{key}.key", "must be a 40-character node public key (swarmctl key prints it)")
            seeds.append(Seed(r.endpoint(key, item.get("address")), seed_key))
        else:
            raise r.fail(key, f"must be tcp://host:port or {{address, key}}, got {item!r}")
    return tuple(seeds), seeds_file


def load_config(path: str, overrides: dict | None = None) -> Config:
    """Read and validate a config file (or only `overrides` when path is None)."""
    data: Any = {}
    shown = path or "(built-in defaults)"
    if path is not None:
        data = read_config_file(path)
    if overrides:
        data = _deep_update(dict(data) if isinstance(data, dict) else data, overrides)
    r = _Reader(shown)
    d = r.merge(data, DEFAULTS)
    base_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()

    if d["model"] is None:
        raise r.fail("model", "not set: a short name of a model got with `swarmctl model get NAME` (e.g. "
                     "smollm2-135m-instruct) or the path of a Hugging Face checkpoint directory")
    model = model_from_config(r.string("model", d["model"]), base_dir)
    s = d["serve"]
    device = _device(r, s["device"])
    # int8 and int4 run on CPUs by torch's own kernels; int8 on a GPU and nf4 by bitsandbytes
    if (s["quant"] == "nf4" or (s["quant"] == "int8" and device.startswith("cuda"))) \
            and importlib.util.find_spec("bitsandbytes") is None:
        raise r.fail("serve.quant", f"{s['quant']} weights{' on a GPU' if s['quant'] == 'int8' else ''} need "
                     "bitsandbytes, which is not installed here (pip install bitsandbytes); or use none")
    if s["quant"] == "int4" and device.startswith("cuda"):
        raise r.fail("serve.quant", "int4 runs on CPUs (torch's packed kernels); on a GPU use nf4")
    serve = ServeConfig(
        blocks=parse_blocks(r, s["blocks"]),
        num_blocks=r.positive_int("serve.num_blocks", s["num_blocks"], allow_auto=True),
        device=device,
        dtype=r.choice("serve.dtype", s["dtype"], ("auto", "float32", "bfloat16", "float16")),
        quant=r.choice("serve.quant", s["quant"], QUANT_MODES),
        max_length=r.positive_int("serve.max_length", s["max_length"]) or 1,
        max_batch=r.positive_int("serve.max_batch", s["max_batch"]) or 1,
        batch_window_s=_window(r, s["batch_window_ms"]),
        cuda_graphs=s["cuda_graphs"],
        session_idle_timeout_s=float(r.positive_int("serve.session_idle_timeout_s", s["session_idle_timeout_s"]) or 1),
        rebalance_interval_s=float(r.positive_int("serve.rebalance_interval_s", s["rebalance_interval_s"]) or 1),
        drain_timeout_s=float(r.positive_int("serve.drain_timeout_s", s["drain_timeout_s"]) or 1),
        stall_timeout_s=float(r.positive_int("serve.stall_timeout_s", s["stall_timeout_s"]) or 1),
        threads=r.positive_int("serve.threads", s["threads"], allow_auto=True),
        adapters=_adapters(r, s["adapters"], base_dir),
        cache=CacheConfig(
            max_bytes=r.size("serve.cache.max_bytes", s["cache"]["max_bytes"], allow_auto=True),
            kv_dtype=r.choice("serve.cache.kv_dtype", s["cache"]["kv_dtype"], KV_DTYPES),
        ),
        limits=LimitsConfig(
            sessions_per_key=r.positive_int("serve.limits.sessions_per_key", s["limits"]["sessions_per_key"]) or 1,
            cache_share_per_key=r.fraction("serve.limits.cache_share_per_key", s["limits"]["cache_share_per_key"]),
            unused_session_timeout_s=float(r.positive_int("serve.limits.unused_session_timeout_s",
                                                          s["limits"]["unused_session_timeout_s"]) or 1),
            requests_per_s_per_key=r.positive_int("serve.limits.requests_per_s_per_key",
                                                  s["limits"]["requests_per_s_per_key"]) or 1,
            queued_per_key=r.positive_int("serve.limits.queued_per_key", s["limits"]["queued_per_key"]) or 1,
            queued_bytes_per_key=r.size("serve.limits.queued_bytes_per_key", s["limits"]["queued_bytes_per_key"])
            or 1,
        ),
    )
    n = d["network"]
    announce = n["announce"]
    if isinstance(announce, str):
        announce = [announce]
    if not isinstance(announce, list):
        raise r.fail("network.announce", "must be a list of tcp://host:port")
    network = NetworkConfig(
        listen=r.endpoint("network.listen", n["listen"]),
        announce=tuple(r.endpoint(f"network.announce[{i}]", a) for i, a in enumerate(announce)),
        socket=os.path.expanduser(r.string("network.socket", n["socket"])),
        operator_group=None if n["operator_group"] is None else r.string("network.operator_group",
                                                                          n["operator_group"]),
        max_message_bytes=r.size("network.max_message_bytes", n["max_message_bytes"]) or 0,
        relay=n["relay"],
        relay_max_bytes_per_s=r.size("network.relay_max_bytes_per_s", n["relay_max_bytes_per_s"]) or 1,
        relay_max_servers=r.positive_int("network.relay_max_servers", n["relay_max_servers"]) or 1,
    )
    if not isinstance(s["cuda_graphs"], bool):
        raise r.fail("serve.cuda_graphs", f"must be true or false, got {s['cuda_graphs']!r}")
    if not isinstance(n["relay"], bool):
        raise r.fail("network.relay", f"must be true or false, got {n['relay']!r}")
    disc = d["discovery"]
    if not isinstance(disc["mdns"], bool):
        raise r.fail("discovery.mdns", f"must be true or false, got {disc['mdns']!r}")
    ifaces = disc["mdns_interfaces"]
    if ifaces != "all" and not (isinstance(ifaces, list) and all(isinstance(x, str) for x in ifaces)):
        raise r.fail("discovery.mdns_interfaces", f"must be all or a list of addresses, got {ifaces!r}")
    seeds, seeds_file = parse_seeds(r, disc["seeds"], base_dir)
    discovery = DiscoveryConfig(
        mdns=disc["mdns"], mdns_interfaces=ifaces if ifaces == "all" else tuple(ifaces),
        seeds=seeds, seeds_file=seeds_file,
    )
    sw = d["swarm"]
    swarm = SwarmConfig(
        access=r.choice("swarm.access", sw["access"], ("open", "private")),
        allowed_keys_dir=r.string("swarm.allowed_keys_dir", sw["allowed_keys_dir"]),
        verify=r.choice("swarm.verify", sw["verify"], ("off", "sample", "strict")),
        verify_probability=r.fraction("swarm.verify_probability", sw["verify_probability"]),
        quantized=r.choice("swarm.quantized", sw["quantized"], QUANTIZED_POLICIES),
    )
    listen = d["metrics"]["listen"]
    metrics_listen = None
    if listen is not None:
        metrics_listen = host_port(listen)
        if metrics_listen is None:
            raise r.fail("metrics.listen", f"must be host:port like 127.0.0.1:9464, or null (off), got {listen!r}")
    model_id = d["model_id"]
    if model_id is not None:
        model_id = r.string("model_id", model_id)
    return Config(
        path=shown, model=model, model_id=model_id, serve=serve, network=network, discovery=discovery,
        swarm=swarm, metrics=MetricsConfig(metrics_listen), api=parse_api(d["api"], r.fail, base_dir),
        state_dir=os.path.expanduser(r.string("state_dir", d["state_dir"])),
        log_level=r.choice("log_level", d["log_level"], ("debug", "info", "warning", "error")),
    )


def _adapters(r: _Reader, value: Any, base_dir: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise r.fail("serve.adapters", "must be a mapping of name: PEFT adapter directory")
    out = []
    for name, directory in value.items():
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
            raise r.fail("serve.adapters", f"adapter name {name!r} must be 1-64 letters, digits, _ . -")
        directory = os.path.expanduser(r.string(f"serve.adapters.{name}", directory))
        if not os.path.isabs(directory):
            directory = os.path.join(base_dir, directory)
        if not os.path.exists(os.path.join(directory, "adapter_config.json")):
            raise r.fail(f"serve.adapters.{name}", f"{directory} holds no adapter_config.json (a PEFT adapter)")
        out.append((name, directory))
    return tuple(out)


def _device(r: _Reader, value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^(auto|cpu|cuda(:\d+)?)$", value):
        raise r.fail("serve.device", f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def _deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _deep_update(dict(base[k]), v)
        else:
            base[k] = v
    return base
