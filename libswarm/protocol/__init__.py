"""The wire protocol shared by swarmd and libswarm; docs/protocol.md is its authority.
(Tensor codecs live in libswarm.protocol.tensors, which imports torch.)"""

from libswarm.protocol.messages import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    Message,
    decode,
    encode,
    error_reply,
    ok_reply,
)

__all__ = [
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "Message",
    "decode",
    "encode",
    "error_reply",
    "ok_reply",
]
