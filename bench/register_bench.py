#!/usr/bin/env python3
"""Registration benchmark: SIPp REGISTER with digest auth against the softswitch edge, beside a baseline.

Runs on loopback only, bounded by count and time. For each transport and each rate step it drives
`sipp_scenarios/register_digest.xml` (REGISTER → 401 → REGISTER with credentials → 200) from a pool of
users, first against a SIPp "registrar" (`registrar_baseline_uas.xml`: SIPp straight to SIPp, the
baseline) and then against a freshly started `softswitch serve`, and reports for each: registrations
per second achieved, failures, retransmissions, response time (first REGISTER → 200) p50/p95/p99, and the
softswitch's CPU seconds per registration and RSS. A step counts as clean only with zero failures, zero
retransmissions and no SIPp watchdog warning.

    .venv/bin/python bench/register_bench.py [--rates 500,1000,2000,4000] [--calls 4000] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SCENARIOS, free_port, proc_stats, start_softswitch

USERS = 200  # distinct users registering (2000..2199)
SIPP_TIMEOUT_S = 120  # hard stop of one SIPp run


def write_users(path: Path) -> list[tuple[str, str]]:
    users = [(f"{2000 + i}", f"bench-pw-{2000 + i}") for i in range(USERS)]
    lines = ["SEQUENTIAL"]
    lines += [f"{u};[authentication username={u} password={p}]" for u, p in users]
    path.write_text("\n".join(lines) + "\n")
    return users


def run_sipp(
    work: Path, name: str, target: int, transport: str, rate: int, calls: int, inf: Path
) -> dict[str, object]:
    rundir = work / name
    rundir.mkdir()
    cmd = [
        "sipp", "-sf", str(SCENARIOS / "register_digest.xml"), "-inf", str(inf), "-i", "127.0.0.1",
        "-p", str(free_port()), "-t", transport, "-m", str(calls), "-r", str(rate), "-l", str(max(rate, 100)),
        "-set", "expires", "300", "-timeout", f"{SIPP_TIMEOUT_S}s", "-timeout_error", "-nostdin",
        "-default_behaviors", "none", "-buff_size", "4194304", "-trace_stat", "-stf", "stats.csv",
        "-trace_rtt", "-rtt_freq", "1", "-trace_err", "-error_file", "errors.log",
        f"127.0.0.1:{target}",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=rundir, capture_output=True, timeout=SIPP_TIMEOUT_S + 30, check=False)
    elapsed = time.monotonic() - started
    rows = [r.split(";") for r in (rundir / "stats.csv").read_text().splitlines() if r.strip()]
    stats = dict(zip(rows[0], rows[-1], strict=False))
    rtts: list[float] = []
    for f in rundir.glob("*_rtt.csv"):
        for line in f.read_text().splitlines()[1:]:
            parts = line.split(";")  # Date_ms;response_time_ms;rtd_no
            if len(parts) >= 3:
                with contextlib.suppress(ValueError):
                    rtts.append(float(parts[1]))
    rtts.sort()
    ok = int(stats.get("SuccessfulCall(C)", 0))
    failed = int(stats.get("FailedCall(C)", 0))
    stderr = proc.stderr.decode(errors="replace")

    def pct(q: float) -> float | None:
        return round(rtts[min(len(rtts) - 1, int(q * len(rtts)))], 2) if rtts else None

    return {
        "transport": "udp" if transport == "u1" else "tcp",
        "target_rate": rate,
        "registrations": ok,
        "failed": failed,
        "retransmissions": int(stats.get("Retransmissions(C)", 0)),
        "achieved_rate": round(ok / elapsed, 1) if elapsed else 0.0,
        "elapsed_s": round(elapsed, 2),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(rtts), 2) if rtts else None,
        "watchdog": "watchdog" in stderr.lower(),
        "exit_code": proc.returncode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="500,1000,2000,4000")
    parser.add_argument("--calls", type=int, default=4000, help="registrations per step")
    parser.add_argument("--transports", default="u1,t1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if shutil.which("sipp") is None:
        print("sipp not found: apt-get install sip-tester (make test installs it)", file=sys.stderr)
        return 2
    rates = [int(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="register-bench-"))
    inf = work / "users.csv"
    users = write_users(inf)
    results: list[dict[str, object]] = []
    for transport in args.transports.split(","):
        for rate in rates:
            baseline_port = free_port()
            uas = subprocess.Popen(
                ["sipp", "-sf", str(SCENARIOS / "registrar_baseline_uas.xml"), "-i", "127.0.0.1",
                 "-p", str(baseline_port), "-t", transport, "-nostdin", "-buff_size", "4194304",
                 "-timeout", f"{SIPP_TIMEOUT_S}s"],
                cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.5)
            try:
                base = run_sipp(
                    work, f"base-{transport}-{rate}", baseline_port, transport, rate, args.calls, inf
                )
            finally:
                uas.send_signal(signal.SIGTERM)
                uas.wait(10)
            node_dir = work / f"ss-{transport}-{rate}"
            node_dir.mkdir()
            proc, sip_port = start_softswitch(node_dir, users)
            try:
                cpu0, _ = proc_stats(proc.pid)
                edge = run_sipp(work, f"edge-{transport}-{rate}", sip_port, transport, rate, args.calls, inf)
                cpu1, rss = proc_stats(proc.pid)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
            regs = max(1, int(edge["registrations"]))  # type: ignore[call-overload]
            edge["cpu_ms_per_registration"] = round((cpu1 - cpu0) * 1000 / regs, 3)
            edge["cpu_percent_of_one_core"] = round(100 * (cpu1 - cpu0) / float(edge["elapsed_s"]), 1)  # type: ignore[arg-type]
            edge["rss_mb"] = round(rss / 2**20, 1)
            for label, r in (("baseline", base), ("softswitch", edge)):
                r["target"] = label
                clean = r["failed"] == 0 and r["retransmissions"] == 0 and not r["watchdog"]
                r["clean"] = clean
                results.append(r)
                print(
                    f"{r['transport']} rate {rate:>5}/s {label:>10}: {r['achieved_rate']:>7}/s "
                    f"ok={r['registrations']} failed={r['failed']} retrans={r['retransmissions']} "
                    f"p50={r['p50_ms']} p95={r['p95_ms']} "
                    f"p99={r['p99_ms']} ms"
                    + (
                        f" cpu={r['cpu_ms_per_registration']} ms/reg rss={r['rss_mb']} MB"
                        if label == "softswitch"
                        else ""
                    )
                    + ("" if clean else "  (not clean)"),
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"work dir: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
