"""Helpers shared by the benchmarks in `bench/`: free loopback ports, a softswitch node started for a run,
SIPp runs and their statistics, and CPU/RSS of processes read from /proc.

Everything targets 127.0.0.1 only; every SIPp run is bounded by `-m` (calls) and `-timeout` (seconds), and
every process is stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "sipp_scenarios"
SOFTSWITCH_EXE = ROOT / ".venv" / "bin" / "softswitch"
#: Kernel UDP buffer SIPp asks for (TESTING.md: the default overflows at a few hundred calls/s).
SIPP_BUFF_SIZE = 4 * 1024 * 1024
#: Seconds for `softswitch serve` to write ports.json (each media worker probes its capacity first).
NODE_START_TIMEOUT_S = 60.0
#: Seconds a node gets to exit after SIGTERM before its whole session is killed.
NODE_STOP_TIMEOUT_S = 20.0
#: Seconds a SIPp process gets to exit after SIGTERM (or SIGUSR1) before SIGKILL.
SIPP_STOP_TIMEOUT_S = 10.0
#: Ports tried when looking for a block of consecutive free UDP ports (SIPp media: port, port + 2).
PORT_BLOCK_ATTEMPTS = 200


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the edge listens on both)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def free_udp_block(size: int) -> int:
    """The first of `size` consecutive UDP ports free on 127.0.0.1 (SIPp uses -mp and -mp + 2 for media)."""
    for _ in range(PORT_BLOCK_ATTEMPTS):
        first = free_port()
        if first + size > 65535:
            continue
        sockets: list[socket.socket] = []
        try:
            for port in range(first, first + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no block of {size} free UDP ports on 127.0.0.1")


# --- processes (/proc) ---------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def process_sample(pid: int) -> tuple[float, int] | None:
    """CPU seconds (user + system) and RSS bytes of one process, from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None
    return cpu, rss


def proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds (user+system) and RSS bytes of a process and its children, from /proc."""
    cpu = 0.0
    rss = 0
    for p in [pid, *children(pid)]:
        sample = process_sample(p)
        if sample is not None:
            cpu += sample[0]
            rss += sample[1]
    return cpu, rss


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot (/proc/stat): other load shows up here."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


# --- a softswitch node ----------------------------------------------------------------------------------


def start_softswitch(
    work: Path,
    users: Sequence[tuple[str, str]],
    *,
    media_workers: int | str = 1,
    media_extra: str = "",
    dialplan: Path | None = None,
    log_level: str = "warning",
    mqtt_url: str = "embedded://127.0.0.1:0",
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `softswitch serve` with every port 0, data under `work`; returns the process and its SIP port.

    `media_extra` is TOML added to the `[media]` table (e.g. `max_calls = 2048`). `mqtt_url` is `[mqtt]
    url`: the embedded broker on a free port by default, or `mqtt://127.0.0.1:PORT` for an external one
    (the ports the node chose, MQTT included, are in `work/data/ports.json`). The node runs in its own
    session, so `stop_softswitch` can take its media workers down with it.
    """
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    cfg = work / "softswitch.toml"
    workers = f'"{media_workers}"' if isinstance(media_workers, str) else str(media_workers)
    user_tables = "".join(f'\n[[users]]\nname = "{u}"\npassword = "{p}"\n' for u, p in users)
    cfg.write_text(
        f'data_dir = "{data}"\ndialplan = "{dialplan or ROOT / "dialplans" / "default.yaml"}"\n'
        f'[sip]\nlisten = "127.0.0.1:0"\ndomain = "127.0.0.1"\n'
        f"auth_max_failures = 1000\n[media]\nworkers = {workers}\n{media_extra}\n"
        f'[http]\nlisten = "127.0.0.1:0"\n[mqtt]\nurl = "{mqtt_url}"\n'
        f'[log]\nlevel = "{log_level}"\nformat = "json"\n[store]\nurl = "sqlite:///{data}/softswitch.db"\n'
        f"{user_tables}"
    )
    log = open(work / "softswitch.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [str(SOFTSWITCH_EXE), "serve", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        start_new_session=True,
    )
    log.close()
    ports_file = data / "ports.json"
    deadline = time.time() + NODE_START_TIMEOUT_S
    while True:
        if ports_file.exists():
            with contextlib.suppress(ValueError):
                ports = json.loads(ports_file.read_text())
                return proc, int(ports["sip"])
        if proc.poll() is not None or time.time() > deadline:
            stop_softswitch(proc)
            raise SystemExit(f"softswitch did not start: see {work / 'softswitch.log'}")
        time.sleep(0.1)


