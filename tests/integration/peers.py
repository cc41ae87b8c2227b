"""Real SIP peers for the integration tests: a SIPp 3.6.1 runner and a baresip 1.0.0 driver.

SIPp plays the scenarios in ``sipp_scenarios/`` (RFC 3261 §10 registration with §22 digest authentication,
§12-§13 dialogs through a §16.6 record-routing proxy); baresip is a real phone, driven over its ``ctrl_tcp``
socket (netstring-framed JSON). Every address involved is 127.0.0.1; every process is bounded in time and
stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

LOOPBACK = "127.0.0.1"  # the only network target any test may have
REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIO_DIR = REPO_ROOT / "sipp_scenarios"
SIPP_PCAP_G711A = Path("/usr/share/sip-tester/g711a.pcap")  # PCMA, about 7 s; the RTP scenarios play it

SIPP_BUFF_SIZE = 4_194_304  # socket buffers: with the default, SIPp drops datagrams at a few hundred/s
DEFAULT_SIPP_TIMEOUT_S = 30.0  # a run of a few calls on loopback takes well under a second
SIPP_KILL_GRACE_S = 10.0  # beyond SIPp's own -timeout before we kill it: it should have exited by then
SIPP_STAT_PERIOD_S = 1  # -fd: a stats row a second, so a killed run still leaves numbers
PROCESS_STOP_TIMEOUT_S = 5.0  # SIGTERM to exit for a peer process, then SIGKILL
PORT_SEARCH_ATTEMPTS = 200  # free-port probes before giving up (each is one bind on loopback)
# Port ranges (several consecutive ports) come from below Linux's ephemeral range (32768-60999), so
# outgoing connections cannot take them, and outside the softswitch's default RTP range (20000-29999):
# 10000-19999 and 30000-32767 (a whole suite's worth of RTP ranges does not fit in the second alone).
PORT_RANGES = ((10_000, 20_000), (30_000, 32_768))

BARESIP_START_TIMEOUT_S = 10.0  # until the control socket accepts: baresip starts in well under 1 s
BARESIP_MAX_LIFETIME_S = 600  # `baresip -t`: a leaked instance quits by itself after this
BARESIP_COMMAND_TIMEOUT_S = 5.0  # a ctrl_tcp command is answered at once; 5 s means it is stuck
BARESIP_RTP_PORT_SPAN = 20  # RTP/RTCP ports per instance: 2 per call, BARESIP_MAX_CALLS calls, spare
BARESIP_MAX_CALLS = 4  # call_max_calls: tests never hold more on one phone
NETSTRING_MAX_LEN = 1_000_000  # a ctrl_tcp message larger than this is a framing error, not data
REGINFO_POLL_S = 0.1  # registration on loopback completes in milliseconds; poll often, cheaply
RECORDING_SETTLE_S = 2.0  # libsndfile finalises the WAV header when the call's audio stream closes
WAV_HEADER_BYTES = 44  # the canonical RIFF/WAVE header libsndfile writes
WAV_RATE_HZ = 8_000  # the phones speak PCMU: sndfile records the decoder output at 8 kHz, 16-bit mono

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


class PeerError(Exception):
    """A peer could not be started, driven or stopped as expected."""


# --------------------------------------------------------------------------------------------- ports


def _bindable(port: int, *, udp: bool, tcp: bool) -> bool:
    kinds = ([socket.SOCK_DGRAM] if udp else []) + ([socket.SOCK_STREAM] if tcp else [])
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                return False
    return True


def free_port(*, span: int = 1, udp: bool = True, tcp: bool = True, step: int = 1) -> int:
    """A port P on 127.0.0.1 such that P, P+step, … (``span`` ports) are free for UDP and/or TCP.

    Ports are never handed out twice by one test process; another process may still take one before it
    is used, which the callers' own bind errors then report.
    """
    for _ in range(PORT_SEARCH_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((LOOPBACK, 0))
            base = int(sock.getsockname()[1])
        if span > 1:
            floor, ceiling = random.choice(PORT_RANGES)
            base = random.randrange(floor, ceiling - span * step)
        ports = [base + i * step for i in range(span)]
        with _handed_out_lock:
            if any(p in _handed_out for p in ports):
                continue
            if all(_bindable(p, udp=udp, tcp=tcp) for p in ports):
                _handed_out.update(ports)
                return base
    raise PeerError(f"no free loopback port range of {span} found")


def require_binary(name: str) -> str:
    """Absolute path of a peer binary, or PeerError telling how to install it."""
    path = shutil.which(name)
    if path is None:
        raise PeerError(f"`{name}` is not installed: run `make test`, which installs the test peers")
    return path


def _stop_process(
    proc: subprocess.Popen[bytes], timeout_s: float = PROCESS_STOP_TIMEOUT_S, *, graceful: bool = True
) -> int:
    """SIGTERM, bounded wait, then SIGKILL (at once when not ``graceful``) — always by the process's own
    PID."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
    return proc.returncode


