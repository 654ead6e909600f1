import json

import pytest
import torch

from libswarm.errors import (
    CacheFullError,
    ProtocolError,
    RemoteError,
    TensorError,
    error_from_wire,
    error_to_wire,
)
from libswarm.protocol import PROTOCOL_VERSION, decode, encode, error_reply
from libswarm.protocol.messages import raise_if_error
from libswarm.protocol.tensors import DTYPES, tensor_from_buffer, tensor_to_buffer


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_roundtrips_bit_exactly(name):
    dtype = DTYPES[name]
    t = (torch.randn(2, 3, 5) * 50).to(dtype)
    spec, buf = tensor_to_buffer(t)
    back = tensor_from_buffer(spec, bytes(buf))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_non_contiguous_and_empty_tensors_roundtrip():
    t = torch.arange(24.0).reshape(4, 6).t()
    spec, buf = tensor_to_buffer(t)
    assert torch.equal(tensor_from_buffer(spec, bytes(buf)), t)
    e = torch.empty(0, 4)
    spec, buf = tensor_to_buffer(e)
    assert tensor_from_buffer(spec, bytes(buf)).shape == (0, 4)


def test_message_roundtrip_keeps_fields_tensors_and_id():
    h = torch.randn(1, 3, 8)
    frames = encode("step", 7, {"session": "abc"}, {"hidden": h, "key_mask": torch.ones(1, 3, dtype=torch.bool)})
    msg = decode([bytes(f) for f in frames])
    assert (msg.type, msg.id, msg.get("session")) == ("step", 7, "abc")
    assert torch.equal(msg.tensors["hidden"], h) and msg.tensors["key_mask"].dtype == torch.bool
    assert json.loads(bytes(frames[0]))["v"] == PROTOCOL_VERSION


@pytest.mark.parametrize(
    "frames, needle",
    [
        ([], "empty"),
        ([b"\xff\x00garbage"], "not valid JSON"),
        ([b"[1,2]"], "JSON object"),
        ([b'{"v":"9.0","type":"x","id":1}'], "version"),
        ([b'{"v":"1.0","type":"x"}'], "integer 'id'"),
        ([b'{"v":"1.0","type":"x","id":1,"tensors":[{"name":"a","dtype":"float32","shape":[2]}]}'], "frames follow"),
        ([b"x" * 70000], "exceeds"),
    ],
)
def test_malformed_frames_raise_protocol_error_naming_the_problem(frames, needle):
    with pytest.raises(ProtocolError, match=needle):
        decode(frames)


@pytest.mark.parametrize(
    "spec, nbytes, needle",
    [
        ({"dtype": "complex64", "shape": [1]}, 8, "unknown tensor dtype"),
        ({"dtype": "float32", "shape": [-1]}, 4, "bad tensor shape"),
        ({"dtype": "float32", "shape": [1.5]}, 4, "bad tensor shape"),
        ({"dtype": "float32", "shape": [1] * 9}, 4, "bad tensor shape"),
        ({"dtype": "float32", "shape": [2, 2]}, 15, "needs 16 bytes"),
        ({"dtype": "float32", "shape": [0, 2**70]}, 0, "bad tensor shape"),
        ("nope", 4, "spec must be"),
    ],
)
def test_bad_tensor_specs_raise_tensor_error(spec, nbytes, needle):
    with pytest.raises(TensorError, match=needle):
        tensor_from_buffer(spec, b"\0" * nbytes)


def test_a_hostile_header_raises_only_the_promised_errors():
    """decode() promises ProtocolError or TensorError: anything else would abort a gossip round
    or become an internal error instead of a refused message."""
    deep = b'{"v":"1.0","type":"x","id":1,"a":' + b"[" * 20000 + b"]" * 20000 + b"}"
    huge = json.dumps({"v": "1.0", "type": "x", "id": 1,
                       "tensors": [{"name": "a", "dtype": "float32", "shape": [0, 2**70]}]}).encode()
    for frames in ([deep], [huge, b""]):
        with pytest.raises((ProtocolError, TensorError)):
            decode(frames)


def test_errors_cross_the_wire_as_the_same_class_with_one_line():
    code, message = error_to_wire(CacheFullError("no room\nfor this"))
    assert isinstance(error_from_wire(code, message), CacheFullError)
    assert "\n" not in message
    reply = decode([bytes(f) for f in error_reply(3, ValueError("boom"))])
    with pytest.raises(RemoteError, match="ValueError: boom"):
        raise_if_error(reply)
