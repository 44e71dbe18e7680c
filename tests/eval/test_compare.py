"""`accel.eval.compare.within_noise`: a speed-up is told apart from the machine's noise only when the ranges part."""

from accel.eval.compare import within_noise


def test_overlapping_ranges_are_within_noise():
    assert within_noise([0.92, 1.36], [0.80, 0.95])  # the issue's `off` against `balanced`: noise
    assert within_noise([1.0, 1.0], [1.0, 1.0])
    assert within_noise([1.0, 2.0], [1.2, 1.5])  # one inside the other


def test_ranges_apart_are_a_speed_up_or_a_slow_down():
    assert not within_noise([1.0, 1.1], [0.5, 0.9])
    assert not within_noise([0.5, 0.9], [1.0, 1.1])
