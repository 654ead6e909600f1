"""The wire protocol shared by swarmd and libswarm; docs/protocol.md is its authority."""

from libswarm.protocol.messages import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    Message,
    decode,
    encode,
    error_reply,
    ok_reply,
)
from libswarm.protocol.tensors import DTYPES, tensor_from_buffer, tensor_to_buffer

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "Message",
    "decode",
    "encode",
    "error_reply",
    "ok_reply",
    "tensor_from_buffer",
    "tensor_to_buffer",
]
