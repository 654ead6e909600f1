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
from libswarm.protocol.messages import Message, raise_if_error
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
        ([b'{"v":"1.0","type":"x","id":1,"tensors":[{"name":"a","dtype":"float32","shape":[2]}]}'], "but 0 follow"),
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


def _sections(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def test_the_message_registry_and_docs_protocol_md_define_the_same_messages_and_fields():
    """docs/protocol.md is the protocol's authority and libswarm.protocol.registry what the
    daemons dispatch by: every message type and every field the one has, the other has."""
    import os
    import re

    from libswarm.protocol import registry

    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "protocol.md")).read()
    peer = _sections(text, "## Peer plane (server role)", "## How a gateway runs a step")
    gossip = _sections(text, "## Gossip", "## Liveness")
    local = _sections(text, "## Local plane (gateway role)", "## Limits")

    documented_peer = set(re.findall(r"^### `(\w+)`", peer, re.M)) | set(re.findall(r"^\| `(\w+)` \|", gossip, re.M))
    assert documented_peer == set(registry.PEER)
    for spec in registry.PEER.values():
        where = gossip if spec.name == "gossip" else peer
        missing = [n for n in (*spec.fields, *spec.optional, *spec.tensors, *spec.optional_tensors)
                   if f"`{n}`" not in where]
        assert not missing, f"peer {spec.name}: {missing} not in docs/protocol.md"

    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", local, re.M)}
    assert set(rows) == set(registry.LOCAL)
    for spec in registry.LOCAL.values():
        missing = [n for n in (*spec.fields, *spec.optional) if f"`{n}`" not in rows[spec.name]]
        assert not missing, f"local {spec.name}: {missing} not in its row of docs/protocol.md"


def test_every_registered_message_has_a_handler_and_every_handler_a_registered_message():
    """What the daemons answer is what the registry (and so the spec) says."""
    import inspect
    import os

    import zmq

    from libswarm.protocol import registry
    from swarmd import daemon
    from swarmd.config import LimitsConfig
    from swarmd.gateway.gateway import Gateway
    from swarmd.identity import NodeIdentity
    from swarmd.peer.server import SpanServer
    from swarmd.runtime.cache import CacheBudget
    from swarmd.transport.access import AccessControl

    ctx, me = zmq.Context(), NodeIdentity(os.urandom(32))
    server = SpanServer(ctx, None, CacheBudget(0), "m", max_length=8, max_batch=1, idle_timeout_s=60,
                        max_message_bytes=2**20, identity=me, access=AccessControl("open", "", me.public_key),
                        resolve_key=lambda a: None, limits=LimitsConfig(1, 0.5, 1))
    try:
        # the daemon adds gossip (membership's); a push and a relay are taken before dispatch
        assert {*server.handlers, "gossip", "push", "relay"} == set(registry.PEER)
    finally:
        server.compute.stop()
        server.sock.close(0)
        ctx.term()
    gateway = Gateway(model_id="m", num_layers=2, hidden_size=4, pool=None, table=None, membership=None, status=dict)
    added = {"key", "rebalance", "drain"}  # the daemon's own, beside the gateway's
    assert all(f"{name}=lambda m:" in inspect.getsource(daemon.Daemon.__init__) for name in added)
    assert {*gateway.handlers, *added} == set(registry.LOCAL)


def test_a_tensor_cut_into_frames_arrives_whole_and_whole_tensors_still_decode():
    """1.4: tensors over frame_bytes travel in several frames; a 1.3 sender's whole ones too."""
    from libswarm.protocol.messages import speaks

    big, small = torch.randn(3, 1000, 7), torch.arange(5)
    frames = encode("forward", 7, {"model_id": "m"}, {"hidden": big, "position_ids": small}, frame_bytes=4096)
    header = json.loads(bytes(frames[0]))
    assert [s.get("frames", 1) for s in header["tensors"]] == [-(-big.numel() * 4 // 4096), 1]
    assert all(len(f) <= 4096 for f in frames[1:])
    msg = decode(frames)
    assert torch.equal(msg.tensors["hidden"], big) and torch.equal(msg.tensors["position_ids"], small)
    assert msg.chunked and torch.equal(decode(encode("x", 1, None, {"hidden": big})).tensors["hidden"], big)
    assert speaks("1.4", (1, 4)) and speaks("2.0", (1, 4)) and not speaks("1.3", (1, 4)) and not speaks("x", (1, 4))


@pytest.mark.parametrize("frames_field", [0, -1, True, "2", 10**6])
def test_a_bad_frame_count_is_one_protocol_error(frames_field):
    frames = encode("forward", 1, None, {"hidden": torch.zeros(4, 4)}, frame_bytes=16)
    header = json.loads(bytes(frames[0]))
    header["tensors"][0]["frames"] = frames_field
    with pytest.raises(ProtocolError):
        decode([json.dumps(header).encode(), *frames[1:]])


def test_frames_that_do_not_add_up_to_the_specs_are_refused():
    frames = encode("forward", 1, None, {"hidden": torch.zeros(4, 4)}, frame_bytes=16)
    with pytest.raises(ProtocolError, match="tensor frames"):
        decode(frames[:-1])
    header = json.loads(bytes(frames[0]))
    header["tensors"][0]["frames"] -= 1  # the bytes no longer match the shape
    with pytest.raises(TensorError):
        decode([json.dumps(header).encode(), *frames[1:-1]])


def test_a_header_beyond_its_limit_is_refused_by_the_sender_at_once():
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        encode("backward", 1, {"pass": "x" * 70_000})


def test_the_client_takes_an_error_the_daemon_could_not_tie_to_a_request_as_its_answer(tmp_path):
    """A daemon that cannot read a request answers with id 0; the client, with one request in
    flight, fails at once with that error instead of waiting out its timeout."""
    import threading
    import time

    import zmq

    from libswarm import SwarmClient

    path = str(tmp_path / "d.sock")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"ipc://{path}")

    def answer():
        if router.poll(5000):
            ident = router.recv_multipart()[0]
            router.send_multipart([ident, *error_reply(0, ProtocolError("header is not valid JSON"))])
    t = threading.Thread(target=answer)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match="not valid JSON"):
            SwarmClient(socket=path, timeout_s=30, context=ctx).request("status")
        assert time.monotonic() - t0 < 5
    finally:
        t.join()
        router.close(0)
        ctx.term()


