#!/usr/bin/env python3
"""Call benchmark: SIPp calls through the B2BUA with G.711 RTP, beside a SIPp-to-SIPp baseline.

One run on loopback, every step bounded in calls and seconds:

- **baseline**: `uac_record_route_hold.xml` straight to `uas_record_route.xml` (no softswitch);
- **softswitch**: a freshly started `softswitch serve` (ports 0, `[media] workers = "auto"`, admission
  limits far above what the machine carries, `[log] level = "warning"`); the callee SIPp registers user
  1900 with digest (RFC 3261 §10.2, §22.4) from the port its UAS then listens on, and the caller SIPp
  (users 1100-1199) calls 1900 through the edge: INVITE → 407 → INVITE (§22.3) → B2BUA leg A on a media
  worker → leg B originated through the edge → callee, routed along Record-Route (§16.6, §12.2.1.1).

RTP (RFC 3550) flows on both legs: the caller plays `/usr/share/sip-tester/g711a.pcap` (PCMA) and the
callee echoes every RTP packet back (`-rtp_echo`), so each leg carries audio both ways.

Two series, each run against the baseline and against the softswitch, stopping at the first step that is
not clean (a failed call, a call missing, a SIPp watchdog warning or SIPp's own exit status):

- **rate**: offered call rates (default 10, 25, 50, 100, 150 calls/s), each for `RATE_STEP_S` seconds,
  calls answered, 1 s of RTP, BYE;
- **concurrency**: N calls (default 50, 100, 200, 400, 800) opened at `CONCURRENCY_RAMP_CPS` (never above
  the highest clean rate), all of them up with RTP together for `CONCURRENCY_ALL_UP_S` seconds.

For each step: calls, failures, retransmissions, achieved rate, peak concurrent calls, setup latency
p50/p95/p99 (first INVITE → 200 seen by the caller, `-trace_rtt` rtd 1; through the softswitch it
includes the 407 round trip), and CPU and RSS of the controller and of each media worker (and of the
SIPp processes). A summary gives the highest clean rate, the largest concurrency held with RTP, and CPU
and RSS per call and per worker.

    .venv/bin/python bench/call_bench.py [--json out.json] [--write-docs] [--chart out.png]
    .venv/bin/python bench/call_bench.py --smoke            # 5 calls at 2/s each way, < 60 s

Exit status: 0 when the run completed (with `--smoke`: and every call succeeded), 1 otherwise, 2 when
SIPp or the softswitch is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    SOFTSWITCH_EXE,
    auth_csv,
    children,
    command_line,
    free_port,
    free_udp_block,
    machine_busy_ticks,
    percentile,
    process_sample,
    read_outcome,
    sipp_command,
    start_sipp,
    start_softswitch,
    stop_sipp,
    stop_softswitch,
    wait_sipp,
)

#: Caller users 1100..: the default dialplan's `1XXX` route dials a registered user.
CALLER_FIRST = 1100
#: Distinct callers (each INVITE answers a 407 with its caller's credentials), 1100-1199 by default:
#: more distinct From identities than a worker keeps accounts for (PJSUA_MAX_ACC 64), as real traffic has.
CALLERS = 100
MAX_CALLERS = 800  # 1100..1899: the callee is 1900
CALLEE = ("1900", "bench-pw-1900")
DEFAULT_RATES = (10, 25, 50, 100, 150)
DEFAULT_CONCURRENCY = (50, 100, 200, 400, 800)
#: Seconds of offered load per rate step (calls = rate × this, capped by RATE_STEP_MAX_CALLS).
RATE_STEP_S = 10.0
#: Upper bound of calls in one rate step, whatever the rate.
RATE_STEP_MAX_CALLS = 2000
#: How long each call of a rate step stays up with RTP: short, so a rate step measures call set-up and
#: tear-down rather than concurrency (150 calls/s × 1 s = 150 calls up at once).
RATE_HOLD_MS = 1000
#: Calls/s a concurrency step opens its calls at (lowered to the highest clean rate when that is lower).
CONCURRENCY_RAMP_CPS = 50.0
#: Seconds every call of a concurrency step is up at once, with RTP flowing.
CONCURRENCY_ALL_UP_S = 10.0
#: uac_record_route_hold.xml starts g711a.pcap (7.05 s) once every 8.05 s of a hold.
PCAP_PERIOD_MS = 8050
#: Seconds a step may run beyond its expected duration before SIPp's -timeout ends it (a failed step).
STEP_SLACK_S = 30.0
#: A caller waiting longer than this for any response gives the call up (-recv_timeout): a stalled call
#: fails the step instead of holding it until the global timeout.
UAC_RECV_TIMEOUT_MS = 20000
#: Upper bound of one phase (the callee SIPp's -timeout).
PHASE_TIMEOUT_S = 3600.0
#: Registration interval of the callee (RFC 3261 §10.2.1.1); longer than any run.
CALLEE_EXPIRES_S = 3600
#: Seconds for the callee SIPp to bind the port its registration run just released.
UAS_STARTUP_S = 0.5
#: How often RSS is sampled during a step (for its peak).
SAMPLE_INTERVAL_S = 0.5
#: Legs the node admits (`media.max_calls`): far above what two cores carry, so the CPU is the limit.
NODE_MAX_CALLS = 2048
#: New calls/s the edge admits (`media.max_cps`): far above any step, so admission never throttles.
NODE_MAX_CPS = 2000.0
#: RTP ports of the node's workers: apart from the default range (20000-29999) other nodes on the machine
#: use, and below the kernel's ephemeral range (32768-60999) that SIPp's media ports come from.
NODE_RTP_PORTS = "5000-9999"
SMOKE_CALLS = 5
SMOKE_RATE = 2.0
#: Media workers in the smoke run: one keeps it light beside other tests.
SMOKE_WORKERS = 1
MEDIA_ENGINE_STAMP = ROOT / ".venv" / ".media-engine"
DOCS_FILE = ROOT / "docs" / "performance.md"
DOCS_CHART = ROOT / "docs" / "performance.png"
DOCS_BEGIN = "<!-- call_bench summary: begin (written by bench/call_bench.py --write-docs) -->"
DOCS_END = "<!-- call_bench summary: end -->"
MB = 2**20


# --- measuring processes --------------------------------------------------------------------------------


@dataclass
class Watched:
    """A process whose CPU and RSS a step reports."""

    role: str  # "controller", "worker", "sipp_uac", "sipp_uas"
    pid: int
    cpu_start: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    cpu_s: float | None = None


class RssSampler(threading.Thread):
    """Samples the RSS of the watched processes every SAMPLE_INTERVAL_S, keeping each one's peak."""

    def __init__(self, watched: Sequence[Watched]) -> None:
        super().__init__(daemon=True)
        self.watched = list(watched)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(SAMPLE_INTERVAL_S)

    def sample(self) -> None:
        for w in self.watched:
            s = process_sample(w.pid)
            if s is not None:
                w.rss_peak = max(w.rss_peak, s[1])

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.sample()


