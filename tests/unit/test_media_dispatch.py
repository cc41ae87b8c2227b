"""Which worker a new call goes to (ARCHITECTURE.md: the most free slots; a conversation never spans
workers), without processes: the pool's view of its workers is set up directly."""

from __future__ import annotations

from softswitch.media.pool import MediaPool, WorkerHandle


def _pool(*free: int, capacity: int = 10) -> MediaPool:
    pool = MediaPool(workers=len(free), rtp_ports=(20000, 29999), edge_host="127.0.0.1", edge_port=5060)
    for slot, n in enumerate(free):
        handle = WorkerHandle(id=f"w{slot + 1}", slot=slot, rtp_ports=(0, 0), capacity=capacity, ready=True)
        handle.legs = {f"x{slot}-{i}" for i in range(capacity - n)}
        pool._slots.append(handle)
    return pool


def test_the_worker_with_the_most_free_slots_wins() -> None:
    pool = _pool(3, 7, 5)
    chosen = pool.choose()
    assert chosen is not None and chosen.id == "w2"


def test_ties_go_round_the_workers() -> None:
    pool = _pool(10, 10, 10)
    assert [h.id for h in (pool.choose(), pool.choose(), pool.choose(), pool.choose()) if h] == [
        "w1", "w2", "w3", "w1",
    ]  # fmt: skip


def test_full_or_starting_workers_are_never_chosen() -> None:
    pool = _pool(0, 0)
    assert pool.choose() is None
    pool = _pool(0, 4)
    pool._slots[1].ready = False  # restarting: capacity not known yet
    assert pool.choose() is None
