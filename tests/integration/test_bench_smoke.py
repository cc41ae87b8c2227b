"""The benchmarks' smoke runs. The call benchmark: a few calls SIPp → SIPp and SIPp → softswitch → SIPp,
with RTP.

`bench/call_bench.py --smoke` places SMOKE_CALLS calls at SMOKE_RATE calls/s straight to the SIPp callee
and then through a freshly started node (the INVITE answers a 407, RFC 3261 §22.3; the B2BUA bridges two
legs on a media worker; ACK and BYE follow the Record-Route, §12.2.1.1), each call carrying G.711 RTP
(RFC 3550) for a second. The full benchmark never runs in CI; this keeps its code paths working: the
report must show every call completed on both targets, set-up times measured, and the node's controller
and media worker measured.

`bench/event_bench.py --smoke` does the same for the event benchmark: a few calls through a node with
each broker (embedded, Mosquitto) and a small burst through the MQTT sink; every event must be matched
and every burst delivered. No timing is asserted: performance is measured by the benchmarks themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench" / "call_bench.py"
SMOKE_CALLS = 5  # bench/call_bench.py SMOKE_CALLS
SMOKE_RATE = 2.0  # bench/call_bench.py SMOKE_RATE
#: Seconds the smoke run may take: two phases of 5 calls at 2/s with a 1 s hold, plus a node's start-up
#: (its media worker probes its capacity) and stop.
SMOKE_TIMEOUT_S = 90.0


def _run_smoke(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(report_path), "--work", str(tmp_path / "work")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert report_path.exists(), f"no report (exit {done.returncode})\n{done.stdout}\n{done.stderr}"
    return done, json.loads(report_path.read_text())


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 30)
def test_smoke_run_completes_every_call_on_both_targets(tmp_path: Path) -> None:
    done, report = _run_smoke(tmp_path)
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, output

    steps = {step["target"]: step for step in report["steps"]}
    assert sorted(steps) == ["baseline", "softswitch"], output
    for target, step in steps.items():
        assert step["calls"] == SMOKE_CALLS and step["offered_rate"] == SMOKE_RATE, step
        assert step["successful"] == SMOKE_CALLS, (target, step)
        assert step["failed"] == 0 and step["clean"] and not step["watchdog"], (target, step)
        # One INVITE → 200 time per call (rtd 1 of uac_record_route_hold.xml), all of them plausible.
        setup = step["setup_ms"]
        assert setup["n"] == SMOKE_CALLS, (target, setup)
        assert 0 <= setup["p50"] <= setup["p95"] <= setup["p99"] < 5000, (target, setup)

    node = steps["softswitch"]["processes"]
    roles = [p["role"] for p in node]
    assert roles.count("controller") == 1 and roles.count("worker") == 1, node
    for process in node:
        if process["role"] in ("controller", "worker"):
            assert process["cpu_s"] is not None and process["cpu_s"] > 0, process
            assert process["rss_mb_peak"] > 0, process
    assert steps["softswitch"]["softswitch_cpu_ms_per_call"] > 0, steps["softswitch"]

    summary = report["summary"]
    assert summary["baseline"]["clean_rate_offered"] == SMOKE_RATE, summary
    assert summary["softswitch"]["clean_rate_offered"] == SMOKE_RATE, summary


# -- bench/event_bench.py --smoke -------------------------------------------------------------------------

EVENT_BENCH = REPO_ROOT / "bench" / "event_bench.py"
EVENT_SMOKE_CALLS = 4  # bench/event_bench.py SMOKE_CALLS
EVENT_SMOKE_BURST = 500  # bench/event_bench.py SMOKE_BURST
#: Caller-leg events matched per call: call.initiated, call.answered, call.ended.
EVENTS_PER_CALL = 3
#: Seconds the event benchmark's smoke run may take: per broker a node's start, a registration, a few
#: calls and a small burst (it takes about 30 s alone on 2 cores).
EVENT_SMOKE_TIMEOUT_S = 120.0


@pytest.mark.timeout(EVENT_SMOKE_TIMEOUT_S + 30)
def test_event_bench_smoke_run_matches_every_event_on_both_brokers(tmp_path: Path) -> None:
    """`bench/event_bench.py --smoke`: calls through a node with the embedded broker and with Mosquitto,
    every caller-leg event matched by SIP Call-ID to SIPp's trace of the message that caused it, and a
    burst through the sink acknowledged and delivered in full. Completion only: no timing is asserted."""
    report_path = tmp_path / "events.json"
    done = subprocess.run(
        [
            sys.executable, str(EVENT_BENCH), "--smoke", "--json", str(report_path),
            "--work", str(tmp_path / "work"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=EVENT_SMOKE_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    output = f"{done.stdout}\n{done.stderr}"
    assert report_path.exists(), f"no report (exit {done.returncode})\n{output}"
    report = json.loads(report_path.read_text())
    assert done.returncode == 0, output
    assert report["complete"], output

    calls = {r["broker"]: r for r in report["calls"]}
    assert sorted(calls) == ["embedded", "mosquitto"], output
    for broker, r in calls.items():
        assert r["successful"] == EVENT_SMOKE_CALLS and r["failed"] == 0, (broker, r)
        assert r["all_matched"], (broker, r)
        for kind in ("call.initiated", "call.answered", "call.ended"):
            assert r["expected"][kind] == r["matched"][kind] == EVENT_SMOKE_CALLS, (broker, kind, r)
            assert r["latency_ms"][kind]["n"] == EVENT_SMOKE_CALLS, (broker, kind, r)
        assert r["latency_ms"]["all"]["n"] == EVENT_SMOKE_CALLS * EVENTS_PER_CALL, (broker, r)
        assert r["controller_cpu_s"] > 0, (broker, r)

    bursts = {r["broker"]: r for r in report["throughput"]}
    assert sorted(bursts) == ["embedded", "mosquitto"], output
    for broker, r in bursts.items():
        assert r["burst"] == EVENT_SMOKE_BURST, (broker, r)
        assert r["acknowledged"] == r["delivered"] == EVENT_SMOKE_BURST and r["complete"], (broker, r)