def node_processes(node_pid: int) -> list[Watched]:
    """The controller and its media workers (children running softswitch.media.worker)."""
    watched = [Watched("controller", node_pid)]
    for child in children(node_pid):
        if any("softswitch.media.worker" in arg for arg in command_line(child)):
            watched.append(Watched("worker", child))
    return watched


# --- phases and steps -------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One target for a series of steps: the SIPp callee directly (baseline) or through a node."""

    name: str  # "baseline" | "softswitch"
    work: Path
    target_port: int
    uas: subprocess.Popen[bytes]
    injection: Path
    node: subprocess.Popen[bytes] | None = None
    idle: dict[int, int] = field(default_factory=dict)  # pid → RSS bytes before any call

    def watched(self) -> list[Watched]:
        procs = node_processes(self.node.pid) if self.node is not None else []
        return [*procs, Watched("sipp_uas", self.uas.pid)]


def start_uas(work: Path, port: int) -> subprocess.Popen[bytes]:
    """The callee: uas_record_route answering every INVITE, echoing all RTP it receives (-rtp_echo)."""
    cmd = sipp_command(
        "uas_record_route",
        local_port=port,
        target_port=None,
        media_port=free_udp_block(4),
        sets={"media": "no"},
        extra=["-rtp_echo"],
        timeout_s=PHASE_TIMEOUT_S,
    )
    uas = start_sipp(cmd, work / "uas")
    time.sleep(UAS_STARTUP_S)
    if uas.poll() is not None:
        raise SystemExit(f"the callee SIPp exited at once: see {work / 'uas' / 'stderr.log'}")
    return uas


