from __future__ import annotations

import itertools

import pytest
from gzsl_dvae import LinearWarmup


def test_published_schedules_hand_computed() -> None:
    cross = LinearWarmup(2.37, 21, 75)
    assert cross(0) == 0.0 and cross(21) == 0.0
    assert cross(48) == pytest.approx(2.37 * 27 / 54)
    assert cross(75) == pytest.approx(2.37) and cross(99) == pytest.approx(2.37)
    kl = LinearWarmup(0.25, 0, 93)
    assert kl(31) == pytest.approx(0.25 / 3)
    distance = LinearWarmup(8.13, 6, 22)
    assert distance(14) == pytest.approx(8.13 / 2)
    assert distance(5) == 0.0


def test_step_and_constant() -> None:
    assert LinearWarmup(1.5, 10, 10)(9) == 0.0
    assert LinearWarmup(1.5, 10, 10)(10) == 1.5
    assert LinearWarmup.constant(2.0)(0) == 2.0


def test_monotone() -> None:
    w = LinearWarmup(3.0, 2, 9)
    values = [w(e / 4) for e in range(60)]
    assert all(b >= a for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(
    ("args", "match"),
    [((-1.0, 0, 1), "factor"), ((1.0, -1, 1), "start_epoch"), ((1.0, 5, 4), "end_epoch")],
)
def test_errors(args: tuple[float, float, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinearWarmup(*args)


def test_rescaled_keeps_the_shape_of_the_schedule() -> None:
    published = LinearWarmup(2.37, 21, 75)
    short = published.rescaled(0.3)
    assert (short.factor, short.start_epoch, short.end_epoch) == pytest.approx((2.37, 6.3, 22.5))
    for epoch in (0.0, 10.0, 21.0, 48.0, 75.0, 99.0):  # the same weight at the same fraction of the run
        assert short(epoch * 0.3) == pytest.approx(published(epoch))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_rescaled_rejects_bad_scale(scale: float) -> None:
    with pytest.raises(ValueError, match="epoch_scale"):
        LinearWarmup(1.0, 0, 10).rescaled(scale)
