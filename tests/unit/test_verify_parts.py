"""The gateway's checks of servers' outputs, without daemons: the comparison and its dtype
tolerances, the norm band, the checks of every reply, and distrust (swarmd/gateway/verify.py)."""

import pytest
import torch

from libswarm.errors import WrongOutputError
from swarmd.gateway.verify import (
    BAND_FACTOR,
    BAND_MIN_ROWS,
    DISTRUST_S,
    NormBands,
    Reputation,
    check_gradient,
    check_output,
    disagreement,
    tolerance,
)


def hidden(seed=0, shape=(2, 5, 64)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 10


def test_outputs_agree_within_their_dtypes_tolerance_and_one_moved_element_is_named():
    b = hidden()
    assert disagreement(b + 1e-5 * b.abs(), b, tolerance(torch.float32)) is None
    a = b.clone()
    a[1, 3, 7] += 8 * b[1, 3].pow(2).mean().sqrt()
    why = disagreement(a, b, tolerance(torch.float32))
    assert why is not None and "row 1, position 3, element 7" in why
    # bfloat16 rounding of every element is no disagreement; the same lie still is
    assert disagreement(b.bfloat16(), b, tolerance(torch.bfloat16, torch.float32)) is None
    assert disagreement(a.bfloat16(), b, tolerance(torch.bfloat16, torch.float32)) is not None
    assert disagreement(b[:, :4], b, 1e-3) == "shapes [2, 4, 64] and [2, 5, 64]"


def test_the_band_holds_only_once_learned_and_catches_a_reply_grown_far_beyond_it():
    bands, span = NormBands(), (0, 3)
    x = hidden(1)
    out = x * 3  # this span triples norms
    assert bands.check(span, x, out * 1000) is None  # nothing learned yet: only the absolute bound
    assert "no block output is beyond" in bands.check(span, x, out * 1e5)
    while bands._bands.get(span, (0, 0))[1] < BAND_MIN_ROWS:
        bands.learn(span, x, out)
    assert bands.check(span, x, out * (BAND_FACTOR / 2)) is None
    assert "outside the band" in bands.check(span, x, out * 1000)
    assert bands.check((3, 6), x, out * 1000) is None  # per span
    assert bands.check(span, x, out * 1e-6) is None  # no lower bound: small norms are for cross-checks
    assert bands.check(span, x * 100, out * 100) is None  # larger inputs, larger outputs: the same growth


def test_an_accepted_reply_teaches_the_band_nothing_and_one_outside_it_is_implausible_not_wrong():
    """Issue 38, finding 2: a liar's zeros accepted unchecked once set the band to "at most 0x"
    and got every honest server distrusted. check_output learns nothing now (the gateway feeds the
    band only outputs two servers agreed on), and a norm outside the band is ImplausibleOutput, a
    reason for a second opinion, not a WrongOutputError (which distrusts at once)."""
    from swarmd.gateway.verify import ImplausibleOutput

    bands, span = NormBands(), (0, 3)
    x = hidden(3)
    for _ in range(4 * BAND_MIN_ROWS):
        check_output(x, x * 0, span, bands)  # a liar's zeros, accepted: plausible, and not learned
    assert bands.check(span, x, x * 3) is None
    while bands._bands.get(span, (0, 0))[1] < BAND_MIN_ROWS:
        bands.learn(span, x, x * 3)  # confirmed by a second server
    with pytest.raises(ImplausibleOutput) as e:
        check_output(x, x * 3000, span, bands)
    assert not isinstance(e.value, WrongOutputError) and torch.equal(e.value.output, x * 3000)
    check_output(x, x * 3000, span, None)  # an output compared with another server's: no band


def test_a_band_learned_from_zero_inputs_refuses_no_real_output():
    """An app stepping zeros (tests, warm-ups) gives tiny outputs: the band, relative to the
    input, must not then call every real output wrong."""
    bands, span = NormBands(), (0, 3)
    zeros = torch.zeros(2, 5, 64)
    for _ in range(2):
        bands.learn(span, zeros, torch.full((2, 5, 64), 0.01))
    x = hidden(2)
    assert bands.check(span, x, x * 3) is None


@pytest.mark.parametrize("out, needle", [
    (hidden().to(torch.int32), "not a floating point dtype"),
    (hidden()[..., :-1], "shape [2, 5, 63], expected [2, 5, 64]"),
    (hidden().masked_fill(torch.zeros(2, 5, 64, dtype=torch.bool).index_fill(2, torch.tensor([5]), True),
                          float("nan")), "NaN"),
    (hidden() * float("inf"), "NaN or infinite"),
])
def test_an_impossible_reply_is_a_wrong_output(out, needle):
    with pytest.raises(WrongOutputError) as e:
        check_output(hidden(), out, (0, 3), NormBands())
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_gradient_must_have_its_inputs_shape_and_be_finite():
    check_gradient(hidden() * 1e6, (2, 5, 64))  # large is fine: its scale is the loss's
    with pytest.raises(WrongOutputError, match="expected"):
        check_gradient(hidden()[:1], (2, 5, 64))
    with pytest.raises(WrongOutputError, match="NaN"):
        check_gradient(hidden() * float("nan"), (2, 5, 64))


def test_distrust_is_per_key_doubles_with_each_offence_and_is_not_earned_back():
    now = [1000.0]
    told = []
    rep = Reputation(key_of=lambda a: {"tcp://a:1": "KEY-A"}.get(a), distrust=lambda k, r, s: told.append((k, s)),
                     clock=lambda: now[0])
    for _ in range(100):
        rep.passed("tcp://a:1")
    assert not rep.is_distrusted("tcp://a:1")
    assert rep.offence("tcp://a:1", "blocks 0:3: position 4 differs") == DISTRUST_S
    assert rep.is_distrusted("tcp://a:1") and told == [("KEY-A", DISTRUST_S)]
    now[0] += DISTRUST_S + 1
    assert not rep.is_distrusted("tcp://a:1")
    assert rep.offence("tcp://a:1", "again") == 2 * DISTRUST_S  # a second offence costs twice as long
    row = next(r for r in rep.to_json() if r["node_id"] == "KEY-A")
    assert row["checks_passed"] == 100 and row["offences"] == 2 and len(row["evidence"]) == 2
    rep.offence("tcp://b:2", "unknown key")  # no key known: judged by address, the table is not told
    assert rep.is_distrusted("tcp://b:2") and len(told) == 2