def start_baseline(work: Path, injection: Path) -> Phase:
    port = free_port()
    return Phase("baseline", work, port, start_uas(work, port), injection)


def register_callee(work: Path, sip_port: int, callee_port: int) -> None:
    """REGISTER the callee (digest) from the port its UAS then answers on; SystemExit if it fails."""
    register = sipp_command(
        "register_digest",
        local_port=callee_port,
        target_port=sip_port,
        calls=1,
        injection=auth_csv(work / "callee.csv", [CALLEE]),
        sets={"expires": str(CALLEE_EXPIRES_S)},
        timeout_s=30,
    )
    proc = start_sipp(register, work / "register")
    code, cpu = wait_sipp(proc, 40)
    if code != 0 or read_outcome(work / "register", code, 0.0, cpu).successful != 1:
        raise SystemExit(f"the callee could not register: see {work / 'register'}")


def start_node_phase(
    work: Path, injection: Path, users: list[tuple[str, str]], workers: int | str, log_level: str
) -> Phase:
    media = f'max_calls = {NODE_MAX_CALLS}\nmax_cps = {NODE_MAX_CPS}\nrtp_ports = "{NODE_RTP_PORTS}"'
    node, sip_port = start_softswitch(
        work / "node", users, media_workers=workers, media_extra=media, log_level=log_level
    )
    try:
        callee_port = free_port()
        register_callee(work, sip_port, callee_port)
        phase = Phase("softswitch", work, sip_port, start_uas(work, callee_port), injection, node)
    except BaseException:
        stop_softswitch(node)
        raise
    for w in node_processes(node.pid):
        s = process_sample(w.pid)
        if s is not None:
            phase.idle[w.pid] = s[1]
    return phase


def stop_phase(phase: Phase) -> None:
    stop_sipp(phase.uas)
    if phase.node is not None:
        code = stop_softswitch(phase.node)
        if code not in (0, None):
            print(
                f"  softswitch exited with {code}: see {phase.work / 'node' / 'softswitch.log'}", flush=True
            )


