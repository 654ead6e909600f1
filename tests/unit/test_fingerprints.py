"""Block fingerprints hash every byte of a block's weights, once per file: the digests are kept
in the state dir keyed by the file's size, mtime, change time and inode."""

import json
import os

import pytest
from conftest import tampered_copy

import libswarm.checkpoint as checkpoint
from libswarm.checkpoint import Checkpoint
from libswarm.errors import ModelError


def test_a_changed_middle_element_changes_only_its_blocks_fingerprint(model_dirs, tmp_path):
    ours = model_dirs("llama")
    theirs = tampered_copy(ours, str(tmp_path / "t"), block=2)
    same = [Checkpoint(ours).block_fingerprint(b) == Checkpoint(theirs).block_fingerprint(b) for b in range(6)]
    assert same == [True, True, False, True, True, True]


def test_digests_are_kept_and_reused_until_the_file_changes(model_dirs, tmp_path, monkeypatch):
    d = tampered_copy(model_dirs("llama"), str(tmp_path / "m"), block=0)
    cache = str(tmp_path / "weights.json")
    hashed = []
    real = checkpoint._hash_safetensors
    monkeypatch.setattr(checkpoint, "_hash_safetensors", lambda p: (hashed.append(p), real(p))[1])
    first = [Checkpoint(d, digest_cache=cache).block_fingerprint(b) for b in range(6)]
    assert len(hashed) == 1 and os.path.exists(cache)
    assert [Checkpoint(d, digest_cache=cache).block_fingerprint(b) for b in range(6)] == first
    assert len(hashed) == 1  # a later start reads the kept digests
    weights = os.path.join(d, "model.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    assert [Checkpoint(d, digest_cache=cache).block_fingerprint(b) for b in range(6)] == first
    assert len(hashed) == 2
    with open(cache, "w") as f:
        f.write("{not json")  # a damaged cache costs a rehash, nothing else
    assert Checkpoint(d, digest_cache=cache).block_fingerprint(3) == first[3]
    assert len(hashed) == 3 and json.load(open(cache))["version"] == 1


@pytest.mark.parametrize("header", [b"\xff" * 8, (16).to_bytes(8, "little") + b"{not json at all}",
                                    (40).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [4], '
                                                                  b'"data_offsets": [0, 999999]}}'])
def test_a_damaged_weights_file_is_one_line_model_error(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(header)
    with pytest.raises(ModelError, match="model.safetensors") as e:
        checkpoint._hash_safetensors(str(path))
    assert "\n" not in str(e.value)


def test_weights_rewritten_with_their_size_and_mtime_put_back_are_hashed_again(model_dirs, tmp_path):
    """Group swarmd may write the models directory: a changed weight with the file's size and
    mtime restored (touch -d) must not keep the old fingerprint (security review 19)."""
    d = tampered_copy(model_dirs("llama"), str(tmp_path / "m"), block=0)
    cache = str(tmp_path / "weights.json")
    first = [Checkpoint(d, digest_cache=cache).block_fingerprint(b) for b in range(6)]
    weights = os.path.join(d, "model.safetensors")
    st = os.stat(weights)
    with open(weights, "r+b") as f:  # one byte of block 2's tensors, in place
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        name = next(k for k in header if k.startswith("model.layers.2."))
        at = 8 + n + header[name]["data_offsets"][0]
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(weights).st_size == st.st_size and os.stat(weights).st_mtime_ns == st.st_mtime_ns
    assert [Checkpoint(d, digest_cache=cache).block_fingerprint(b) for b in range(6)] != first
