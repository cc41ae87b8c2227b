"""A media worker killed mid-call: both phones are told (BYE from the edge), the pool starts a new worker
and the next call works (ARCHITECTURE.md: a PJSIP fault kills one worker's legs, not the switch)."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import PhoneFactory, Tones
from tests.integration.helpers import RunningSoftswitch

pytestmark = pytest.mark.integration

REGISTER_TIMEOUT_S = 10.0
CALL_SETUP_TIMEOUT_S = 15.0
BYE_TIMEOUT_S = 10.0  # the pool notices the death at once; the edge's BYE is one datagram
RESTART_TIMEOUT_S = 30.0  # backoff, spawn, capacity probe


def worker_pids(node_pid: int) -> set[int]:
    """PIDs of the node's media worker processes (its children running softswitch.media.worker)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == node_pid and b"softswitch.media.worker" in cmdline:
            found.add(int(entry.name))
    return found


def wait_for(predicate: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.timeout(120)
def test_killed_worker_ends_its_calls_and_is_replaced(
    edge: RunningSoftswitch, phones: PhoneFactory, tones: Tones
) -> None:
    caller = phones.start("1001", tones.a, registrar_port=edge.sip_port, transport="udp")
    callee = phones.start("1002", tones.b, registrar_port=edge.sip_port, transport="udp")
    caller.wait_registered(REGISTER_TIMEOUT_S)
    callee.wait_registered(REGISTER_TIMEOUT_S)
    before = worker_pids(edge.pid)
    assert before, "the node runs no media worker"

    caller.dial(f"sip:1002@127.0.0.1:{edge.sip_port}")
    for phone in (caller, callee):
        phone.wait_event("CALL_ESTABLISHED", CALL_SETUP_TIMEOUT_S)
    for pid in before:
        os.kill(pid, signal.SIGKILL)

    # Neither phone is left holding a dead call: the edge sent each a BYE.
    for phone in (caller, callee):
        phone.wait_event("CALL_CLOSED", BYE_TIMEOUT_S)
    records = edge.log_records()
    assert any(r.get("event") == "ended calls of a failed media worker" for r in records)
    ended = [r for r in records if r.get("event") == "leg ended"]
    assert len(ended) == 2 and {r.get("final_status") for r in ended} == {"failed"}, ended
    assert {r.get("released_by") for r in ended} == {"system"}

    assert wait_for(lambda: len(worker_pids(edge.pid) - before) == len(before), RESTART_TIMEOUT_S)
    assert wait_for(
        lambda: any(
            r.get("event") == "media worker ready" and r.get("pid") in worker_pids(edge.pid)
            for r in edge.log_records()
        ),
        RESTART_TIMEOUT_S,
    ), "the new worker never became ready"
    # /metrics shows the slot's restart and the new worker's probed capacity.
    with urllib.request.urlopen(edge.http_url("/metrics"), timeout=5) as response:
        metrics = response.read().decode()
    assert re.search(r'^softswitch_worker_restarts_total\{slot="0"\} 1\.0$', metrics, re.M), metrics
    capacity = re.search(r'^softswitch_worker_capacity_legs\{slot="0"\} (\S+)$', metrics, re.M)
    assert capacity is not None and float(capacity.group(1)) > 0, metrics
    # The node serves calls again on the new worker.
    caller.dial(f"sip:1002@127.0.0.1:{edge.sip_port}")
    for phone in (caller, callee):
        phone.wait_event("CALL_ESTABLISHED", CALL_SETUP_TIMEOUT_S)
    caller.hangup()
    for phone in (caller, callee):
        phone.wait_event("CALL_CLOSED", CALL_SETUP_TIMEOUT_S)