def run_step(
    phase: Phase,
    kind: str,
    *,
    rate: float,
    calls: int,
    hold_ms: int,
    label: str,
) -> dict[str, Any]:
    """One bounded SIPp caller run against the phase's target; CPU and RSS of its processes around it."""
    plays = max(1, math.ceil(hold_ms / PCAP_PERIOD_MS))
    pause_ms = hold_ms - (plays - 1) * PCAP_PERIOD_MS
    expected_s = calls / rate + hold_ms / 1000
    timeout_s = expected_s + STEP_SLACK_S
    cmd = sipp_command(
        "uac_record_route_hold",
        local_port=free_port(),
        target_port=phase.target_port,
        media_port=free_udp_block(4),
        calls=calls,
        rate=rate,
        limit=calls,
        injection=phase.injection,
        sets={"plays": str(plays)},
        extra=["-s", CALLEE[0], "-d", str(pause_ms), "-recv_timeout", str(UAC_RECV_TIMEOUT_MS)],
        timeout_s=timeout_s,
    )
    rundir = phase.work / label
    watched = phase.watched()
    for w in watched:
        s = process_sample(w.pid)
        if s is not None:
            w.cpu_start, w.rss_start = s
    busy0, total0 = machine_busy_ticks()
    started = time.monotonic()
    uac = start_sipp(cmd, rundir)
    uac_watch = Watched("sipp_uac", uac.pid)
    sampler = RssSampler([*watched, uac_watch])
    sampler.start()
    code, uac_cpu = wait_sipp(uac, timeout_s + STEP_SLACK_S)
    elapsed = time.monotonic() - started
    sampler.stop()
    busy1, total1 = machine_busy_ticks()
    for w in watched:
        s = process_sample(w.pid)
        if s is not None:
            w.cpu_s = s[0] - w.cpu_start
            w.rss_end = s[1]
    uac_watch.cpu_s = uac_cpu
    outcome = read_outcome(rundir, code, elapsed, uac_cpu)
    setup = outcome.rtts.get("1", [])
    # Calls are opened over calls/rate seconds; the last one then holds hold_ms and hangs up.
    opening_s = max(elapsed - hold_ms / 1000, 1e-3)
    clean = (
        outcome.failed == 0
        and outcome.successful == calls
        and not outcome.watchdog
        and outcome.exit_code == 0
    )
    result: dict[str, Any] = {
        "target": phase.name,
        "series": kind,
        "offered_rate": rate,
        "calls": calls,
        "hold_s": round(hold_ms / 1000, 2),
        "successful": outcome.successful,
        "failed": outcome.failed,
        "retransmissions": outcome.retransmissions,
        "achieved_rate": round(outcome.successful / opening_s, 1),
        "peak_concurrent_calls": outcome.peak_current_calls,
        "setup_ms": {
            "n": len(setup),
            "p50": percentile(setup, 0.50),
            "p95": percentile(setup, 0.95),
            "p99": percentile(setup, 0.99),
            "mean": round(statistics.fmean(setup), 2) if setup else None,
        },
        "elapsed_s": outcome.elapsed_s,
        "watchdog": outcome.watchdog,
        "exit_code": outcome.exit_code,
        "clean": clean,
        # All cores together, this run and everything else on the machine (it is shared).
        "machine_busy_percent": round(100 * (busy1 - busy0) / max(1, total1 - total0), 1),
        "processes": [
            {
                "role": w.role,
                "pid": w.pid,
                "cpu_s": None if w.cpu_s is None else round(w.cpu_s, 2),
                "cpu_percent_of_one_core": None if w.cpu_s is None else round(100 * w.cpu_s / elapsed, 1),
                "rss_mb_peak": round(w.rss_peak / MB, 1),
                "rss_mb_idle": round(phase.idle[w.pid] / MB, 1) if w.pid in phase.idle else None,
            }
            for w in [*watched, uac_watch]
        ],
        "errors": outcome.error_tail if not clean else [],
        "rundir": str(rundir),
    }
    node = [p for p in result["processes"] if p["role"] in ("controller", "worker")]
    if node:
        cpu = sum(p["cpu_s"] or 0.0 for p in node)
        result["softswitch_cpu_ms_per_call"] = round(1000 * cpu / max(1, outcome.successful), 2)
        result["softswitch_cpu_percent_of_one_core"] = round(100 * cpu / elapsed, 1)
        grown = sum((p["rss_mb_peak"] - p["rss_mb_idle"]) for p in node if p["rss_mb_idle"] is not None)
        if kind == "concurrency" and outcome.peak_current_calls:
            result["softswitch_rss_kb_per_call"] = round(1024 * grown / outcome.peak_current_calls, 1)
    sipp_cpu = sum(p["cpu_s"] or 0.0 for p in result["processes"] if p["role"].startswith("sipp"))
    result["sipp_cpu_ms_per_call"] = round(1000 * sipp_cpu / max(1, outcome.successful), 2)
    print(describe(result), flush=True)
    return result


def describe(r: dict[str, Any]) -> str:
    s = r["setup_ms"]
    line = (
        f"{r['target']:>10} {r['series']:>11} offered {r['offered_rate']:>6g}/s calls {r['calls']:>4}: "
        f"ok={r['successful']} failed={r['failed']} retrans={r['retransmissions']} "
        f"achieved={r['achieved_rate']}/s peak={r['peak_concurrent_calls']} "
        f"setup p50/p95/p99={s['p50']}/{s['p95']}/{s['p99']} ms"
    )
    if "softswitch_cpu_ms_per_call" in r:
        workers = [p for p in r["processes"] if p["role"] == "worker"]
        controller = next(p for p in r["processes"] if p["role"] == "controller")
        line += (
            f" cpu: controller {controller['cpu_percent_of_one_core']}%"
            + "".join(f" worker {w['cpu_percent_of_one_core']}%" for w in workers)
            + f" ({r['softswitch_cpu_ms_per_call']} ms/call)"
            + f" rss: controller {controller['rss_mb_peak']} MB"
            + "".join(f" worker {w['rss_mb_peak']} MB" for w in workers)
        )
    line += f" machine busy {r['machine_busy_percent']}%"
    if r["watchdog"]:
        line += "  SIPp WATCHDOG: run invalid"
    if not r["clean"]:
        line += "  (not clean)"
    return line


def rate_series(phase: Phase, rates: Sequence[float]) -> list[dict[str, Any]]:
    results = []
    for rate in rates:
        calls = min(RATE_STEP_MAX_CALLS, max(1, round(rate * RATE_STEP_S)))
        r = run_step(phase, "rate", rate=rate, calls=calls, hold_ms=RATE_HOLD_MS, label=f"rate-{rate:g}")
        results.append(r)
        if not r["clean"]:
            break
    return results


