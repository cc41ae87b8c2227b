"""The media engine: the ``pjsua2`` module installed in the project's venv.

ARCHITECTURE.md ("The one hard fact"): the PyPI wheels hold 4 or 32 concurrent calls per process, so the
project builds its own pjsua2 (``scripts/build-media-engine.sh``, ``make media-engine``). These tests
check the module that is installed, not a copy: they fail when it is missing or is the fallback wheel.

- capacity: one endpoint calls itself on loopback (RFC 3261 section 13 INVITE sessions, answered with
  200 in ``onIncomingCall``; each self-call is two legs) and must hold every leg at once, well past the
  32 of the fallback wheel;
- threads: the SWIG module must be built with ``-threads``, i.e. release the GIL while the library
  polls (``libHandleEvents``), or a DTMF callback under load aborts the process;
- the build script derives its private ``deb-src`` list from the system's apt sources (one-line and
  deb822 formats) without touching them.

Every probe runs in a child process (this file run as a script): one ``pj.Endpoint`` per process, and a
fault in the library fails the test instead of killing the test run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-media-engine.sh"

# Capacity of the fallback wheel (pjsua2-python 2.10.post6): PJSUA_MAX_CALLS 32.
FALLBACK_WHEEL_LEGS = 32
# Self-calls the test makes: 64 calls are 128 legs, four times what the fallback wheel holds.
PROBE_SELF_CALLS = 64
# Legs the installed engine must hold at once to pass.
MIN_CONCURRENT_LEGS = 2 * PROBE_SELF_CALLS
# Wall-clock bound of one probe child process (setup of 128 legs takes well under a second).
PROBE_TIMEOUT_S = 60.0
# Bound of the whole capacity probe loop inside the child.
PROBE_SETUP_DEADLINE_S = 30.0
# How long every leg must stay up once all are confirmed.
PROBE_HOLD_S = 1.0
# makeCall()s sent between two polls: keeps the burst of INVITEs below the socket buffer.
PROBE_BATCH = 16
# libHandleEvents() poll slice (ms).
POLL_MS = 10
# Time spent inside libHandleEvents() for the GIL measurement.
GIL_MEASURE_S = 0.3
# A module built with -threads lets another Python thread run at (nearly) full speed while the
# library polls; one built without holds the GIL and the other thread gets a few switch intervals.
GIL_FREE_RATIO_MIN = 0.5
# Bound of the build script's --print-deb-src run (reads a few files, no network).
SCRIPT_TIMEOUT_S = 30.0
# Bound of each test as a whole.
TEST_TIMEOUT_S = 90

pytestmark = [pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT_S)]


# --------------------------------------------------------------------------- child process side


def _new_endpoint(pj: Any, max_calls: int) -> Any:
    """Create and start one endpoint the way a media worker does (TESTING.md, PJSUA2 facts).

    ``threadCnt = 0`` and no media thread: the caller's thread owns the library and polls it with
    ``libHandleEvents``; null sound device; logging off.
    """
    ep = pj.Endpoint()
    ep.libCreate()
    ep_cfg = pj.EpConfig()
    ep_cfg.uaConfig.threadCnt = 0
    ep_cfg.uaConfig.mainThreadOnly = False
    ep_cfg.uaConfig.maxCalls = max_calls
    ep_cfg.medConfig.threadCnt = 0
    ep_cfg.logConfig.level = 0
    ep_cfg.logConfig.consoleLevel = 0
    ep.libInit(ep_cfg)
    ep.audDevManager().setNullDev()
    return ep


def probe_capacity(self_calls: int) -> dict[str, Any]:
    """Hold ``self_calls`` loopback calls (2 legs each) at once and report how many legs were held.

    RFC 3261 section 13: each outgoing INVITE goes to the endpoint's own UDP transport and is answered
    200 OK by ``onIncomingCall``; a leg counts as held when its INVITE session is CONFIRMED (ACK seen,
    section 13.2.2.4) and it is still confirmed after ``PROBE_HOLD_S``.
    """
    import pjsua2 as pj

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        # Two UDP sockets (RTP, RTCP) per leg: the default soft limit of 1024 caps a worker at ~500.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    default_max_calls = int(pj.UaConfig().maxCalls)  # = PJSUA_MAX_CALLS of a 2.12+ build
    ep = _new_endpoint(pj, 2 * self_calls)
    tp_cfg = pj.TransportConfig()
    tp_cfg.boundAddress = "127.0.0.1"
    tp_cfg.port = 0
    tp_id = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tp_cfg)
    port = int(ep.transportGetInfo(tp_id).localName.split(":")[-1])
    ep.libStart()

    calls: dict[int, Any] = {}
    confirmed: set[int] = set()
    disconnected: list[tuple[int, int, str]] = []

    class ProbeCall(pj.Call):  # type: ignore[misc]
        def onCallState(self, prm: Any) -> None:
            info = self.getInfo()
            if info.state == pj.PJSIP_INV_STATE_CONFIRMED:
                confirmed.add(info.id)
            elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                confirmed.discard(info.id)
                disconnected.append((info.id, int(info.lastStatusCode), str(info.lastReason)))

    class ProbeAccount(pj.Account):  # type: ignore[misc]
        def onIncomingCall(self, prm: Any) -> None:
            call = ProbeCall(self, prm.callId)
            calls[call.getId()] = call  # the only reference: a Call nobody holds is freed (603)
            answer = pj.CallOpParam()
            answer.statusCode = 200
            call.answer(answer)

    def make_call(account: Any, uri: str) -> None:
        # No local variable may outlive libDestroy() holding a Call: its destructor would touch
        # the destroyed library (an assert aborts the process).
        call = ProbeCall(account)
        call.makeCall(uri, pj.CallOpParam(True))
        calls[call.getId()] = call

    acc_cfg = pj.AccountConfig()
    acc_cfg.idUri = f"sip:probe@127.0.0.1:{port}"
    acc_cfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    acc_cfg.mediaConfig.transportConfig.port = 0
    account = ProbeAccount()
    account.create(acc_cfg)

    started = time.monotonic()
    made = 0
    make_error = ""
    for i in range(self_calls):
        try:
            make_call(account, f"sip:probe@127.0.0.1:{port}")
        except pj.Error as exc:
            make_error = f"makeCall #{i + 1}: {exc.info()}"
            break
        made += 1
        if made % PROBE_BATCH == 0:
            ep.libHandleEvents(POLL_MS)
    while len(confirmed) < 2 * made and time.monotonic() - started < PROBE_SETUP_DEADLINE_S:
        ep.libHandleEvents(POLL_MS)
    setup_s = time.monotonic() - started
    peak = len(confirmed)
    hold_until = time.monotonic() + PROBE_HOLD_S
    while time.monotonic() < hold_until:
        ep.libHandleEvents(POLL_MS)
    held = len(confirmed)
    early_disconnects = disconnected[:5]  # any leg that ended before we hung up
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    ep.hangupAllCalls()
    drain_until = time.monotonic() + PROBE_SETUP_DEADLINE_S
    while len(disconnected) < len(calls) and time.monotonic() < drain_until:
        ep.libHandleEvents(POLL_MS)
    calls.clear()
    account.shutdown()
    del account
    gc.collect()
    version = str(ep.libVersion().full)
    ep.libDestroy()
    return {
        "engine_version": version,
        "default_max_calls": default_max_calls,
        "self_calls_made": made,
        "legs_confirmed_peak": peak,
        "legs_held": held,
        "setup_s": round(setup_s, 3),
        "make_call_error": make_error,
        "early_disconnects": early_disconnects,
        "max_rss_kib": rss_kib,
    }


def measure_gil_release() -> dict[str, Any]:
    """Ratio of another thread's progress while the library polls to its progress while we sleep.

    ~1 when ``libHandleEvents`` releases the GIL (SWIG ``-threads``), ~0 when it holds it.
    """
    import pjsua2 as pj

    ep = _new_endpoint(pj, 4)
    ep.libStart()
    counter = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counter[0] += 1

    worker = threading.Thread(target=count, daemon=True)
    worker.start()
    time.sleep(0.05)

    start_count, start = counter[0], time.perf_counter()
    time.sleep(GIL_MEASURE_S)
    sleep_rate = (counter[0] - start_count) / (time.perf_counter() - start)

    polled_s = 0.0
    polled_count = 0
    while polled_s < GIL_MEASURE_S:
        before_count, before = counter[0], time.perf_counter()
        ep.libHandleEvents(100)
        polled_count += counter[0] - before_count
        polled_s += time.perf_counter() - before
    poll_rate = polled_count / polled_s

    stop.set()
    worker.join()
    ep.libDestroy()
    return {"sleep_rate": sleep_rate, "poll_rate": poll_rate, "ratio": poll_rate / sleep_rate}


def _child_main() -> None:
    parser = argparse.ArgumentParser(description="media engine probes (run by the tests)")
    parser.add_argument("probe", choices=["capacity", "gil"])
    parser.add_argument("--calls", type=int, default=PROBE_SELF_CALLS, help="self-calls (2 legs each)")
    args = parser.parse_args()
    result = probe_capacity(args.calls) if args.probe == "capacity" else measure_gil_release()
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- test side


def _run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, (
        f"probe {args} exited {proc.returncode} (a negative code is a signal: the library crashed)\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_engine_holds_many_concurrent_calls() -> None:
    result = _run_child("capacity", "--calls", str(PROBE_SELF_CALLS))
    assert result["make_call_error"] == "", result
    assert result["self_calls_made"] == PROBE_SELF_CALLS, result
    assert result["early_disconnects"] == [], result
    assert result["legs_held"] >= MIN_CONCURRENT_LEGS > FALLBACK_WHEEL_LEGS, (
        f"the installed pjsua2 held {result['legs_held']} legs, fewer than {MIN_CONCURRENT_LEGS}: "
        f"is it the fallback wheel? Run `make media-engine`. {result}"
    )
    assert result["default_max_calls"] >= MIN_CONCURRENT_LEGS, result


def test_engine_releases_the_gil_while_polling() -> None:
    result = _run_child("gil")
    assert result["ratio"] >= GIL_FREE_RATIO_MIN, (
        "libHandleEvents() held the GIL: the pjsua2 module was built without SWIG -threads "
        f"(callbacks from library threads then abort the process). {result}"
    )


def test_build_script_derives_deb_src_from_both_apt_formats(tmp_path: Path) -> None:
    apt_etc = tmp_path / "apt"
    (apt_etc / "sources.list.d").mkdir(parents=True)
    (apt_etc / "sources.list").write_text(
        textwrap.dedent(
            """\
            # a comment
            deb http://archive.invalid/debian bookworm main contrib
            deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://archive.invalid/extra bookworm main
            # deb http://archive.invalid/disabled bookworm main
            deb-src http://archive.invalid/debian bookworm main contrib
            """
        )
    )
    (apt_etc / "sources.list.d" / "more.list").write_text("deb http://archive.invalid/more stable main\n")
    (apt_etc / "sources.list.d" / "ignored.list.disabled").write_text(
        "deb http://archive.invalid/ignored stable main\n"
    )
    (apt_etc / "sources.list.d" / "debian.sources").write_text(
        textwrap.dedent(
            """\
            Types: deb
            # a comment inside the stanza
            URIs: http://archive.invalid/deb822
            Suites: bookworm bookworm-updates
            Components: main
            Architectures: amd64
            Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

            Types: deb deb-src
            URIs: http://archive.invalid/security
            Suites: bookworm-security
            Components: main

            Types: deb
            Enabled: no
            URIs: http://archive.invalid/off
            Suites: bookworm
            Components: main
            """
        )
    )
    before = {p: p.read_bytes() for p in apt_etc.rglob("*") if p.is_file()}
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-deb-src"],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        env={**os.environ, "SOFTSWITCH_APT_ETC": str(apt_etc)},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = [line for line in out.splitlines() if line.startswith("deb-src ")]
    assert lines == [
        "deb-src http://archive.invalid/debian bookworm main contrib",
        "deb-src [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://archive.invalid/extra bookworm main",
        "deb-src http://archive.invalid/more stable main",
    ], out
    stanzas = [s for s in out.split("\n\n") if "Types:" in s]
    assert len(stanzas) == 2, out
    assert "Types: deb-src\n" in stanzas[0]
    assert "URIs: http://archive.invalid/deb822\n" in stanzas[0]
    assert "Suites: bookworm bookworm-updates\n" in stanzas[0]
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in stanzas[0]
    assert "Architectures" not in stanzas[0]
    assert "#" not in stanzas[0]
    assert "URIs: http://archive.invalid/security\n" in stanzas[1]
    assert "archive.invalid/off" not in out
    assert "archive.invalid/ignored" not in out
    assert "archive.invalid/disabled" not in out
    assert {p: p.read_bytes() for p in apt_etc.rglob("*") if p.is_file()} == before


if __name__ == "__main__":
    _child_main()