def test_a_type_is_peeked_where_encode_puts_it_never_from_a_field_further_on():
    from libswarm.protocol.messages import peek_type

    frames = encode("open", 3, {"model_id": "m", "note": {"type": "status"}})
    assert peek_type(frames[0]) == "open"
    assert peek_type(encode("status", 4)[0]) == "status"
    disguised = b'{"v":"1.4","id":1,"note":"\\"type\\":\\"status\\"","type":"open"}'
    assert peek_type(disguised) is None  # not "status": it would be served as a control request
    assert peek_type(b'{"id": 2, "v": "1.4", "type": "status"}') is None  # not our encoder's order


def test_a_request_is_decoded_once_into_its_frozen_typed_dataclass_with_wire_names_mapped():
    """Handlers take these: each field of the type the registry declares, `from` and `pass`
    under Python names, tensors by name, client trainables left in the message."""
    import dataclasses

    from libswarm.protocol import registry

    hidden, lora = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
    msg = Message("step", 3, {"session": "s", "step": 4, "from": "K", "expect_push": True}, {"hidden": hidden})
    req = registry.parse(registry.PEER, msg)
    assert isinstance(req, registry.PeerStep) and req.session == "s" and req.step == 4 and req.from_ == "K"
    assert req.hidden is hidden and req.position_ids is None and req.msg is msg
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.session = "other"  # type: ignore[misc]
    back = registry.parse(registry.LOCAL, Message("backward", 1, {"model_id": "m", "pass": 9},
                                                  {"hidden": hidden, "grad_output": hidden, "lora_A.q": lora}))
    assert isinstance(back, registry.Backward) and back.pass_ == 9 and back.msg.tensors["lora_A.q"] is lora
    # every declared type is enforced at the edge, bools never pass for ints
    for fields, wrong in [({"session": "s", "step": True}, "'step' must be int"),
                          ({"session": "s", "next": "tcp://x"}, "'next' must be dict"),
                          ({"session": 1}, "'session' must be str")]:
        with pytest.raises(ProtocolError, match=wrong):
            registry.parse(registry.PEER, Message("step", 1, fields))
    with pytest.raises(TensorError, match="tensor 'grad_output' is missing"):
        registry.parse(registry.PEER, Message("backward", 1, {"model_id": "m", "blocks": [0, 1]}, {"hidden": hidden}))
    # one definition: the specs the docs are compared with are derived from the dataclasses
    step = registry.PEER["step"]
    assert step.cls is registry.PeerStep and "from" in step.optional and "hidden" in step.optional_tensors
    # protocol 1.6: a backward of a pass the gateway kept may send the gradient alone
    assert registry.LOCAL["backward"].tensors == ("grad_output",)
    assert "hidden" in registry.LOCAL["backward"].optional_tensors


def test_every_reply_field_the_registry_types_is_in_docs_protocol_md_for_its_message():
    """A handler returns its reply as the registry's TypedDict (mypy checks it builds it); each of
    those fields is in the spec's section (peer plane) or table row (local plane) of its type."""
    import os
    import re

    from libswarm.protocol import registry

    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "protocol.md")).read()
    peer = _sections(text, "## Peer plane (server role)", "## How a gateway runs a step")
    local = _sections(text, "## Local plane (gateway role)", "## Limits")
    assert set(registry.PEER_REPLIES) <= set(registry.PEER) and set(registry.LOCAL_REPLIES) <= set(registry.LOCAL)
    for name, reply in registry.PEER_REPLIES.items():
        section = re.search(rf"^### `{name}`\n(.*?)(?=^### |\Z)", peer, re.M | re.S)
        assert section, name
        missing = [k for k in reply.__annotations__ if f"`{k}`" not in section.group(1)]
        assert not missing, f"peer {name} reply: {missing} not in docs/protocol.md"
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|.*\| (.*) \|$", local, re.M)}
    for name, reply in registry.LOCAL_REPLIES.items():
        missing = [k for k in reply.__annotations__ if f"`{k}`" not in rows[name]]
        assert not missing, f"local {name} reply: {missing} not in the reply column of docs/protocol.md"
    assert "cache_bytes" in registry.Opened.__annotations__ and "pass" in registry.Forwarded.__annotations__