def concurrency_series(phase: Phase, levels: Sequence[int], ramp: float) -> list[dict[str, Any]]:
    results = []
    for n in levels:
        hold_ms = round(1000 * (n / ramp + CONCURRENCY_ALL_UP_S))
        r = run_step(phase, "concurrency", rate=ramp, calls=n, hold_ms=hold_ms, label=f"concurrency-{n}")
        r["held_all_at_once"] = r["peak_concurrent_calls"] >= n
        r["clean"] = r["clean"] and r["held_all_at_once"]
        results.append(r)
        if not r["clean"]:
            break
    return results


def with_phase(
    start: Callable[[], Phase], body: Callable[[Phase], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    phase = start()
    try:
        return body(phase)
    finally:
        stop_phase(phase)


# --- summary, JSON, chart, docs ---------------------------------------------------------------------------


def conditions() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    sipp_version = subprocess.run(["sipp", "-v"], capture_output=True, text=True, check=False).stdout
    engine: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in MEDIA_ENGINE_STAMP.read_text().splitlines():
            key, _, value = line.partition("=")
            if key:
                engine[key] = value
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sipp": next((x.strip() for x in sipp_version.splitlines() if "SIPp" in x), ""),
        "media_engine": engine,
        "load_average_at_start": list(os.getloadavg()),
    }


def best_clean(steps: list[dict[str, Any]], target: str, series: str) -> dict[str, Any] | None:
    clean = [r for r in steps if r["target"] == target and r["series"] == series and r["clean"]]
    return clean[-1] if clean else None


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for target in ("baseline", "softswitch"):
        rate = best_clean(steps, target, "rate")
        conc = best_clean(steps, target, "concurrency")
        entry: dict[str, Any] = {
            "clean_rate_offered": rate["offered_rate"] if rate else None,
            "clean_rate_achieved": rate["achieved_rate"] if rate else None,
            "setup_ms_at_clean_rate": rate["setup_ms"] if rate else None,
            "max_concurrent_with_rtp": conc["peak_concurrent_calls"] if conc else None,
            "sipp_cpu_ms_per_call_at_clean_rate": rate["sipp_cpu_ms_per_call"] if rate else None,
        }
        if target == "softswitch":
            for key, step in (("at_clean_rate", rate), ("at_max_concurrency", conc)):
                if step is None:
                    continue
                workers = [p for p in step["processes"] if p["role"] == "worker"]
                controller = next(p for p in step["processes"] if p["role"] == "controller")
                entry[key] = {
                    "cpu_ms_per_call": step["softswitch_cpu_ms_per_call"],
                    "controller_cpu_percent": controller["cpu_percent_of_one_core"],
                    "controller_rss_mb": controller["rss_mb_peak"],
                    "workers": len(workers),
                    "worker_cpu_percent": [w["cpu_percent_of_one_core"] for w in workers],
                    "worker_rss_mb": [w["rss_mb_peak"] for w in workers],
                    "worker_rss_mb_idle": [w["rss_mb_idle"] for w in workers],
                    "rss_kb_per_call": step.get("softswitch_rss_kb_per_call"),
                    "setup_ms": step["setup_ms"],
                }
        summary[target] = entry
    return summary


def ensure_matplotlib() -> Any | None:
    """pyplot, installing matplotlib into this venv on demand (it is not a dependency of the package)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        print(
            "matplotlib is not installed; installing it into this venv for the chart only "
            f"({sys.executable} -m pip install matplotlib)…",
            flush=True,
        )
        installed = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=False, timeout=600
        )
        importlib.invalidate_caches()
        if installed.returncode != 0:
            print("matplotlib could not be installed: no chart this run", flush=True)
            return None
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _why(r: dict[str, Any]) -> str:
    return f"{r['failed']} failed" if r["failed"] else "SIPp watchdog" if r["watchdog"] else "not clean"


def write_chart(steps: list[dict[str, Any]], path: Path) -> bool:
    plt = ensure_matplotlib()
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"baseline": ("tab:gray", "SIPp → SIPp"), "softswitch": ("tab:blue", "through the softswitch")}
    for target, (color, name) in styles.items():
        rate = [r for r in steps if r["target"] == target and r["series"] == "rate"]
        x = [r["offered_rate"] for r in rate]
        for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            ax1.plot(x, [r["setup_ms"][q] for r in rate], style, color=color, marker="o", label=f"{name} {q}")
        for r in rate:
            if not r["clean"]:
                ax1.annotate(_why(r), (r["offered_rate"], r["setup_ms"]["p99"] or 0), color="red")
    ax1.set_xlabel("offered call rate (calls/s)")
    ax1.set_ylabel("setup latency, INVITE → 200 (ms)")
    ax1.set_yscale("log")
    ax1.set_title("Call set-up latency by call rate")
    ax1.legend(fontsize=7)
    conc = [r for r in steps if r["target"] == "softswitch" and r["series"] == "concurrency"]
    if conc:
        x = [r["calls"] for r in conc]
        ax2.plot(
            x,
            [r["softswitch_cpu_percent_of_one_core"] for r in conc],
            "-o",
            label="softswitch CPU (% of a core)",
        )
        base = [r for r in steps if r["target"] == "baseline" and r["series"] == "concurrency"]
        ax2.plot(
            [r["calls"] for r in base],
            [sum(p["cpu_percent_of_one_core"] or 0 for p in r["processes"]) for r in base],
            "-o",
            color="tab:gray",
            label="SIPp → SIPp: both SIPp (% of a core)",
        )
        ax3 = ax2.twinx()
        ax3.plot(
            x,
            [
                sum(p["rss_mb_peak"] for p in r["processes"] if p["role"] in ("controller", "worker"))
                for r in conc
            ],
            "-s",
            color="tab:orange",
            label="softswitch RSS (MB)",
        )
        ax3.set_ylabel("RSS (MB)")
        ax3.set_ylim(bottom=0)
        ax3.legend(loc="lower right", fontsize=7)
        for r in conc:
            if not r["clean"]:
                ax2.annotate(
                    _why(r),
                    (r["calls"], r["softswitch_cpu_percent_of_one_core"]),
                    color="red",
                )
    ax2.set_xlabel("concurrent bridged calls with G.711 RTP")
    ax2.set_ylabel("CPU (% of one core)")
    ax2.set_title("Held calls: CPU and memory")
    if conc:
        ax2.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return " / ".join(fmt(v, unit) for v in value)
    return f"{value:g}{unit}" if isinstance(value, float | int) else f"{value}{unit}"


def _each(values: list[Any] | None, unit: str) -> str:
    """One value per media worker: "12.5 % and 3 %"."""
    return " and ".join(fmt(v, unit) for v in values) if values else "—"


def _ms3(setup: dict[str, Any] | None) -> str:
    setup = setup or {}
    return f"{fmt(setup.get('p50'))} / {fmt(setup.get('p95'))} / {fmt(setup.get('p99'))}"


def docs_section(report: dict[str, Any]) -> str:
    """The generated part of docs/performance.md: the summary and every step of the run."""
    c = report["conditions"]
    s = report["summary"]
    b, n = s["baseline"], s["softswitch"]
    at_rate = n.get("at_clean_rate", {})
    at_conc = n.get("at_max_concurrency", {})
    engine = c["media_engine"]
    load = ", ".join(f"{x:.2f}" for x in c["load_average_at_start"])
    controller_rss = at_conc.get("controller_rss_mb") or at_rate.get("controller_rss_mb")
    rows = [
        (
            "calls/s at zero failures (highest clean step: offered / achieved)",
            f"{fmt(b['clean_rate_offered'])} / {fmt(b['clean_rate_achieved'])}",
            f"{fmt(n['clean_rate_offered'])} / {fmt(n['clean_rate_achieved'])}",
        ),
        (
            "concurrent calls held with G.711 RTP both ways, zero failures",
            fmt(b["max_concurrent_with_rtp"]),
            f"{fmt(n['max_concurrent_with_rtp'])} bridged",
        ),
        (
            "setup p50 / p95 / p99 at the highest clean rate (INVITE → 200 at the caller)",
            f"{_ms3(b['setup_ms_at_clean_rate'])} ms",
            f"{_ms3(n['setup_ms_at_clean_rate'])} ms (407 round trip included)",
        ),
        (
            "setup p50 / p95 / p99 while opening the most held calls",
            "—",
            f"{_ms3(at_conc.get('setup_ms'))} ms",
        ),
        (
            "CPU per call at the highest clean rate (set-up, 1 s of RTP, tear-down)",
            f"SIPp caller + callee: {fmt(b['sipp_cpu_ms_per_call_at_clean_rate'], ' ms')}",
            f"softswitch: {fmt(at_rate.get('cpu_ms_per_call'), ' ms')} "
            f"(SIPp: {fmt(n['sipp_cpu_ms_per_call_at_clean_rate'], ' ms')})",
        ),
        (
            "CPU at the highest clean rate (% of one core)",
            "—",
            f"workers {_each(at_rate.get('worker_cpu_percent'), ' %')}; "
            f"controller {fmt(at_rate.get('controller_cpu_percent'), ' %')}",
        ),
        (
            "CPU holding the most calls (% of one core)",
            "—",
            f"workers {_each(at_conc.get('worker_cpu_percent'), ' %')}; "
            f"controller {fmt(at_conc.get('controller_cpu_percent'), ' %')}",
        ),
        (
            "RSS of the media workers: idle → holding the most calls",
            "—",
            f"{_each(at_conc.get('worker_rss_mb_idle'), ' MB')} → "
            f"{_each(at_conc.get('worker_rss_mb'), ' MB')}",
        ),
        ("RSS of the controller (peak)", "—", fmt(controller_rss, " MB")),
        ("RSS per held call (growth over idle ÷ calls)", "—", fmt(at_conc.get("rss_kb_per_call"), " KB")),
    ]
    lines = [
        DOCS_BEGIN,
        "",
        f"Run of {c['date_utc']}: {c['cores']} cores ({c['cpu_model']}), Linux {c['kernel']}, "
        f"Python {c['python']}, {c['sipp']}, media engine `{engine.get('engine', '?')}` "
        f"(pjproject {engine.get('pjproject_version', '?')}); load average at start {load}. "
        "SIPp runs on the same cores.",
        "",
        "| | SIPp → SIPp (baseline) | through the softswitch |",
        "|---|---|---|",
        *(f"| {name} | {base} | {node} |" for name, base, node in rows),
        "",
        "Every step of the run (clean: zero failures, every call completed, no SIPp watchdog warning; "
        "each series stops at its first step that is not clean):",
        "",
        "| target | series | offered calls/s | calls | ok | failed | retrans | achieved/s | peak concurrent "
        "| setup p50 / p95 / p99 ms | softswitch CPU % of a core (ms/call) | SIPp CPU ms/call "
        "| machine busy | clean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["steps"]:
        cpu = "—"
        if "softswitch_cpu_ms_per_call" in r:
            cpu = f"{fmt(r['softswitch_cpu_percent_of_one_core'])} ({fmt(r['softswitch_cpu_ms_per_call'])})"
        verdict = "yes" if r["clean"] else "no (SIPp watchdog)" if r["watchdog"] else "no"
        cells = [
            r["target"],
            r["series"],
            fmt(r["offered_rate"]),
            r["calls"],
            r["successful"],
            r["failed"],
            r["retransmissions"],
            fmt(r["achieved_rate"]),
            r["peak_concurrent_calls"],
            _ms3(r["setup_ms"]),
            cpu,
            fmt(r["sipp_cpu_ms_per_call"]),
            fmt(r["machine_busy_percent"], " %"),
            verdict,
        ]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    lines += ["", DOCS_END]
    return "\n".join(lines)


def write_docs(report: dict[str, Any], path: Path) -> None:
    """Replace the generated section of docs/performance.md (between its markers), or append it."""
    section = docs_section(report)
    text = path.read_text() if path.exists() else "# Performance\n\n"
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        tail = rest.split(DOCS_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


# --- main -------------------------------------------------------------------------------------------------


def publish(report: dict[str, Any], args: argparse.Namespace) -> None:
    """The chart (--chart, or docs/performance.png with --write-docs) and the docs summary (--write-docs)."""
    chart = args.chart or (DOCS_CHART if args.write_docs else None)
    if chart is not None and write_chart(report["steps"], chart):
        print(f"chart: {chart}", flush=True)
    if args.write_docs:
        write_docs(report, DOCS_FILE)
        print(f"summary written to {DOCS_FILE}", flush=True)


def parse_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)), help="calls/s per rate step")
    parser.add_argument(
        "--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)), help="calls held per step"
    )
    parser.add_argument(
        "--callers",
        type=int,
        default=CALLERS,
        help=f"distinct caller users (1..{MAX_CALLERS}, from {CALLER_FIRST})",
    )
    parser.add_argument("--workers", default="auto", help='media.workers of the node ("auto" or a number)')
    parser.add_argument(
        "--node-log-level", default="warning", help="log.level of the node (its log is kept in the work dir)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help=f"{SMOKE_CALLS} calls at {SMOKE_RATE:g}/s each way"
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--chart", type=Path, help="write a PNG chart (matplotlib, installed on demand)")
    parser.add_argument("--write-docs", action="store_true", help=f"refresh the summary in {DOCS_FILE.name}")
    parser.add_argument("--work", type=Path, help="keep SIPp traces and node logs here (default: a temp dir)")
    parser.add_argument(
        "--from-json", type=Path, help="run nothing: chart and docs from the JSON report of an earlier run"
    )
    args = parser.parse_args(argv)
    # Stopped from outside (SIGTERM, or SIGINT when started in the background, where it is ignored by
    # default): unwind, so every phase stops its node and its SIPp processes by their PIDs.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    if args.from_json:
        saved: dict[str, Any] = json.loads(args.from_json.read_text())
        publish(saved, args)
        return 0
    if shutil.which("sipp") is None:
        print("sipp not found: apt-get install sip-tester (make test installs it)", file=sys.stderr)
        return 2
    if not SOFTSWITCH_EXE.exists():
        print(f"{SOFTSWITCH_EXE} is missing: .venv/bin/pip install -e '.[test]'", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="call-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not 1 <= args.callers <= MAX_CALLERS:
        parser.error(f"--callers must be within 1..{MAX_CALLERS}")
    callers = [(str(CALLER_FIRST + i), f"bench-pw-{CALLER_FIRST + i}") for i in range(args.callers)]
    injection = auth_csv(work / "callers.csv", callers)
    users = [*callers, CALLEE]
    workers: int | str = int(args.workers) if args.workers.isdigit() else args.workers
    report: dict[str, Any] = {"conditions": conditions(), "callers": args.callers, "steps": []}
    steps: list[dict[str, Any]] = report["steps"]
    print(f"work dir: {work}", flush=True)

    if args.smoke:
        calls = SMOKE_CALLS

        def smoke(phase: Phase) -> list[dict[str, Any]]:
            return [
                run_step(phase, "rate", rate=SMOKE_RATE, calls=calls, hold_ms=RATE_HOLD_MS, label="smoke")
            ]

        steps += with_phase(lambda: start_baseline(work / "baseline", injection), smoke)
        steps += with_phase(
            lambda: start_node_phase(
                work / "softswitch", injection, users, SMOKE_WORKERS, args.node_log_level
            ),
            smoke,
        )
    else:
        rates = parse_list(args.rates)
        levels = [int(x) for x in parse_list(args.concurrency)]
        steps += with_phase(
            lambda: start_baseline(work / "baseline-rate", injection), lambda p: rate_series(p, rates)
        )
        steps += with_phase(
            lambda: start_node_phase(
                work / "softswitch-rate", injection, users, workers, args.node_log_level
            ),
            lambda p: rate_series(p, rates),
        )
        clean = best_clean(steps, "softswitch", "rate")
        ramp = CONCURRENCY_RAMP_CPS
        if clean is not None:
            ramp = min(ramp, clean["offered_rate"])
        elif rates:  # no rate was clean: open the calls at the lowest rate tried
            ramp = min(ramp, min(rates))
        report["concurrency_ramp_cps"] = ramp
        steps += with_phase(
            lambda: start_baseline(work / "baseline-concurrency", injection),
            lambda p: concurrency_series(p, levels, ramp),
        )
        steps += with_phase(
            lambda: start_node_phase(
                work / "softswitch-concurrency", injection, users, workers, args.node_log_level
            ),
            lambda p: concurrency_series(p, levels, ramp),
        )
    report["conditions"]["load_average_at_end"] = list(os.getloadavg())
    report["summary"] = summarize(steps)
    print(json.dumps(report["summary"], indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    publish(report, args)
    if args.smoke and not all(r["clean"] for r in steps):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
