"""The access-log budget: exact token arithmetic on a fake clock."""

from __future__ import annotations

import pytest

from kmeshd.ratelimit import Throttle, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_allows_one_second_of_records() -> None:
    """With rate 5, five records pass, then take() says stop."""
    bucket = TokenBucket(5, Clock())
    assert [bucket.take() for _ in range(5)] == [True, True, True, True, False]
    assert not bucket.available()


@pytest.mark.parametrize(("elapsed", "available"), [(0.0, False), (0.1, False), (0.2, True)])
def test_refill_over_time(elapsed: float, available: bool) -> None:
    """Tokens come back at `rate` per second: one every 0.2 s at rate 5."""
    clock = Clock()
    bucket = TokenBucket(5, clock)
    for _ in range(5):
        bucket.take()
    clock.now += elapsed
    assert bucket.available() is available


def test_never_more_than_one_second_saved_up() -> None:
    """An idle hour still allows only `rate` records at once."""
    clock = Clock()
    bucket = TokenBucket(3, clock)
    clock.now += 3600
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_zero_is_unlimited() -> None:
    """Rate 0 never stops a record."""
    bucket = TokenBucket(0, Clock())
    assert all(bucket.take() for _ in range(100_000))
    assert bucket.available()


def test_throttle_lets_one_line_through_per_interval() -> None:
    """The first line passes, repeats within the interval don't, the next interval's does."""
    clock = Clock()
    throttle = Throttle(60.0, clock)
    seen = [throttle.ready()]
    clock.now += 59.9
    seen.append(throttle.ready())
    clock.now += 0.1
    seen.append(throttle.ready())
    assert seen == [True, False, True]
