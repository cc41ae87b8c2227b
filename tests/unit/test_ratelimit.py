"""Temporary blocks after repeated authentication failures, driven by a fake clock."""

from __future__ import annotations

import pytest

from softswitch.sip.ratelimit import (
    BLOCK_S,
    MAX_FAILURES,
    PER_SOURCE_FACTOR,
    WINDOW_S,
    AuthFailureLimiter,
)

pytestmark = pytest.mark.timeout(60)

SRC = "127.0.0.1:5070"
OTHER = "127.0.0.2:5070"
T0 = 500.0


def fail(
    limiter: AuthFailureLimiter, times: int, source: str = SRC, user: str | None = "1001", now: float = T0
) -> list[bool]:
    return [limiter.failure(source, user, now) for _ in range(times)]


def test_defaults() -> None:
    limiter = AuthFailureLimiter()
    assert (limiter.max_failures, limiter.window_s, limiter.block_s) == (MAX_FAILURES, WINDOW_S, BLOCK_S)
    assert limiter.max_failures_per_source == PER_SOURCE_FACTOR * MAX_FAILURES == 20
    assert limiter.max_entries == 100_000


def test_blocks_after_max_failures_within_the_window() -> None:
    limiter = AuthFailureLimiter(max_failures=5, window_s=60, block_s=30)
    for i in range(4):
        assert not limiter.failure(SRC, "1001", T0 + i * 10)
        assert not limiter.blocked(SRC, "1001", T0 + i * 10)
    assert limiter.failure(SRC, "1001", T0 + 59)  # the fifth, within 60 s of the first, starts the block
    assert limiter.blocked(SRC, "1001", T0 + 59)
    # Only that user from that source.
    assert not limiter.blocked(SRC, "1002", T0 + 59)
    assert not limiter.blocked(OTHER, "1001", T0 + 59)
    assert not limiter.blocked(SRC, None, T0 + 59)


def test_failures_spread_beyond_the_window_do_not_block() -> None:
    limiter = AuthFailureLimiter(max_failures=3, window_s=60, block_s=30)
    assert fail(limiter, 2, now=T0) == [False, False]
    # The window is anchored at the first failure: at T0 + 60 a new one starts.
    assert not limiter.failure(SRC, "1001", T0 + 60)
    assert not limiter.failure(SRC, "1001", T0 + 61)
    assert not limiter.blocked(SRC, "1001", T0 + 61)
    assert limiter.failure(SRC, "1001", T0 + 62)
    assert limiter.blocked(SRC, "1001", T0 + 62)


def test_unblocks_after_block_s_and_starts_afresh() -> None:
    limiter = AuthFailureLimiter(max_failures=3, window_s=60, block_s=30)
    assert fail(limiter, 3) == [False, False, True]
    assert limiter.blocked(SRC, "1001", T0 + 29.999)
    assert not limiter.blocked(SRC, "1001", T0 + 30)
    # A fresh count: one more failure does not re-block.
    assert not limiter.failure(SRC, "1001", T0 + 31)
    assert not limiter.blocked(SRC, "1001", T0 + 31)
    assert fail(limiter, 2, now=T0 + 32) == [False, True]


def test_block_ends_even_if_blocked_is_never_asked() -> None:
    limiter = AuthFailureLimiter(max_failures=2, window_s=60, block_s=30)
    assert fail(limiter, 2) == [False, True]
    assert not limiter.failure(SRC, "1001", T0 + 40)  # block over: this one starts a new count
    assert not limiter.blocked(SRC, "1001", T0 + 40)


def test_block_is_reported_once_and_not_extended() -> None:
    limiter = AuthFailureLimiter(max_failures=2, window_s=60, block_s=30)
    assert fail(limiter, 2) == [False, True]
    # Failures reported while blocked start nothing new and do not push the end of the block.
    assert fail(limiter, 5, now=T0 + 20) == [False] * 5
    assert limiter.blocked(SRC, "1001", T0 + 29)
    assert not limiter.blocked(SRC, "1001", T0 + 30)


def test_per_source_cap_across_users() -> None:
    limiter = AuthFailureLimiter(max_failures=5, window_s=60, block_s=30)  # source cap: 20
    started = []
    for n in range(20):
        user = f"{1000 + n % 10}"  # ten users, two failures each: no user reaches five
        started.append(limiter.failure(SRC, user, T0 + n))
    assert started == [False] * 19 + [True]
    # The whole source is blocked, for any user, including one never tried and none at all.
    for anyone in ("1000", "1009", "4242", None):
        assert limiter.blocked(SRC, anyone, T0 + 20)
    assert not limiter.blocked(OTHER, "1000", T0 + 20)
    assert not limiter.blocked(SRC, "1000", T0 + 19 + 30)


