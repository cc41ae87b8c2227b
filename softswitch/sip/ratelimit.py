"""Temporary blocks after repeated authentication failures (RFC 3261 §26.1.1 threat: password guessing).

Sans-IO: the caller passes `now`. The edge asks `blocked(source, user, now)` before judging credentials
and answers 403 while it is true; it reports each failed verification with `failure(...)` and each
success with `success(...)`.

Two kinds of counters: per (source, user), so one phone with a wrong password is stopped without
touching the others behind the same address, and per source, so one address trying many usernames is
stopped too (default cap: `PER_SOURCE_FACTOR` × the per-user limit).

Window: fixed, anchored at the first failure of a counter, and reset `window_s` later. A sliding log would
be exact but costs one timestamp per failure per key; the anchored window costs two numbers per key and
still bounds a guesser to fewer than `max_failures` attempts per `window_s` in the long run, which is the
property that matters against password guessing. Its known slack: up to 2 × (max_failures - 1) failures
may fall within `window_s` across a window boundary without a block.

Memory: sources are attacker-chosen (a UDP source address is trivial to vary), so each table holds at
most `max_entries` counters and drops the least recently touched one beyond that. A block that keeps
being consulted is touched on every `blocked()` call and so stays resident.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

#: Default failures of one (source, user) within `window_s` that start a block. Five leaves room for a
#: user mistyping a password a few times, while a guesser gets only a handful of tries per window.
MAX_FAILURES = 5
#: Default counting window, seconds.
WINDOW_S = 60.0
#: Default block duration, seconds: long enough to make guessing slow, short enough that a user who
#: fixed a typo is not locked out for long.
BLOCK_S = 60.0
#: A source may fail this many times the per-user limit, across all users, before it is blocked as a
#: whole: a NAT with several phones still works while one of them is misconfigured, but an address
#: walking through usernames is stopped.
PER_SOURCE_FACTOR = 4
#: Default counters per table. At ~200 bytes each the two tables stay within ~40 MB however many
#: addresses an attacker uses; a real deployment sees far fewer distinct failing sources per window.
MAX_ENTRIES = 100_000

_Key = TypeVar("_Key")


@dataclass(slots=True)
class _Counter:
    failures: int
    window_start: float
    blocked_until: float | None = None


class _CounterTable(OrderedDict[_Key, _Counter]):
    """Failure counters in least-recently-touched order, bounded in size."""

    def __init__(self, limit: int, max_entries: int, window_s: float, block_s: float) -> None:
        super().__init__()
        self.limit = limit
        self.max_entries = max_entries
        self.window_s = window_s
        self.block_s = block_s

    def is_blocked(self, key: _Key, now: float) -> bool:
        counter = self.get(key)
        if counter is None or counter.blocked_until is None:
            return False
        if now >= counter.blocked_until:
            del self[key]  # the block is over: start afresh
            return False
        self.move_to_end(key)
        return True

    def record(self, key: _Key, now: float) -> bool:
        """Count one failure; True if it started a block."""
        counter = self.get(key)
        if counter is not None:
            if counter.blocked_until is not None:
                if now < counter.blocked_until:
                    self.move_to_end(key)
                    return False  # already blocked: the caller should not have judged credentials
                counter = None  # block over
            elif now - counter.window_start >= self.window_s:
                counter = None  # window over
        if counter is None:
            counter = _Counter(failures=0, window_start=now)
            self[key] = counter
            while len(self) > self.max_entries:
                self.popitem(last=False)
        self.move_to_end(key)
        counter.failures += 1
        if counter.failures >= self.limit:
            counter.blocked_until = now + self.block_s
            return True
        return False


class AuthFailureLimiter:
    """Blocks a (source, user) or a whole source after repeated digest failures (RFC 3261 §22, §26).

    `source` is whatever identifies the sender to the caller (for the edge, "ip:port" or the IP alone);
    `user` is the username of the credentials, or None when there was none to read.
    """

    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        block_s: float = BLOCK_S,
        max_failures_per_source: int | None = None,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        if max_failures_per_source is None:
            max_failures_per_source = PER_SOURCE_FACTOR * max_failures
        if max_failures < 1 or max_failures_per_source < 1:
            raise ValueError("failure limits must be at least 1")
        if window_s <= 0 or block_s <= 0:
            raise ValueError("window_s and block_s must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_failures = max_failures
        self.max_failures_per_source = max_failures_per_source
        self.window_s = float(window_s)
        self.block_s = float(block_s)
        self.max_entries = max_entries
        self._pairs: _CounterTable[tuple[str, str | None]] = _CounterTable(
            max_failures, max_entries, self.window_s, self.block_s
        )
        self._sources: _CounterTable[str] = _CounterTable(
            max_failures_per_source, max_entries, self.window_s, self.block_s
        )

    def __len__(self) -> int:
        """Counters held, both tables together (at most 2 × `max_entries`)."""
        return len(self._pairs) + len(self._sources)

    def blocked(self, source: str, user: str | None, now: float) -> bool:
        """True while (source, user) or the source as a whole is blocked."""
        source_blocked = self._sources.is_blocked(source, now)
        pair_blocked = self._pairs.is_blocked((source, user), now)
        return source_blocked or pair_blocked

    def failure(self, source: str, user: str | None, now: float) -> bool:
        """Record one failed authentication; True if it started a block (log it once, with the source)."""
        started_pair = self._pairs.record((source, user), now)
        started_source = self._sources.record(source, now)
        return started_pair or started_source

    def success(self, source: str, user: str, now: float) -> None:
        """Clear the (source, user) counter after a successful authentication.

        The per-source counter is left alone: otherwise one valid account would let a source reset its
        count between guesses at other users.
        """
        self._pairs.pop((source, user), None)