def stop_softswitch(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM to the node, then SIGKILL to its session (media workers included) if it overstays."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(NODE_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(NODE_STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the node left behind in its session
    return proc.returncode


# --- SIPp -----------------------------------------------------------------------------------------------


def auth_csv(path: Path, users: Iterable[tuple[str, str]]) -> Path:
    """A SIPp injection file: field0 = user, field1 = the whole [authentication …] keyword (TESTING.md)."""
    lines = ["SEQUENTIAL"] + [f"{u};[authentication username={u} password={p}]" for u, p in users]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class SippOutcome:
    """What one finished SIPp run reports: the cumulative statistics row, response times, warnings."""

    exit_code: int | None
    elapsed_s: float
    stats: dict[str, str]
    rtts: dict[str, list[float]]  # rtd name ("1", "2", …) → response times in ms
    peak_current_calls: int
    watchdog: bool
    cpu_s: float | None  # the SIPp process's own CPU time (user + system), when it was reaped here
    error_tail: list[str] = field(default_factory=list)

    def count(self, name: str) -> int:
        with contextlib.suppress(ValueError):
            return int(float(self.stats.get(name, "0")))
        return 0

    @property
    def successful(self) -> int:
        return self.count("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self.count("FailedCall(C)")

    @property
    def retransmissions(self) -> int:
        return self.count("Retransmissions(C)")


def sipp_command(
    scenario: str,
    *,
    local_port: int,
    target_port: int | None,
    media_port: int | None = None,
    calls: int | None = None,
    rate: float | None = None,
    limit: int | None = None,
    injection: Path | None = None,
    sets: dict[str, str] | None = None,
    extra: Sequence[str] = (),
    timeout_s: float,
    transport: str = "u1",
) -> list[str]:
    """A SIPp 3.6.1 command line on loopback with statistics (-fd 1 s), response times and errors traced."""
    cmd = [
        "sipp", "-sf", str(SCENARIOS / f"{scenario}.xml"), "-i", "127.0.0.1", "-p", str(local_port),
        "-t", transport, "-nostdin", "-buff_size", str(SIPP_BUFF_SIZE), "-timeout", f"{int(timeout_s)}s",
        "-trace_stat", "-fd", "1", "-stf", "stats.csv", "-trace_rtt", "-rtt_freq", "1",
        "-trace_err", "-error_file", "errors.log",
    ]  # fmt: skip
    if media_port is not None:
        cmd += ["-mp", str(media_port)]
    if calls is not None:
        cmd += ["-m", str(calls), "-timeout_error"]
    if rate is not None:
        cmd += ["-r", f"{rate:g}"]
    if limit is not None:
        cmd += ["-l", str(limit)]
    if injection is not None:
        cmd += ["-inf", str(injection)]
    for name, value in (sets or {}).items():
        cmd += ["-set", name, value]
    cmd += list(extra)
    if target_port is not None:
        cmd.append(f"127.0.0.1:{target_port}")
    return cmd


def start_sipp(cmd: Sequence[str], rundir: Path) -> subprocess.Popen[bytes]:
    """Start SIPp in `rundir` (its traces land there), stdout discarded, stderr to rundir/stderr.log."""
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / "command.txt").write_text(" ".join(cmd) + "\n")
    with open(rundir / "stderr.log", "wb") as err:
        return subprocess.Popen(
            list(cmd), cwd=rundir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )


def wait_sipp(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int | None, float | None]:
    """Reap SIPp with wait4 so its own CPU time is known; SIGKILL after `timeout_s`. (exit code, CPU s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            return proc.poll(), None
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            deadline = time.monotonic() + SIPP_STOP_TIMEOUT_S
        time.sleep(0.05)


def stop_sipp(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> float | None:
    """Stop a SIPp that runs without -m (a UAS) by its PID; returns its CPU seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    return wait_sipp(proc, SIPP_STOP_TIMEOUT_S)[1]


def read_outcome(rundir: Path, exit_code: int | None, elapsed_s: float, cpu_s: float | None) -> SippOutcome:
    """Parse stats.csv (header row, one row a second, last row cumulative), *_rtt.csv and the logs."""
    stats: dict[str, str] = {}
    peak = 0
    stats_file = rundir / "stats.csv"
    if stats_file.exists():
        rows = [r.split(";") for r in stats_file.read_text().splitlines() if r.strip()]
        if len(rows) > 1:
            stats = dict(zip(rows[0], rows[-1], strict=False))
            column = rows[0].index("CurrentCall") if "CurrentCall" in rows[0] else None
            if column is not None:
                for row in rows[1:]:
                    with contextlib.suppress(ValueError, IndexError):
                        peak = max(peak, int(row[column]))
    rtts: dict[str, list[float]] = {}
    for f in rundir.glob("*_rtt.csv"):
        for line in f.read_text().splitlines()[1:]:
            parts = line.split(";")  # Date_ms;response_time_ms;rtd_no
            if len(parts) >= 3:
                with contextlib.suppress(ValueError):
                    rtts.setdefault(parts[2].strip(), []).append(float(parts[1]))
    for values in rtts.values():
        values.sort()
    texts = []
    for name in ("stderr.log", "errors.log"):
        with contextlib.suppress(OSError):
            texts.append((rundir / name).read_text(errors="replace"))
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    return SippOutcome(
        exit_code=exit_code,
        elapsed_s=round(elapsed_s, 2),
        stats=stats,
        rtts=rtts,
        peak_current_calls=peak,
        # SIPp's own overload warning (TESTING.md): such a run measured SIPp, not the target.
        watchdog=any("watchdog" in line.lower() for line in lines),
        cpu_s=cpu_s,
        error_tail=lines[-5:],
    )


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None for no values)."""
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 2)
