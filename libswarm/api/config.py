"""The `api` section of swarmd.yaml, and what swarm-api reads of the rest of that file.

swarmd validates the section too (so a typo fails at the daemon's start, where operators look
first), through `parse_api`; this module needs only PyYAML, not the HTTP stack."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from libswarm.errors import ConfigError
from libswarm.models import model_from_config

API_DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:8000",
    "keys_file": None,
    "max_tokens": 1024,
    "max_concurrent": 32,
    "max_queued": 64,
    "route_timeout_s": 30,
    "draft_model": None,
    "draft_quant": "none",
}
DRAFT_QUANTS = ("none", "int8", "int4")
DEFAULT_SOCKET = "/run/swarmd/swarmd.sock"
_HOST_PORT_RE = re.compile(r"^\[?([A-Za-z0-9.:\-]+?)\]?:(\d{1,5})$")

Fail = Callable[[str, str], ConfigError]


@dataclass(frozen=True)
class ApiSettings:
    listen: tuple[str, int]
    keys_file: str | None  # bearer keys, one a line; None: no key asked
    max_tokens: int  # a completion's length when the request does not say
    max_concurrent: int  # generations at once (a choice each); more wait
    route_timeout_s: float  # how long a request waits for servers to cover every block
    draft_model: str | None = None  # a small model of the same tokenizer, run here to draft greedy tokens
    max_queued: int = 64  # requests that wait for generations to end; more get 429 with Retry-After
    draft_quant: str = "none"  # the draft's linear layers: as stored, or in torch's packed int8/int4 kernels


@dataclass(frozen=True)
class ApiConfig:
    path: str
    model: str  # the checkpoint directory (tokenizer, chat template, client-side weights)
    model_name: str  # what /v1/models lists and requests name
    socket: str
    api: ApiSettings


def host_port(value: Any) -> tuple[str, int] | None:
    """"host:port" (IPv6 in brackets) -> (host, port), or None when it is not one."""
    m = _HOST_PORT_RE.match(value) if isinstance(value, str) else None
    if not m or not 0 < int(m.group(2)) < 65536:
        return None
    return m.group(1), int(m.group(2))


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to later


def parse_api(section: Any, fail: Fail, base_dir: str) -> ApiSettings:
    """The `api` mapping, defaults filled in; every error names the key."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise fail("api", "must be a mapping")
    for key in section:
        if key not in API_DEFAULTS:
            raise fail(f"api.{key}", f"unknown key (known: {', '.join(API_DEFAULTS)})")
    s = {**API_DEFAULTS, **section}
    listen = host_port(s["listen"])
    if listen is None:
        raise fail("api.listen", f"must be host:port like 127.0.0.1:8000, got {s['listen']!r}")
    keys_file = s["keys_file"]
    if keys_file is not None:
        if not isinstance(keys_file, str) or not keys_file:
            raise fail("api.keys_file", f"must be a file path or null (no key asked), got {keys_file!r}")
        keys_file = os.path.join(base_dir, os.path.expanduser(keys_file))
    if keys_file is None and not is_loopback(listen[0]):
        raise fail("api.keys_file", f"must be set when api.listen ({s['listen']}) is not a loopback address: "
                                    "without keys, anyone who reaches it uses the swarm")
    for key in ("max_tokens", "max_concurrent", "route_timeout_s"):
        v = s[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise fail(f"api.{key}", f"must be a positive integer, got {v!r}")
    queued = s["max_queued"]
    if not isinstance(queued, int) or isinstance(queued, bool) or queued < 0:
        raise fail("api.max_queued", f"must be an integer >= 0 (0: none wait), got {queued!r}")
    draft = s["draft_model"]
    if draft is not None:
        if not isinstance(draft, str) or not draft:
            raise fail("api.draft_model", f"must be a model's short name or directory, or null, got {draft!r}")
        draft = model_from_config(draft, base_dir)
        if not os.path.isdir(draft):
            raise fail("api.draft_model", f"{draft} is not a model directory (swarmctl model get NAME)")
    if s["draft_quant"] not in DRAFT_QUANTS:
        raise fail("api.draft_quant", f"must be one of {', '.join(DRAFT_QUANTS)}, got {s['draft_quant']!r}")
    return ApiSettings(listen=listen, keys_file=keys_file, max_tokens=s["max_tokens"],
                       max_concurrent=s["max_concurrent"], route_timeout_s=float(s["route_timeout_s"]),
                       draft_model=draft, max_queued=queued, draft_quant=s["draft_quant"])


def read_config_file(path: str) -> Any:
    """The YAML of swarmd's config file (the daemon's and swarm-api's), or a one-line error."""
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None


def load_api_config(path: str) -> ApiConfig:
    """What swarm-api needs from the daemon's config file: `model`, `network.socket`, `api`.
    The other sections are the daemon's to check."""
    data = read_config_file(path)

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {problem}")

    if not isinstance(data, dict):
        raise fail("(top level)", "must be a mapping")
    base_dir = os.path.dirname(os.path.abspath(path))
    raw = data.get("model")
    if not isinstance(raw, str) or not raw:
        raise fail("model", "not set: swarm-api needs the model's directory or short name (its tokenizer)")
    model = model_from_config(raw, base_dir)
    if not os.path.isdir(model):
        raise fail("model", f"{model}: no such directory")
    network = data.get("network") or {}
    if not isinstance(network, dict):
        raise fail("network", "must be a mapping")
    socket = network.get("socket", DEFAULT_SOCKET)
    if not isinstance(socket, str) or not socket:
        raise fail("network.socket", f"must be a non-empty string, got {socket!r}")
    name = raw if "/" not in raw else os.path.basename(os.path.normpath(model))
    return ApiConfig(path=path, model=model, model_name=name, socket=os.path.expanduser(socket),
                     api=parse_api(data.get("api"), fail, base_dir))