def test_per_source_cap_can_be_set() -> None:
    limiter = AuthFailureLimiter(max_failures=5, max_failures_per_source=3)
    assert [limiter.failure(SRC, user, T0) for user in ("a", "b", "c")] == [False, False, True]
    assert limiter.blocked(SRC, "d", T0)


def test_pair_and_source_block_starting_together_report_once() -> None:
    limiter = AuthFailureLimiter(max_failures=3, max_failures_per_source=3)
    assert fail(limiter, 3) == [False, False, True]
    assert limiter.blocked(SRC, "other", T0)


def test_success_resets_the_user_counter() -> None:
    limiter = AuthFailureLimiter(max_failures=3, window_s=60, block_s=30)
    assert fail(limiter, 2) == [False, False]
    limiter.success(SRC, "1001", T0 + 1)
    assert fail(limiter, 2, now=T0 + 2) == [False, False]
    assert not limiter.blocked(SRC, "1001", T0 + 2)
    assert limiter.failure(SRC, "1001", T0 + 3)


def test_success_for_one_user_does_not_reset_the_source_counter() -> None:
    # Otherwise one valid account would let a source guess at every other user without end.
    limiter = AuthFailureLimiter(max_failures=3, max_failures_per_source=4)
    assert [limiter.failure(SRC, user, T0) for user in ("a", "b", "c")] == [False, False, False]
    limiter.success(SRC, "valid", T0)
    assert limiter.failure(SRC, "d", T0)
    assert limiter.blocked(SRC, "valid", T0)


def test_success_of_another_source_changes_nothing() -> None:
    limiter = AuthFailureLimiter(max_failures=3)
    assert fail(limiter, 2) == [False, False]
    limiter.success(OTHER, "1001", T0)
    assert limiter.failure(SRC, "1001", T0)


def test_failures_without_a_username_count() -> None:
    limiter = AuthFailureLimiter(max_failures=2)
    assert fail(limiter, 2, user=None) == [False, True]
    assert limiter.blocked(SRC, None, T0)
    assert not limiter.blocked(SRC, "1001", T0)


def test_memory_bound_under_many_sources() -> None:
    limiter = AuthFailureLimiter(max_failures=5, max_entries=1_000)
    for n in range(100_000):
        limiter.failure(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}:5060", "1001", T0 + n * 0.001)
        assert len(limiter) <= 2 * 1_000
    assert len(limiter) == 2 * 1_000


def test_memory_bound_with_default_limit() -> None:
    limiter = AuthFailureLimiter()
    for n in range(110_000):
        limiter.failure(f"s{n}", f"u{n}", T0)
    assert len(limiter) == 2 * 100_000


def test_a_block_in_use_survives_a_flood_of_new_sources() -> None:
    limiter = AuthFailureLimiter(max_failures=3, window_s=60, block_s=600, max_entries=1_000)
    attacker = "127.0.0.9:5060"
    assert fail(limiter, 3, source=attacker) == [False, False, True]
    for n in range(100_000):
        now = T0 + n * 0.001
        limiter.failure(f"flood-{n}", "1001", now)
        if n % 500 == 0:  # the attacker keeps knocking; each check keeps the block resident
            assert limiter.blocked(attacker, "1001", now)
    assert limiter.blocked(attacker, "1001", T0 + 100)
    assert not limiter.blocked(attacker, "1001", T0 + 600)


def test_the_oldest_counter_is_evicted_first() -> None:
    limiter = AuthFailureLimiter(max_failures=2, max_entries=3)
    limiter.failure("a", "u", T0)
    limiter.failure("b", "u", T0 + 1)
    limiter.failure("c", "u", T0 + 2)
    limiter.failure("a", "u", T0 + 3)  # touches "a": blocks it, and makes "b" the oldest
    assert limiter.blocked("a", "u", T0 + 3)
    limiter.failure("d", "u", T0 + 4)  # evicts "b"
    assert limiter.failure("c", "u", T0 + 5)  # "c" was still counted
    assert not limiter.failure("b", "u", T0 + 5)  # "b" starts again from one


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_failures": 0},
        {"max_failures_per_source": 0},
        {"window_s": 0},
        {"block_s": -1},
        {"max_entries": 0},
    ],
)
def test_invalid_configuration_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AuthFailureLimiter(**kwargs)  # type: ignore[arg-type]
