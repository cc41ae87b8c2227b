"""The media pool: real worker processes (real PJSUA2) supervised by the controller side.

Legs are originated (RFC 3261 §13.2.1) to a SIPp UAS on 127.0.0.1 that stands in for the edge. A worker
killed with SIGKILL mid-call cannot send BYE; what the pool owes the controller instead is a synthetic
``leg.state`` disconnected for each of that worker's legs and a new worker in its slot.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from softswitch.media.pool import (
    HEALTH_INTERVAL_S,
    HEALTH_MAX_MISSES,
    HEALTH_TIMEOUT_S,
    WORKER_DIED_REASON,
    MediaPool,
    WorkerHandle,
    split_port_range,
)
from softswitch.media.protocol import CommandError, Event, Hangup, LegState, Originate, WorkerReady
from tests.integration.peers import LOOPBACK, Sipp, SippProcess, free_port

pytestmark = pytest.mark.integration

RTP_SPAN = 64  # ports for the whole pool: 32 per worker with two workers (LEGS_PER_WORKER needs 16)
LEGS_PER_WORKER = 8  # --max-calls: keeps each worker's capacity probe short
EVENT_TIMEOUT_S = 10.0  # call set-up on loopback takes milliseconds
RESTART_TIMEOUT_S = 30.0  # back-off (0.5 s) + spawn + probe + worker.ready
UAS_CALLS = 10  # calls the SIPp UAS accepts before it would exit; it is stopped at the end anyway
UAS_TIMEOUT_S = 90.0
# Health checks: a stopped worker misses HEALTH_MAX_MISSES pings (interval + timeout each) before the kill.
HEALTH_DETECT_S = (HEALTH_INTERVAL_S + HEALTH_TIMEOUT_S) * (HEALTH_MAX_MISSES + 1) + EVENT_TIMEOUT_S


class Collector:
    """Every (worker_id, event) the pool published, and a bounded wait for one."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Event]] = []

    def __call__(self, worker_id: str, event: Event) -> None:
        self.items.append((worker_id, event))

    async def wait(
        self, where: Callable[[str, Event], bool], timeout_s: float = EVENT_TIMEOUT_S
    ) -> tuple[str, Event]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for item in self.items:
                if where(*item):
                    return item
            await asyncio.sleep(0.02)
        raise AssertionError(f"no matching event within {timeout_s:g} s: {self.items}")


