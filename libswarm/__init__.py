"""libswarm: use a model served by a swarm of swarmd daemons as if it were local.

    from libswarm import AutoDistributedModelForCausalLM, SwarmClient, load_tokenizer
    model = AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m-instruct", socket=path)
    tokenizer = load_tokenizer("smollm2-135m-instruct")   # short names or paths, never the hub
    model.generate(input_ids, max_new_tokens=20)
"""

from libswarm.client import SwarmClient, resolve_socket
from libswarm.errors import (
    CacheFullError,
    ConfigError,
    LimitError,
    ModelError,
    NoRouteError,
    PeerUnavailableError,
    ProtocolError,
    RemoteError,
    SessionError,
    SwarmError,
    TensorError,
    UnsupportedError,
    WrongModelError,
    WrongOutputError,
)
from libswarm.models import load_tokenizer, resolve_model

__version__ = "0.1.0"


def __getattr__(name: str):
    # the model classes import transformers (seconds); load them only when asked for
    if name in ("AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"):
        from libswarm import model

        return getattr(model, name)
    raise AttributeError(f"module 'libswarm' has no attribute {name!r}")


__all__ = [
    "AutoDistributedModelForCausalLM",
    "CacheFullError",
    "ConfigError",
    "DistributedModelForCausalLM",
    "LimitError",
    "ModelError",
    "NoRouteError",
    "PeerUnavailableError",
    "ProtocolError",
    "RemoteError",
    "SessionError",
    "SwarmClient",
    "SwarmError",
    "TensorError",
    "UnsupportedError",
    "WrongModelError",
    "WrongOutputError",
    "__version__",
    "load_tokenizer",
    "resolve_model",
    "resolve_socket",
]