def _tail(path: Path, limit: int = 4_000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")


# ---------------------------------------------------------------------------------------------- SIPp


def scenario_path(scenario: str | Path) -> Path:
    """A scenario given by bare name (``register_digest``) resolves against ``sipp_scenarios/``."""
    path = Path(scenario)
    if path.is_absolute() or path.exists():
        return path.resolve()
    name = path.name if path.suffix == ".xml" else f"{path.name}.xml"
    return SCENARIO_DIR / name


def auth_keyword(user: str, password: str) -> str:
    """The whole ``[authentication …]`` keyword as a CSV field: SIPp 3.6.1 does not expand ``[fieldN]``
    inside it, so per-user credentials must be written out in full (TESTING.md)."""
    if any(c in user + password for c in " ;]\n"):
        raise ValueError("credentials with spaces, ';', ']' or newlines cannot go through a SIPp CSV")
    return f"[authentication username={user} password={password}]"


def users_csv(users: Sequence[tuple[str, str]]) -> str:
    """SIPp injection file: field0 = user, field1 = the authentication keyword for that user."""
    lines = ["SEQUENTIAL"] + [f"{user};{auth_keyword(user, password)};" for user, password in users]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SippResult:
    """What one SIPp run left: exit status, the cumulative stats row, and its traces."""

    command: tuple[str, ...]
    returncode: int
    stats: Mapping[str, str]
    errors: str
    messages: str
    screen: str
    elapsed_s: float
    killed: bool

    def stat(self, column: str) -> int:
        """An integer counter of the last stats row (e.g. ``SuccessfulCall(C)``); 0 when absent."""
        value = self.stats.get(column, "").strip()
        return int(value) if value.lstrip("-").isdigit() else 0

    @property
    def successful(self) -> int:
        return self.stat("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self.stat("FailedCall(C)")

    @property
    def retransmissions(self) -> int:
        return self.stat("Retransmissions(C)")

    @property
    def watchdog_fired(self) -> bool:
        """SIPp's own scheduler fell behind: the run measured SIPp, not the system under test."""
        return self.stat("WatchdogMajor(C)") > 0 or self.stat("WatchdogMinor(C)") > 0

    @property
    def call_rate(self) -> float:
        """Calls per second over the whole run, as SIPp computed it (``CallRate(C)``)."""
        try:
            return float(self.stats.get("CallRate(C)", "0"))
        except ValueError:
            return 0.0

    @property
    def response_time_ms(self) -> float | None:
        """``ResponseTime1(C)`` (first rtd timer) in milliseconds, when the scenario measures one."""
        value = self.stats.get("ResponseTime1(C)")
        if not value:
            return None
        match = re.fullmatch(r"(\d+):(\d+):(\d+):(\d+)", value.strip())
        if match is None:
            return None
        h, m, s, us = (int(g) for g in match.groups())
        return ((h * 60 + m) * 60 + s) * 1000 + us / 1000

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.killed and self.failed == 0

    def _traced(self, direction: str) -> list[str]:
        out: list[str] = []
        for block in self.messages.split(f"message {direction}")[1:]:
            text = block.split(":", 1)[1] if ":" in block else block
            out.append(text.split("\n-----------", 1)[0].strip())
        return out

    def received_messages(self) -> list[str]:
        """Text of every SIP message SIPp received, in order (needs a run with message tracing)."""
        return self._traced("received")

    def sent_messages(self) -> list[str]:
        """Text of every SIP message SIPp sent, retransmissions included (needs message tracing)."""
        return self._traced("sent")

    def message_times(self, start: str, direction: str = "received") -> list[float]:
        """Wall-clock times (epoch seconds) of the traced messages whose first line starts with ``start``."""
        times: list[float] = []
        pattern = re.compile(
            r"-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\n[A-Z]+ message " + direction
            + r"[^\n]*\n\n(.*?)\n",
            re.S,
        )  # fmt: skip
        for match in pattern.finditer(self.messages):
            if match.group(2).startswith(start):
                stamp = time.strptime(match.group(1).split(".")[0], "%Y-%m-%d %H:%M:%S")
                times.append(time.mktime(stamp) + float("0." + match.group(1).split(".")[1]))
        return times

    def received_statuses(self) -> list[int]:
        """Status codes of every response SIPp received, in order (needs message tracing)."""
        statuses: list[int] = []
        for message in self.received_messages():
            match = re.match(r"SIP/2\.0 (\d{3}) ", message)
            if match:
                statuses.append(int(match.group(1)))
        return statuses

    def describe(self) -> str:
        """Everything needed to understand a failed run, for assertion messages."""
        keys = ("SuccessfulCall(C)", "FailedCall(C)", "CallRate(C)", "Retransmissions(C)")
        stats = ", ".join(f"{k}={self.stats.get(k, '?')}" for k in keys)
        failures = ", ".join(
            f"{k}={v}"
            for k, v in self.stats.items()
            if k.startswith("Failed") and k.endswith("(C)") and v != "0"
        )
        return (
            f"sipp exit {self.returncode}{' (killed)' if self.killed else ''} in {self.elapsed_s:.1f} s: "
            f"{stats}; {failures or 'no failure counters'}\n"
            f"command: {' '.join(self.command)}\n"
            f"errors:\n{self.errors[-3000:]}\n"
            f"last messages:\n{self.messages[-3000:]}\n"
            f"screen:\n{self.screen[-1500:]}"
        )


class SippProcess:
    """One running SIPp (started by :meth:`Sipp.start`)."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        command: Sequence[str],
        rundir: Path,
        timeout_s: float,
        *,
        local_port: int,
    ) -> None:
        self.proc = proc
        self.command = tuple(command)
        self.rundir = rundir
        self.timeout_s = timeout_s
        self.local_port = local_port
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self) -> SippResult:
        """Wait for SIPp to exit by itself (it has ``-timeout``); kill it if it overruns by
        SIPP_KILL_GRACE_S."""
        killed = False
        remaining = self.timeout_s + SIPP_KILL_GRACE_S - (time.monotonic() - self.started)
        try:
            self.proc.wait(timeout=max(0.1, remaining))
        except subprocess.TimeoutExpired:
            killed = True
            _stop_process(self.proc)
        return self._result(killed)

    def stop(self) -> SippResult:
        """Stop a SIPp that would otherwise run on (a UAS waiting for calls)."""
        killed = self.proc.poll() is None
        _stop_process(self.proc)
        return self._result(killed)

    def _result(self, killed: bool) -> SippResult:
        return SippResult(
            command=self.command,
            returncode=self.proc.returncode if self.proc.returncode is not None else -1,
            stats=_last_stats_row(self.rundir / "stats.csv"),
            errors=_tail(self.rundir / "errors.log", 200_000),
            messages=_tail(self.rundir / "messages.log", 2_000_000),
            screen=_tail(self.rundir / "screen.log", 20_000),
            elapsed_s=time.monotonic() - self.started,
            killed=killed,
        )


def _last_stats_row(path: Path) -> dict[str, str]:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    header = lines[0].split(";")
    row = lines[-1].split(";")
    return {name: value for name, value in zip(header, row, strict=False) if name}


class SippOptions(TypedDict, total=False):
    """Options of one SIPp run (see :meth:`Sipp.command`)."""

    transport: str  # -t: "u1" (UDP, one socket) or "t1" (TCP, one connection)
    calls: int  # -m: stop after this many calls
    rate: float  # -r: calls started per second
    limit: int | None  # -l: calls in flight at most
    timeout_s: float  # -timeout (with -timeout_error): SIPp's own hard stop
    keys: Mapping[str, str]  # -key NAME VALUE: [NAME] in the scenario
    sets: Mapping[str, str]  # -set NAME VALUE: [$NAME] in the scenario
    trace_msg: bool  # -trace_msg: every message into messages.log (costly under load)
    default_behaviors: str  # -default_behaviors
    extra_args: Sequence[str]  # anything else, e.g. -s USER, -d MS


class Sipp:
    """Runs SIPp scenarios against a target on 127.0.0.1, each run in its own directory."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("sipp")
        self.workdir = workdir
        self.runs = 0

    def command(
        self,
        scenario: str | Path,
        target_port: int | None,
        *,
        local_port: int,
        transport: str = "u1",
        calls: int = 1,
        rate: float = 10.0,
        limit: int | None = None,
        timeout_s: float = DEFAULT_SIPP_TIMEOUT_S,
        inf: Path | None = None,
        keys: Mapping[str, str] | None = None,
        sets: Mapping[str, str] | None = None,
        trace_msg: bool = True,
        default_behaviors: str = "abortunexp",
        extra_args: Sequence[str] = (),
    ) -> list[str]:
        """The SIPp command line (paths are relative to the run directory)."""
        if transport not in ("u1", "t1", "un", "tn"):
            raise ValueError(f"unsupported SIPp transport {transport!r}")
        media_port = free_port(span=2, udp=True, tcp=False, step=2)  # RTP echo port and +2
        control_port = free_port(udp=True, tcp=False)
        cmd = [
            self.binary,
            "-sf",
            str(scenario_path(scenario)),
            "-i",
            LOOPBACK,
            "-p",
            str(local_port),
            "-mp",
            str(media_port),
            "-cp",
            str(control_port),
            "-t",
            transport,
            "-m",
            str(calls),
            "-r",
            f"{rate:g}",
            "-timeout",
            f"{timeout_s:g}s",
            "-timeout_error",
            "-nostdin",
            # "abortunexp": an unexpected message ends the call at once (it fails); "bye" is left out so a
            # failed REGISTER is never followed by SIPp's automatic BYE/CANCEL.
            "-default_behaviors",
            default_behaviors,
            "-buff_size",
            str(SIPP_BUFF_SIZE),
            "-trace_stat",
            "-stf",
            "stats.csv",
            "-fd",
            str(SIPP_STAT_PERIOD_S),
            "-trace_err",
            "-error_file",
            "errors.log",
            "-trace_screen",
            "-screen_file",
            "screen.log",
        ]
        if limit is not None:
            cmd += ["-l", str(limit)]
        if trace_msg:
            cmd += ["-trace_msg", "-message_file", "messages.log"]
        if inf is not None:
            cmd += ["-inf", str(inf)]
        for name, value in (keys or {}).items():
            cmd += ["-key", name, value]
        for name, value in (sets or {}).items():
            cmd += ["-set", name, value]
        cmd += list(extra_args)
        if target_port is not None:
            cmd.append(f"{LOOPBACK}:{target_port}")
        return cmd

    def start(
        self,
        scenario: str | Path,
        target_port: int | None = None,
        *,
        users: Sequence[tuple[str, str]] | None = None,
        local_port: int | None = None,
        **options: Unpack[SippOptions],
    ) -> SippProcess:
        """Start SIPp in the background (a UAS, or a UAC to wait for later). ``users`` become the
        injection file (field0 = user, field1 = its ``[authentication …]`` keyword)."""
        self.runs += 1
        rundir = self.workdir / f"sipp-{self.runs:03d}-{scenario_path(scenario).stem}"
        rundir.mkdir(parents=True)
        inf: Path | None = None
        if users is not None:
            inf = rundir / "users.csv"
            inf.write_text(users_csv(users))
        port = local_port if local_port is not None else free_port()
        cmd = self.command(scenario, target_port, local_port=port, inf=inf, **options)
        timeout_s = options.get("timeout_s", DEFAULT_SIPP_TIMEOUT_S)
        with (rundir / "stdout.log").open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=rundir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        return SippProcess(proc, cmd, rundir, timeout_s, local_port=port)

    def run(
        self,
        scenario: str | Path,
        target_port: int | None,
        *,
        users: Sequence[tuple[str, str]] | None = None,
        local_port: int | None = None,
        **options: Unpack[SippOptions],
    ) -> SippResult:
        """Run SIPp to completion (bounded by ``timeout_s``) and return its result."""
        return self.start(scenario, target_port, users=users, local_port=local_port, **options).wait()


# ------------------------------------------------------------------------------------------- baresip


@dataclass(frozen=True)
class BaresipEvent:
    """One event of baresip's ctrl_tcp socket (``{"event": true, "type": …}``)."""

    type: str
    param: str
    call_id: str
    peer_uri: str
    direction: str
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class TracedMessage:
    """One SIP message from baresip's ``-s`` trace: who sent it to whom, and its text."""

    transport: str  # "UDP" or "TCP"
    source: str  # "host:port"
    destination: str  # "host:port"
    text: str

    @property
    def start_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    @property
    def method(self) -> str | None:
        """The request method, or None for a response."""
        first = self.start_line
        return None if first.startswith("SIP/2.0") else first.split(" ", 1)[0]

    @property
    def status(self) -> int | None:
        first = self.start_line
        return int(first.split(" ")[1]) if first.startswith("SIP/2.0 ") else None


_REGINFO_OK = re.compile(r"\sOK\s")  # reginfo: "> sip:1001@127.0.0.1:5060   OK   Expires 300s"
_TRACE_HEADER = re.compile(r"^(UDP|TCP|TLS) (\S+) -> (\S+)$")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class _ControlState:
    events: list[BaresipEvent] = field(default_factory=list)
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)
    error: str | None = None


class Baresip:
    """A baresip 1.0.0 instance with its own config dir, driven over ctrl_tcp.

    The account registers ``user`` at ``127.0.0.1:registrar_port`` (RFC 3261 §10) over ``transport``;
    with ``registrar_port=None`` it does not register (direct calls). The instance sends ``tone_wav`` as its
    microphone and the sndfile module records what it sent (``*-enc.wav``) and heard (``*-dec.wav``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        user: str,
        tone_wav: Path,
        password: str | None = None,
        registrar_port: int | None = None,
        transport: str = "udp",
        answermode: str = "auto",
        regint: int = 300,
        name: str | None = None,
    ) -> None:
        if transport not in ("udp", "tcp"):
            raise ValueError(f"unsupported transport {transport!r}")
        if answermode not in ("auto", "manual"):
            raise ValueError(f"unsupported answermode {answermode!r}")
        self.binary = require_binary("baresip")
        self.user = user
        self.password = password
        self.registrar_port = registrar_port
        self.transport = transport
        self.answermode = answermode
        self.regint = regint if registrar_port is not None else 0
        self.tone_wav = tone_wav.resolve()
        self.name = name or user
        self.dir = (workdir / f"baresip-{self.name}").resolve()
        self.rec_dir = self.dir / "rec"
        self.log_path = self.dir / "baresip.log"
        # sip_listen P also takes P+1 for TLS (TESTING.md), so reserve both for UDP and TCP.
        self.sip_port = free_port(span=2)
        self.ctrl_port = free_port(udp=False, tcp=True)
        self.rtp_port_min = free_port(span=BARESIP_RTP_PORT_SPAN, udp=True, tcp=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._state = _ControlState()
        self._cond = threading.Condition()
        self._tokens = 0

    # -- configuration ------------------------------------------------------------------------------

    @property
    def aor(self) -> str:
        """The account's address of record."""
        port = self.registrar_port if self.registrar_port is not None else self.sip_port
        suffix = ";transport=tcp" if self.transport == "tcp" else ""
        return f"sip:{self.user}@{LOOPBACK}:{port}{suffix}"

    @property
    def direct_uri(self) -> str:
        """URI reaching this phone directly, without a registrar. It names no transport: the caller's
        account adds its own (baresip appends ``;transport=tcp`` for a TCP account)."""
        return f"sip:{self.user}@{LOOPBACK}:{self.sip_port}"

    def _config_text(self) -> str:
        rtp_max = self.rtp_port_min + BARESIP_RTP_PORT_SPAN - 1
        return "\n".join(
            [
                "poll_method\t\tepoll",
                f"sip_listen\t\t{LOOPBACK}:{self.sip_port}",
                f"net_interface\t\t{LOOPBACK}",
                # Any name lookup goes to loopback: nothing here may query an outside resolver.
                f"dns_server\t\t{LOOPBACK}:53",
                "call_local_timeout\t120",
                f"call_max_calls\t\t{BARESIP_MAX_CALLS}",
                f"audio_source\t\taufile,{self.tone_wav}",
                "audio_player\t\talsa,null",
                "audio_alert\t\talsa,null",
                f"rtp_ports\t\t{self.rtp_port_min}-{rtp_max}",
                "rtcp_mux\t\tno",
                "jitter_buffer_delay\t5-10",
                "statmode_default\toff",
                "module_path\t\t/usr/lib/baresip/modules",
                "module\t\t\tg711.so",
                "module\t\t\talsa.so",
                "module\t\t\taufile.so",
                "module\t\t\tsndfile.so",
                "module_tmp\t\taccount.so",
                "module_app\t\tmenu.so",
                "module_app\t\tctrl_tcp.so",
                f"ctrl_tcp_listen\t\t{LOOPBACK}:{self.ctrl_port}",
                f"snd_path\t\t{self.rec_dir}",
                "",
            ]
        )

    def _account_text(self) -> str:
        params = [f"answermode={self.answermode}", f"regint={self.regint}"]
        if self.password is not None:
            params.append(f"auth_pass={self.password}")
        params += ["audio_codecs=pcmu", "medianat=", "mwi=no", "ptime=20"]
        return f"<{self.aor}>;" + ";".join(params) + "\n"

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> Baresip:
        """Write the config dir, start ``baresip -f DIR`` and connect to its control socket."""
        self.rec_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config").write_text(self._config_text())
        (self.dir / "accounts").write_text(self._account_text())
        (self.dir / "contacts").write_text("")
        cmd = [self.binary, "-f", str(self.dir), "-s", "-t", str(BARESIP_MAX_LIFETIME_S)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + BARESIP_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise PeerError(f"baresip {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self._sock = socket.create_connection((LOOPBACK, self.ctrl_port), timeout=1.0)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PeerError(
                        f"baresip {self.name}: control socket never opened:\n{self.log_tail()}"
                    ) from exc
                time.sleep(0.05)
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name=f"baresip-{self.name}", daemon=True)
        self._reader.start()
        return self

    def stop(self, *, graceful: bool = True) -> int | None:
        """Quit baresip and close the control socket. Gracefully (SIGTERM by PID), baresip first removes
        its registration, waiting for the registrar up to PROCESS_STOP_TIMEOUT_S before SIGKILL;
        otherwise it is killed at once."""
        code: int | None = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self.proc is not None:
            code = _stop_process(self.proc, graceful=graceful)
        if self._reader is not None:
            self._reader.join(timeout=PROCESS_STOP_TIMEOUT_S)
            self._reader = None
        return code

    def __enter__(self) -> Baresip:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, limit: int = 6_000) -> str:
        """The end of baresip's output (with the SIP trace of ``-s``), for assertion messages."""
        return _tail(self.log_path, limit)

    def sip_trace(self) -> list[TracedMessage]:
        """Every SIP message this phone sent or received, parsed from its ``-s`` trace (each message is
        framed by a coloured ``#`` line, a ``PROTO src -> dst`` line, and a colour reset line)."""
        text = self.log_path.read_text(errors="replace").replace("\r\n", "\n")
        messages: list[TracedMessage] = []
        current: tuple[str, str, str] | None = None
        lines: list[str] = []
        for raw in text.split("\n"):
            line = _ANSI_ESCAPE.sub("", raw)
            header = _TRACE_HEADER.match(line)
            if header is not None:
                current = (header.group(1), header.group(2), header.group(3))
                lines = []
            elif current is not None and raw.startswith("\x1b[") and line == "":
                messages.append(TracedMessage(*current, text="\n".join(lines).strip()))
                current = None
            elif current is not None:
                lines.append(line)
        return messages

    # -- control socket (netstrings of JSON) --------------------------------------------------------

    def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        buffer = b""
        try:
            while True:
                data = sock.recv(65_536)
                if not data:
                    break
                buffer += data
                while True:
                    colon = buffer.find(b":")
                    if colon < 0:
                        break
                    if not buffer[:colon].isdigit() or colon > len(str(NETSTRING_MAX_LEN)):
                        raise PeerError(f"bad netstring prefix {buffer[:40]!r}")
                    length = int(buffer[:colon])
                    if length > NETSTRING_MAX_LEN:
                        raise PeerError(f"netstring of {length} bytes")
                    end = colon + 1 + length
                    if len(buffer) < end + 1:
                        break
                    if buffer[end : end + 1] != b",":
                        raise PeerError("netstring without its trailing comma")
                    self._dispatch(json.loads(buffer[colon + 1 : end]))
                    buffer = buffer[end + 1 :]
        except (OSError, ValueError, PeerError) as exc:
            with self._cond:
                self._state.error = f"control socket: {exc}"
                self._cond.notify_all()
        finally:
            with self._cond:
                self._state.error = self._state.error or "control socket closed"
                self._cond.notify_all()

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._cond:
            if message.get("event"):
                self._state.events.append(
                    BaresipEvent(
                        type=str(message.get("type", "")),
                        param=str(message.get("param", "")),
                        call_id=str(message.get("id", "")),
                        peer_uri=str(message.get("peeruri", "")),
                        direction=str(message.get("direction", "")),
                        raw=message,
                    )
                )
            elif message.get("response"):
                self._state.responses[str(message.get("token", ""))] = message
            self._cond.notify_all()

    def command(
        self, cmd: str, params: str | None = None, timeout_s: float = BARESIP_COMMAND_TIMEOUT_S
    ) -> str:
        """Send one ctrl_tcp command and return its ``data``; PeerError when it is refused or unanswered."""
        if self._sock is None:
            raise PeerError(f"baresip {self.name} is not running")
        with self._cond:
            self._tokens += 1
            token = str(self._tokens)
        request: dict[str, str] = {"command": cmd, "token": token}
        if params is not None:
            request["params"] = params
        payload = json.dumps(request).encode()
        self._sock.sendall(str(len(payload)).encode() + b":" + payload + b",")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while token not in self._state.responses:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._state.error is not None:
                    raise PeerError(
                        f"baresip {self.name}: no answer to {cmd!r} ({self._state.error or 'timeout'})"
                    )
                self._cond.wait(remaining)
            response = self._state.responses.pop(token)
        if not response.get("ok"):
            raise PeerError(f"baresip {self.name}: {cmd!r} refused: {response.get('data')!r}")
        return str(response.get("data", ""))

    @property
    def events(self) -> list[BaresipEvent]:
        """Every event received so far, in order."""
        with self._cond:
            return list(self._state.events)

    def wait_event(
        self,
        type_: str,
        timeout_s: float,
        *,
        predicate: Callable[[BaresipEvent], bool] | None = None,
    ) -> BaresipEvent:
        """The oldest not yet returned event of ``type_`` (optionally matching ``predicate``), waiting up to
        ``timeout_s``. Events of other types stay available to later waits."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for index, event in enumerate(self._state.events):
                    if index in self._state.consumed or event.type != type_:
                        continue
                    if predicate is None or predicate(event):
                        self._state.consumed.add(index)
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [e.type for e in self._state.events]
                    raise PeerError(
                        f"baresip {self.name}: no {type_} within {timeout_s:g} s; events so far: {seen}\n"
                        f"{self.log_tail()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def has_event(self, type_: str) -> bool:
        """Whether an event of ``type_`` arrived (consumed or not)."""
        with self._cond:
            return any(e.type == type_ for e in self._state.events)

    # -- phone actions ------------------------------------------------------------------------------

    def wait_registered(self, timeout_s: float = 10.0) -> str:
        """Wait until the account is registered (RFC 3261 §10.2: the registrar answered 2xx) and return
        the ``reginfo`` line saying so. Polls ``reginfo``: the REGISTER_OK event may fire before the
        control socket is connected. Fails at once on REGISTER_FAIL or a final non-2xx status."""
        deadline = time.monotonic() + timeout_s
        info = ""
        while True:
            with self._cond:
                fails = [e for e in self._state.events if e.type == "REGISTER_FAIL"]
            if fails:
                raise PeerError(
                    f"baresip {self.name}: registration failed: {fails[-1].param}\n{self.log_tail()}"
                )
            info = _ANSI_ESCAPE.sub("", self.reginfo())
            line = next((ln for ln in info.splitlines() if f"{self.user}@" in ln), "")
            if _REGINFO_OK.search(line + " "):
                return line.strip()
            if time.monotonic() >= deadline:
                raise PeerError(
                    f"baresip {self.name}: not registered within {timeout_s:g} s: {info.strip()!r}\n"
                    f"{self.log_tail()}"
                )
            time.sleep(REGINFO_POLL_S)

    def dial(self, uri: str) -> None:
        """Place a call (``dial URI``)."""
        self.command("dial", uri)

    def accept(self) -> None:
        """Answer the ringing incoming call."""
        self.command("accept")

    def hangup(self) -> None:
        """Hang up the current call (BYE, CANCEL or a rejection, as the call state requires)."""
        self.command("hangup")

    def list_calls(self) -> str:
        return self.command("listcalls")

    def reginfo(self) -> str:
        return self.command("reginfo")

    # -- recordings ---------------------------------------------------------------------------------

    def _recording(self, suffix: str, timeout_s: float) -> Path:
        deadline = time.monotonic() + timeout_s
        previous: tuple[Path, int] | None = None
        while True:
            files = sorted(self.rec_dir.glob(f"dump-*-{suffix}.wav"), key=lambda p: p.stat().st_mtime)
            if files:
                newest = files[-1]
                size = newest.stat().st_size
                # The WAV is complete once its size stops changing after the call's audio closed.
                if previous == (newest, size) and size > 44:
                    return newest
                previous = (newest, size)
            if time.monotonic() > deadline:
                raise PeerError(f"baresip {self.name}: no finished *-{suffix}.wav in {self.rec_dir}")
            time.sleep(0.2)

    def heard_s(self) -> float:
        """Seconds of audio this phone has decoded so far on its current call (the size of the
        ``*-dec.wav`` being written: 16-bit mono at 8 kHz after a 44-byte header); a mark to cut the
        recording at, since the file grows only while audio arrives."""
        files = sorted(self.rec_dir.glob("dump-*-dec.wav"), key=lambda p: p.stat().st_mtime)
        if not files:
            return 0.0
        return max(0, files[-1].stat().st_size - WAV_HEADER_BYTES) / (2 * WAV_RATE_HZ)

    def received_wav(self, timeout_s: float = RECORDING_SETTLE_S + 3.0) -> Path:
        """The recording of what this phone heard on its last call (sndfile's ``*-dec.wav``, the decoder
        output). Call it after the call closed: the WAV header is written when the stream ends."""
        return self._recording("dec", timeout_s)

    def sent_wav(self, timeout_s: float = RECORDING_SETTLE_S + 3.0) -> Path:
        """The recording of what this phone sent on its last call (sndfile's ``*-enc.wav``)."""
        return self._recording("enc", timeout_s)