def _processes_with(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker`` (the pool's control address)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def _start_uas(sipp: Sipp) -> tuple[SippProcess, int]:
    port = free_port()
    uas = sipp.start(
        "uas_record_route",
        local_port=port,
        calls=UAS_CALLS,
        sets={"media": "no"},
        timeout_s=UAS_TIMEOUT_S,
        extra_args=["-s", "callee"],
    )
    return uas, port


async def _originate(
    pool: MediaPool, events: Collector, worker: WorkerHandle, leg: str, uas_port: int
) -> str:
    result = await pool.command(
        worker.id,
        Originate(
            leg=leg, uri=f"sip:callee@{LOOPBACK}:{uas_port}", from_uri="sip:1001@127.0.0.1", timeout_s=5
        ),
    )
    await events.wait(lambda w, e: isinstance(e, LegState) and e.leg == leg and e.state == "confirmed")
    assert leg in worker.legs
    sip_call_id = result["sip_call_id"]
    assert isinstance(sip_call_id, str) and sip_call_id
    return sip_call_id


def test_port_ranges_split_even_and_disjoint() -> None:
    assert split_port_range(20000, 29999, 2) == [(20000, 24999), (25000, 29999)]
    parts = split_port_range(20001, 20100, 3)
    assert all(low % 2 == 0 and (high - low + 1) % 2 == 0 for low, high in parts), parts
    assert all(a[1] < b[0] for a, b in itertools.pairwise(parts)), parts
    assert parts[0][0] >= 20001 and parts[-1][1] <= 20100, parts
    with pytest.raises(ValueError, match="too small"):
        split_port_range(20000, 20005, 2)


@pytest.mark.timeout(150)
async def test_pool_balances_and_replaces_a_killed_worker(tmp_path: Path, sipp: Sipp) -> None:
    uas, uas_port = _start_uas(sipp)
    rtp_low = free_port(span=RTP_SPAN, udp=True, tcp=False)
    pool = MediaPool(
        workers=2,
        rtp_ports=(rtp_low, rtp_low + RTP_SPAN - 1),
        edge_host=LOOPBACK,
        edge_port=uas_port,
        max_calls_per_worker=LEGS_PER_WORKER,
    )
    events = Collector()
    pool.subscribe(events)
    marker = ""
    try:
        await pool.start()
        marker = f"{LOOPBACK}:{pool.control_port}"
        first, second = pool.workers
        assert first.ready and second.ready
        assert first.id != second.id and first.sip_port != second.sip_port
        assert first.capacity == second.capacity == LEGS_PER_WORKER
        assert first.engine == "high-capacity", first
        assert pool.worker_for_address(LOOPBACK, first.sip_port) is first
        assert pool.is_worker_address(LOOPBACK, second.sip_port)
        assert not pool.is_worker_address(LOOPBACK, uas_port)
        assert first.rtp_ports[1] < second.rtp_ports[0]
        ready_ids = {w for w, e in events.items if isinstance(e, WorkerReady)}
        assert ready_ids == {first.id, second.id}

        # choose() fills the emptier worker first.
        target = pool.choose()
        assert target is not None
        call_id_1 = await _originate(pool, events, target, "c-1", uas_port)
        other = pool.choose()
        assert other is not None and other is not target, (target, other)
        await _originate(pool, events, other, "c-2", uas_port)
        assert target.free == other.free == LEGS_PER_WORKER - 1

        with pytest.raises(CommandError) as failed:
            await pool.command(target.id, Hangup("no-such-leg"))
        assert failed.value.code == "no_such_leg"
        with pytest.raises(CommandError) as unknown:
            await pool.command("w999", Hangup("c-1"))
        assert unknown.value.code == "invalid_argument"

        # kill -9 the worker holding c-1, mid-call.
        os.kill(target.pid, signal.SIGKILL)
        worker_id, died = await events.wait(
            lambda w, e: isinstance(e, LegState) and e.leg == "c-1" and e.state == "disconnected"
        )
        assert worker_id == target.id
        assert isinstance(died, LegState)
        assert (died.state, died.sip_code, died.reason, died.released_by) == (
            "disconnected",
            500,
            WORKER_DIED_REASON,
            "system",
        ), died
        assert died.sip_call_id == call_id_1
        with pytest.raises(CommandError):
            await pool.command(target.id, Hangup("c-1"))

        new_id, ready = await events.wait(
            lambda w, e: isinstance(e, WorkerReady) and w not in (first.id, second.id), RESTART_TIMEOUT_S
        )
        replacement = pool.workers[target.slot]
        assert replacement.id == new_id != target.id
        assert replacement.ready and replacement.restarts == 1 and not replacement.legs
        assert replacement.rtp_ports == target.rtp_ports
        assert isinstance(ready, WorkerReady) and ready.pid == replacement.pid != target.pid
        assert other.legs == {"c-2"}  # the other worker's call was not touched
        assert pool.choose() is replacement  # it is the emptier one now
        await _originate(pool, events, replacement, "c-3", uas_port)
    finally:
        await pool.stop()
        uas.stop()
    assert marker and _processes_with(marker) == [], "a worker process outlived stop()"
    for handle in pool.workers:
        assert handle.process is not None and handle.process.returncode is not None
        assert not handle.legs
    # The surviving legs were hung up by the workers themselves on Shutdown (released by "system").
    ended = [e for _, e in events.items if isinstance(e, LegState) and e.state == "disconnected"]
    assert {(e.leg, e.released_by) for e in ended} >= {("c-2", "system"), ("c-3", "system")}, ended


@pytest.mark.timeout(90)
async def test_auto_starts_one_worker_per_core_with_the_high_capacity_engine() -> None:
    # A wider range than the other tests: with a few ports per worker, one port held by another process
    # can leave a worker no room for a single leg.
    span = 4 * RTP_SPAN
    rtp_low = free_port(span=span, udp=True, tcp=False)
    pool = MediaPool(
        workers="auto", rtp_ports=(rtp_low, rtp_low + span - 1), edge_host=LOOPBACK, edge_port=free_port()
    )
    try:
        await pool.start()
        cores = os.cpu_count() or 1
        assert len(pool.workers) == cores, pool.workers
        for handle in pool.workers:
            assert handle.ready and handle.engine == "high-capacity", handle
            # The probe found the real limit here: the worker's share of RTP ports (2 per leg).
            assert 0 < handle.capacity <= (handle.rtp_ports[1] - handle.rtp_ports[0] + 1) // 2, handle
        ranges = sorted(handle.rtp_ports for handle in pool.workers)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges)), ranges
    finally:
        await pool.stop()
    assert _processes_with(f"{LOOPBACK}:{pool.control_port}") == []


@pytest.mark.timeout(120)
async def test_unresponsive_worker_is_killed_and_replaced(sipp: Sipp) -> None:
    """A worker whose main loop stops (here: SIGSTOP, as a hung library call would look) misses its health
    checks; the pool kills it, fails its legs with a cause and starts a new worker in its slot."""
    uas, uas_port = _start_uas(sipp)
    rtp_low = free_port(span=RTP_SPAN, udp=True, tcp=False)
    pool = MediaPool(
        workers=1,
        rtp_ports=(rtp_low, rtp_low + RTP_SPAN - 1),
        edge_host=LOOPBACK,
        edge_port=uas_port,
        max_calls_per_worker=LEGS_PER_WORKER,
    )
    events = Collector()
    pool.subscribe(events)
    try:
        await pool.start()
        (worker,) = pool.workers
        await _originate(pool, events, worker, "h-1", uas_port)
        await asyncio.sleep(HEALTH_INTERVAL_S * 1.5)
        assert worker.missed_pings == 0  # a live worker answers its pings

        os.kill(worker.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, died = await events.wait(
            lambda w, e: isinstance(e, LegState) and e.leg == "h-1" and e.state == "disconnected",
            HEALTH_DETECT_S,
        )
        detected_s = time.monotonic() - stopped_at
        assert isinstance(died, LegState) and died.reason == WORKER_DIED_REASON, died
        # Not before HEALTH_MAX_MISSES checks had their time to fail.
        assert detected_s >= HEALTH_TIMEOUT_S * HEALTH_MAX_MISSES, detected_s
        assert worker.process is not None and worker.process.returncode == -signal.SIGKILL

        new_id, _ = await events.wait(
            lambda w, e: isinstance(e, WorkerReady) and w != worker.id, RESTART_TIMEOUT_S
        )
        (replacement,) = pool.workers
        assert replacement.id == new_id and replacement.restarts == 1 and replacement.ready
        await _originate(pool, events, replacement, "h-2", uas_port)
    finally:
        await pool.stop()
        uas.stop()
