"""The emulated link (swarmd/transport/netem.py): delay, jitter, bandwidth queueing, loss, drops."""

import time

import pytest

from libswarm.errors import ConfigError
from swarmd.transport.netem import Link, parse_profile, profile_from_env


def test_profiles_parse_and_bad_ones_are_one_line_errors():
    p = parse_profile("delay_ms=50,jitter_ms=2,rate_mbit=100,loss=0.01,drop=0.001,seed=7")
    assert (p.delay_s, p.jitter_s, p.rate_bps, p.loss, p.drop, p.seed) == (0.05, 0.002, 1e8, 0.01, 0.001, 7)
    assert profile_from_env({}) is None and profile_from_env({"SWARMD_NETEM": "delay_ms=0"}) is None
    assert profile_from_env({"SWARMD_NET_DELAY_MS": "20"}).delay_s == pytest.approx(0.02)
    for bad in ("delay=5", "loss=2", "rate_mbit=-1", "jitter_ms=x"):
        with pytest.raises(ConfigError, match="SWARMD_NETEM"):
            parse_profile(bad)


def test_delay_and_jitter_keep_order_and_bounds():
    link = Link(parse_profile("delay_ms=50,jitter_ms=10,seed=1"))
    t0 = time.monotonic()
    arrivals = []
    for _ in range(200):
        wait, cut = link.admit(100)
        assert wait is not None and not cut
        arrivals.append(link.last_arrival - t0)
    assert all(b >= a for a, b in zip(arrivals, arrivals[1:]))  # never before the message sent before it
    assert 0.04 - 0.005 <= min(arrivals) and max(arrivals) <= 0.06 + 0.05


def test_a_bandwidth_cap_queues_messages_by_size():
    link = Link(parse_profile("rate_mbit=100"))  # 12.5 MB/s
    waits = [link.admit(1_250_000)[0] for _ in range(4)]  # 0.1 s each, queued behind each other
    assert waits == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.01)


def test_loss_and_drops_happen_at_their_rates():
    link = Link(parse_profile("loss=0.05,drop=0.02,seed=3"))
    results = [link.admit(10) for _ in range(20_000)]
    lost = sum(w is None for w, _ in results) / len(results)
    cut = sum(c for _, c in results) / len(results)
    assert lost == pytest.approx(0.05, abs=0.01) and cut == pytest.approx(0.02, abs=0.006)
    assert (link.lost, link.dropped, link.sent) == (sum(w is None for w, _ in results), sum(c for _, c in results),
                                                    20_000)


def test_a_places_file_gives_each_link_the_delay_of_its_two_ends(tmp_path):
    """Issue 42's two continents: London-New York ~74 ms round trip in the model (published
    figures ~70-76 ms), London-Frankfurt ~10 ms; a link to a node the file does not name keeps
    delay_ms; this daemon's own place comes from its node id (netem.locate)."""
    import json

    from swarmd.transport import netem

    places = {"ldn": {"name": "London", "lat": 51.51, "lon": -0.13},
              "nyc": {"name": "New York", "lat": 40.71, "lon": -74.01},
              "fra": {"name": "Frankfurt", "lat": 50.11, "lon": 8.68}}
    path = tmp_path / "places.json"
    path.write_text(json.dumps({"places": places}))
    profile = parse_profile(f"delay_ms=3,places={path}")
    try:
        netem.locate("ldn")
        assert 2 * Link(profile, "nyc").delay_s == pytest.approx(0.074, abs=0.004)
        assert 2 * Link(profile, "fra").delay_s == pytest.approx(0.010, abs=0.002)
        assert Link(profile, "elsewhere").delay_s == pytest.approx(0.003)
        netem.locate("nyc")
        assert Link(profile, "ldn").delay_s == pytest.approx(Link(profile, "nyc").delay_s + 0.036, abs=0.002)
        wait, _ = Link(profile, "ldn").admit(100)
        assert wait == pytest.approx(0.037, abs=0.003)
    finally:
        netem.locate("")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="places file"):
        parse_profile(f"places={tmp_path / 'bad.json'}")
