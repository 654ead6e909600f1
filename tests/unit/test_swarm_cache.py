"""The swarm's cache as generate() sees it: a Hugging Face `Cache` whose one layer is the session
on the servers. HF's own calls (whatever a release adds to the documented base class) must turn
into the session's rollbacks and reorders, never into a TypeError."""

import types

import pytest
import torch
from transformers.cache_utils import Cache

from libswarm.errors import SessionError, UnsupportedError
from libswarm.model import RemoteSession, _SwarmCache


def cache_at(position: int, max_length: int = 64) -> tuple[_SwarmCache, RemoteSession]:
    # the session is never opened here: no daemon, only its bookkeeping of positions
    sess = RemoteSession(types.SimpleNamespace(client=None), max_length)
    sess.position = position
    return _SwarmCache(sess), sess


def test_the_swarm_cache_is_a_hugging_face_cache_that_reports_the_session():
    cache, sess = cache_at(10)
    assert isinstance(cache, Cache)
    assert cache.get_seq_length() == 10 and cache.get_seq_length(0) == 10
    assert cache.get_max_length() == 64
    assert cache.is_croppable and not cache.is_compileable
    assert cache.is_linear == [False] and cache.is_sliding == [False]
    assert cache.get_mask_sizes(3, 0) == (13, 0)


def test_assisted_decoding_calls_of_every_release_roll_the_session_back():
    cache, sess = cache_at(12)
    # 5.25 passes keywords older releases did not know; the base class forwards them to the layer
    cache.activate_past_recording(recurrent_states_to_keep=5)
    assert cache.get_recurrent_states_to_keep() == 0  # attention caches keep no recurrent states
    cache.crop(-3)  # 5.17+: remove 3 positions
    assert sess.position == 9 and sess.start == 9
    cache.crop(0)
    assert sess.position == 9
    cache.crop(7)  # before 5.17: keep the first 7
    assert sess.position == 7


def test_a_crop_past_the_start_is_refused_in_one_line():
    cache, _ = cache_at(2)
    with pytest.raises(SessionError, match="cannot cut the session back"):
        cache.crop(-5)


def test_beam_reorders_through_the_base_class_compose_for_the_next_step():
    cache, sess = cache_at(4)
    cache.reorder_cache(torch.tensor([1, 0, 2]))
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert sess.beam_order.tolist() == [2, 2, 1]


def test_what_the_servers_cannot_do_is_refused_not_faked():
    cache, _ = cache_at(4)
    with pytest.raises(UnsupportedError):
        cache.batch_repeat_interleave(2)
    with pytest.raises(UnsupportedError):
        cache.layers[0].update(torch.zeros(1), torch.zeros(1))
