"""Retry delays: doubling, jittered, capped, reset by a success."""

from __future__ import annotations

from kmeshd.backoff import Backoff


def test_backoff_doubles_with_jitter_up_to_its_cap_and_resets() -> None:
    """Delays double from the base to the cap, each within the upper half of its ceiling."""
    low = Backoff(base=1, cap=8, rng=lambda: 0.0)
    high = Backoff(base=1, cap=8, rng=lambda: 1.0)
    assert [low.next() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert [high.next() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    high.reset()
    assert high.next() == 1
