"""A media worker: one PJSUA2 endpoint driven by the controller over the control protocol.

``python -m softswitch.media.worker --controller HOST:PORT --worker-id ID --sip-port 0 --rtp-ports A-B
--edge HOST:PORT [--max-calls N] [--log-level info]``

The worker is the only code that imports ``pjsua2``. It answers and places INVITE sessions (RFC 3261 §13 as
UAS and UAC, CANCEL §9, BYE §15), mixes their RTP streams (RFC 3550) in the conference bridge, plays WAV
files and call-progress tones (ITU-T E.180), and sends and receives DTMF (RFC 4733, and SIP INFO
``application/dtmf-relay`` on receipt). It keeps no business state: the controller decides everything.

Threads (TESTING.md, "PJSUA2 facts"):

* the main thread owns every PJSUA2 object. It loops ``libHandleEvents(POLL_MS)`` and, between polls,
  executes the commands the reader queued, applies media connections, reaps disconnected legs and fires
  timers (originate timeouts). ``threadCnt = 0`` and ``medConfig.threadCnt = 0``: the library never runs
  a thread of its own.
* library callbacks run inside ``libHandleEvents`` (or inside a library call the main thread made) and
  only record state and queue events: they never call back into the library, with one exception, the
  ``503`` of admission control in ``onIncomingCall`` on the call being offered (the pattern pjsua
  documents for that callback).
* a reader thread decodes commands into a queue; a writer thread sends events and replies. Neither touches
  the library. Cyclic garbage collection is switched off and run by the main thread only, so no library
  object can ever be finalised on another thread.

A ``Call`` object is referenced from exactly one place (its leg in ``_legs``, or ``_rejecting`` while it is
being refused) and is dropped only after the library reported it DISCONNECTED; legs refer to their peers by
id, and nothing touches a ``Call`` once it is disconnected.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import importlib.metadata
import os
import queue
import re
import resource
import signal
import socket
import sys
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar, Final

import pjsua2 as pj
import structlog

from softswitch.logging import configure_logging
from softswitch.media.protocol import (
    DTMF_METHODS,
    PROTOCOL_VERSION,
    TONE_KINDS,
    Answer,
    Bridge,
    Command,
    CommandError,
    Echo,
    Event,
    FrameDecoder,
    Hangup,
    LegDtmf,
    LegIncoming,
    LegMedia,
    LegReplaced,
    LegState,
    LegTransfer,
    Listen,
    Originate,
    Ping,
    Play,
    PlayerDone,
    ProtocolError,
    Record,
    Reject,
    Reply,
    SendDtmf,
    Shutdown,
    StopPlay,
    StopRecord,
    StopTone,
    Tone,
    Unbridge,
    Unlisten,
    WorkerReady,
    encode,
)

log = structlog.get_logger("softswitch.media.worker")

LOOPBACK: Final = "127.0.0.1"  # the worker's SIP and RTP address: only the edge and local peers reach it

# --- the poll loop
POLL_MS: Final = 10  # libHandleEvents slice when idle: ~100 wake-ups per second (a command wakes it)
KEEPALIVE: Final = b"\r\n\r\n"  # RFC 5626 CRLF keep-alive: the datagram that wakes the main loop
MAX_COMMANDS_PER_POLL: Final = 64  # commands executed between two polls, so a burst cannot starve SIP I/O
GC_INTERVAL_S: Final = 5.0  # cyclic GC runs on the main thread only (see the module docstring)
CONNECT_TIMEOUT_S: Final = 10.0  # to reach the controller on loopback; it is listening before it spawns us
RECV_CHUNK: Final = 65_536  # bytes per recv() of the control stream
OUTBOX_MAX_FRAMES: Final = 100_000  # events not yet written: beyond this the controller is not reading
WRITER_FLUSH_TIMEOUT_S: Final = 2.0  # at exit, time given to the writer to send what is queued

# --- capacity probe (ARCHITECTURE.md: "Capacity is probed, never assumed")
PROBE_MAX_LEGS: Final = 1024  # PJSUA_MAX_CALLS of the high-capacity build: probing beyond costs time only
#: Set-up of 1024 loopback legs took 0.8 s on 2 quiet cores (docs/media-engine.md); on a loaded machine
#: (a node starting beside a running one, a test suite) several times that. A probe cut short by the
#: budget under-reports the capacity, so the budget is generous and the pool waits up to 30 s for it.
PROBE_BUDGET_S: Final = 10.0
PROBE_BATCH: Final = 16  # makeCall()s between two polls, keeping the INVITE burst under the socket buffer
PROBE_STALL_S: Final = 2.0  # no further leg confirmed for this long: the engine holds no more
PROBE_DRAIN_S: Final = 5.0  # bound on tearing the probe calls down
PROBE_ATTEMPTS: Final = 5  # probes tried while one holds no leg at all
PROBE_RETRY_S: Final = 1.0  # pause between them
#: Below an engine limit the worker keeps 1/64 of the legs it measured (at least one) free, so that at
#: capacity it can still create the call that answers 503 (TESTING.md: "Admission control must answer
#: 503 well before the engine's limits"); past the table pjsua itself would answer 486.
ADMISSION_HEADROOM_DIVISOR: Final = 64

# --- endpoint
CONF_CLOCK_RATE_HZ: Final = 8_000  # G.711 legs bridge without resampling (docs/media-engine.md)
CODEC_PRIORITIES: Final[dict[str, int]] = {"PCMU/8000": 255, "PCMA/8000": 254, "G722/16000": 253}
SHUTDOWN_DRAIN_S: Final = 3.0  # after hangupAllCalls, time for BYE/CANCEL transactions to complete
#: PJSUA_MAX_ACC: 64 in the high-capacity build (media-engine/config_site.h); 8 in the PyPI wheels, whose
#: ninth Account aborts the process. One account serves incoming legs, the others carry per-call From.
MAX_ACCOUNTS_HIGH_CAPACITY: Final = 64
MAX_ACCOUNTS_STOCK: Final = 8
RESERVED_ACCOUNTS: Final = 3  # the worker's own account, its direct one (links) and the capacity probe's
PJ_ETOOMANY: Final = 70010  # pj_status_t of a full call table
PJ_LOG_LEVELS: Final[dict[str, int]] = {"debug": 4, "info": 1, "warning": 1, "error": 1, "critical": 0}

# --- commands
MAX_LEG_ID_LEN: Final = 128  # leg ids are short controller-made tokens
MAX_ORIGINATE_TIMEOUT_S: Final = 3600.0  # a ring longer than an hour is a controller bug
MAX_EXTRA_HEADERS: Final = 32  # extra headers on an originate: a few X-* and P-* in practice
MAX_HEADER_VALUE_LEN: Final = 1024  # per forwarded or added header value: keeps every frame small
MAX_DTMF_DURATION_MS: Final = 60_000  # a longer reported key press is the library's "unknown"
MAX_PLAY_FILES: Final = 64  # files in one play command (a spoken number is a dozen prompts)
MAX_DTMF_DIGITS: Final = 32  # digits in one send_dtmf command
TRANSFER_RING_TIMEOUT_S: Final = 60.0  # a target a phone transferred to rings at most this long
MAX_RECORD_LEGS: Final = 32  # legs mixed into one recording (a room conference at most)
DTMF_DIGITS: Final = frozenset("0123456789*#ABCDabcd")
RETRY_AFTER_S: Final = 1  # Retry-After (RFC 3261 §20.33) on the worker's own 503
#: Headers pjsua writes itself: adding them again would make an invalid request.
RESERVED_HEADERS: Final = frozenset(
    {"from", "to", "call-id", "cseq", "via", "contact", "content-length", "content-type", "route",
     "record-route", "max-forwards"}
)  # fmt: skip
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")  # RFC 3261 §25.1 token: a header field name
IDENTITY_HEADER: Final = "x-softswitch-identity"  # set by the edge, stripped from what phones send
#: Compact header forms (RFC 3261 §7.3.3) that matter when reading an INVITE.
COMPACT_HEADERS: Final[dict[str, str]] = {"f": "from", "t": "to", "i": "call-id", "m": "contact"}

#: Call-progress tones (ITU-T E.180 Supplement 2, China/ITU 450 Hz): frequency, on ms, off ms.
TONE_PLANS: Final[dict[str, tuple[int, int, int]]] = {
    "ringback": (450, 1000, 4000),
    "busy": (450, 350, 350),
    "congestion": (450, 700, 700),
}
assert set(TONE_PLANS) == TONE_KINDS


# =========================================================================================== helpers


def engine_name() -> str:
    """Which pjsua2 is installed: "high-capacity" (built by the project), "fallback" (PyPI) or "unknown"."""
    for dist, name in (("pjsua2", "high-capacity"), ("pjsua2-python", "fallback")):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(dist)
            return name
    return "unknown"


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) → (host, port); ValueError when malformed."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port_text)


def parse_port_range(value: str) -> tuple[int, int]:
    """``A-B`` → (A, B) with 1024 <= A < B <= 65535."""
    first, sep, last = value.partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        raise ValueError(f"expected A-B, got {value!r}")
    low, high = int(first), int(last)
    if not 1024 <= low < high <= 65535:
        raise ValueError(f"port range {value!r} must satisfy 1024 <= A < B <= 65535")
    return low, high


@dataclass(frozen=True)
class RequestHead:
    """The parts of an INVITE (RFC 3261 §7.1, §7.3) a worker reports in ``leg.incoming``."""

    request_uri: str
    headers: dict[str, list[str]]  # lower-case names (compact forms expanded) → values in order
    names: dict[str, str]  # lower-case name → name as first written

    def first(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""


def parse_request_head(message: str) -> RequestHead:
    """Request-URI and header fields of a SIP request (RFC 3261 §7.3.1: folding, compact forms)."""
    head = message.replace("\r\n", "\n").split("\n\n", 1)[0]
    lines = head.split("\n")
    parts = lines[0].split(" ")
    request_uri = parts[1] if len(parts) >= 3 else ""
    unfolded: list[str] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and unfolded:
            unfolded[-1] += " " + line.strip()
        elif line:
            unfolded.append(line)
    headers: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for line in unfolded:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        written = name.strip()
        key = COMPACT_HEADERS.get(written.lower(), written.lower())
        headers.setdefault(key, []).append(value.strip())
        names.setdefault(key, written)
    return RequestHead(request_uri=request_uri, headers=headers, names=names)


def parse_name_addr(value: str) -> tuple[str, str]:
    """``"Display" <uri>;params`` or ``uri;params`` → (display, uri) (RFC 3261 §20.10, §25.1)."""
    value = value.strip()
    lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        uri = value[lt + 1 : gt if gt > lt else len(value)].strip()
        display = value[:lt].strip()
        if len(display) >= 2 and display[0] == display[-1] == '"':
            display = display[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        return display, uri
    return "", value.split(";", 1)[0].strip()


def interesting_headers(head: RequestHead) -> dict[str, str]:
    """User-Agent, P-Asserted-Identity and X-* headers, as written, each value bounded."""
    out: dict[str, str] = {}
    for key, values in head.headers.items():
        if key in ("user-agent", "p-asserted-identity") or key.startswith("x-"):
            out[head.names[key]] = ", ".join(values)[:MAX_HEADER_VALUE_LEN]
        if len(out) >= MAX_EXTRA_HEADERS:
            break
    return out


def quote_display(display: str) -> str:
    """A display name as a quoted-string (RFC 3261 §25.1)."""
    return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wav_duration_s(path: str) -> float:
    with wave.open(path, "rb") as wav:
        return wav.getnframes() / float(wav.getframerate() or 1)


def _fail(code: str, message: str) -> CommandError:
    return CommandError(code, message)


# ============================================================================================ I/O


class Outbox:
    """Frames to the controller, written by a thread of their own (never the library's thread)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self.broken = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-writer", daemon=True)
        self._thread.start()

    def send(self, frame: bytes) -> None:
        if self.broken.is_set():
            return
        with self._lock:
            self._pending += 1
            overflow = self._pending > OUTBOX_MAX_FRAMES
        if overflow:
            log.error("controller not reading: outbox full", limit=OUTBOX_MAX_FRAMES)
            self.broken.set()
            return
        self._queue.put(frame)

    def close(self, timeout_s: float = WRITER_FLUSH_TIMEOUT_S) -> None:
        """Send what is queued (bounded), then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            frame = self._queue.get()
            if frame is None:
                return
            with self._lock:
                self._pending -= 1
            if self.broken.is_set():
                continue
            try:
                self._sock.sendall(frame)
            except OSError as exc:
                log.warning("control connection lost while writing", error=str(exc))
                self.broken.set()


class Waker:
    """Ends the main thread's ``libHandleEvents`` slice at once when a command arrives.

    The library waits in epoll on its own sockets only, so a command queued by the reader thread would
    wait up to POLL_MS. A CRLF keep-alive datagram (RFC 5626 §3.5.1) to the worker's own UDP SIP port wakes
    it; pjsip recognises and drops keep-alives without parsing them as a message.
    """

    def __init__(self, port: int) -> None:
        self._address = (LOOPBACK, port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def __call__(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendto(KEEPALIVE, self._address)

    def close(self) -> None:
        self._sock.close()


def read_commands(
    sock: socket.socket, commands: queue.SimpleQueue[Command | None], wake: Callable[[], None] = lambda: None
) -> None:
    """Reader thread: decode commands into ``commands``; ``None`` marks the end of the connection."""
    decoder = FrameDecoder()
    try:
        while True:
            data = sock.recv(RECV_CHUNK)
            if not data:
                log.info("controller closed the connection")
                return
            queued = False
            for message in decoder.feed(data):
                if not isinstance(message, Command):
                    raise ProtocolError(f"a worker accepts commands only, got {type(message).__name__}")
                commands.put(message)
                queued = True
            if queued:
                wake()
    except ProtocolError as exc:
        log.error("protocol error from the controller: closing", error=str(exc))
    except OSError as exc:
        log.info("control connection ended", error=str(exc))
    finally:
        commands.put(None)


# ====================================================================================== PJSUA2 glue


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """A Python exception must not cross back into the library (SWIG turns it into a C++ exception that
    nothing in pjsip catches): log it and return."""

    def run(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("library callback failed", callback=callback.__name__)

    run.__name__ = callback.__name__
    return run


class _LogWriter(pj.LogWriter):  # type: ignore[misc]
    """Library log lines into our structured log (called on the library's thread).

    Muted during the capacity probe, whose expected failures (full table, RTP ports exhausted) would
    otherwise print one error per refused leg; the probe logs its own summary.
    """

    muted = False

    @_guarded
    def write(self, entry: Any) -> None:
        if self.muted:
            return
        msg = str(entry.msg).rstrip()
        if msg:
            log.info("pjsip", level=int(entry.level), msg=msg)


class _Call(pj.Call):  # type: ignore[misc]
    """A leg's PJSUA2 call: callbacks hand over to the worker, which only records and queues."""

    def __init__(self, worker: Worker, account: Any, call_id: int | None = None) -> None:
        if call_id is None:
            super().__init__(account)
        else:
            super().__init__(account, call_id)
        self.worker = worker
        self.leg_id = ""

    @_guarded
    def onCallState(self, prm: Any) -> None:
        self.worker._on_call_state(self)

    @_guarded
    def onCallMediaState(self, prm: Any) -> None:
        self.worker._on_media_state(self)

    @_guarded
    def onCallTransferRequest(self, prm: Any) -> None:
        self.worker._on_transfer_request(self, prm)

    @_guarded
    def onCallReplaced(self, prm: Any) -> None:
        self.worker._on_replaced(self, prm)

    @_guarded
    def onDtmfDigit(self, prm: Any) -> None:
        duration = int(getattr(prm, "duration", 0) or 0)
        self.worker._on_dtmf(self, str(prm.digit), int(prm.method), duration)


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    @_guarded
    def onIncomingCall(self, prm: Any) -> None:
        self.worker._on_incoming(self, prm)


class _Player(pj.AudioMediaPlayer):  # type: ignore[misc]
    def __init__(self, worker: Worker, leg_id: str, serial: int) -> None:
        super().__init__()
        self.worker = worker
        self.leg_id = leg_id
        self.serial = serial

    @_guarded
    def onEof2(self) -> None:
        self.worker._player_eofs.append((self.leg_id, self.serial))


HAS_EOF_CALLBACK: Final = hasattr(pj.AudioMediaPlayer, "onEof2")  # 2.10 lacks it: a timer stands in


# ============================================================================================ legs


@dataclass(eq=False)
class _Leg:
    """One INVITE session of this worker, as the worker tracks it."""

    id: str
    call: Any  # the only reference to the leg's _Call
    incoming: bool
    sip_call_id: str
    account_id: int
    state: str = ""  # last state reported in leg.state
    sip_code: int = 0
    answered: bool = False  # a 2xx was sent or received
    ending: bool = False  # hangup/reject/cancel issued by us
    released_by: str = ""  # decided when we end the leg; "remote" otherwise
    override: tuple[int, str] | None = None  # code and reason reported instead of the library's
    reported: bool = False  # leg.state disconnected sent: the controller has forgotten this leg
    disconnected: bool = False  # the library reported DISCONNECTED: never touch `call` again
    media_active: bool = False
    remote_hold: bool = False  # the phone holds the call (sendonly/inactive)
    hears: set[str] = field(default_factory=set)  # legs whose audio this leg receives
    heard_by: set[str] = field(default_factory=set)  # legs that receive this leg's audio
    recordings: set[str] = field(default_factory=set)  # recordings this leg's audio goes into
    echo: bool = False
    player: Any = None
    player_serial: int = 0
    player_loop: bool = False
    player_connected: bool = False
    player_length_s: float = 0.0  # 2.10 wheels (no onEof2): player.done this long after connecting
    tone: Any = None


@dataclass(eq=False)
class _Recording:
    """One recorder port: the mix of its legs' audio, written to ``path``."""

    id: str
    path: str
    recorder: Any  # pj.AudioMediaRecorder; dropping it closes the file
    started: float
    legs: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class WorkerOptions:
    controller: tuple[str, int]
    worker_id: str
    sip_port: int
    rtp_ports: tuple[int, int]
    edge: tuple[str, int]
    max_calls: int | None
    log_level: str


class Worker:
    """The worker process's state: the endpoint, its legs, and the control connection."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.engine = engine_name()
        max_accounts = MAX_ACCOUNTS_HIGH_CAPACITY if self.engine == "high-capacity" else MAX_ACCOUNTS_STOCK
        self.from_account_limit = max(0, max_accounts - RESERVED_ACCOUNTS)
        self.ep: Any = None
        self.sip_port = 0
        self.capacity = 0
        self._legs: dict[str, _Leg] = {}
        self._rejecting: dict[int, _Call] = {}  # calls refused by admission control, until DISCONNECTED
        self._rejected_done: list[int] = []  # of those, the ones the library reported DISCONNECTED
        self._ring_deadlines: dict[str, float] = {}  # unanswered originates: leg id → CANCEL time
        self._player_deadlines: dict[str, float] = {}  # 2.10 wheels: leg id → end of playback
        self._next_leg = 0
        self._account: _Account | None = None
        self._direct_account: _Account | None = None  # no pre-loaded route: worker-to-worker links
        self._from_accounts: collections.OrderedDict[str, _Account] = collections.OrderedDict()
        self._account_refs: collections.Counter[int] = collections.Counter()
        self._media_dirty: set[str] = set()
        self._recordings: dict[str, _Recording] = {}
        self._dead: list[str] = []
        self._player_eofs: collections.deque[tuple[str, int]] = collections.deque()
        self._stopping = False
        self._commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._sock: socket.socket | None = None
        self._outbox: Outbox | None = None
        self._log_writer = _LogWriter()
        self._connection_ended = False

    # ------------------------------------------------------------------------------- life cycle

    def run(self) -> int:
        """Connect, start the endpoint, probe, announce, serve; returns the process exit status."""
        raise_nofile_limit()
        gc.disable()
        host, port = self.options.controller
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._outbox = Outbox(sock)
        self._start_endpoint()
        try:
            self.capacity = self._probe_capacity()
            self._create_account()
            info = self.ep.libVersion()
            version = str(info.full)
            low, high = self.options.rtp_ports
            self._emit(
                WorkerReady(
                    worker_id=self.options.worker_id,
                    sip_host=LOOPBACK,
                    sip_port=self.sip_port,
                    capacity=self.capacity,
                    engine=self.engine,
                    pjsip_version=version,
                    rtp_ports=f"{low}-{high}",
                    pid=os.getpid(),
                )
            )
            log.info(
                "media worker ready",
                worker_id=self.options.worker_id,
                sip_port=self.sip_port,
                capacity_legs=self.capacity,
                engine=self.engine,
                pjsip=version,
                protocol=PROTOCOL_VERSION,
            )
            waker = Waker(self.sip_port)
            reader = threading.Thread(
                target=read_commands,
                args=(sock, self._commands, waker),
                name="control-reader",
                daemon=True,
            )
            reader.start()
            try:
                self._serve()
            finally:
                waker.close()
        finally:
            self._destroy()
        return 0

    def _start_endpoint(self) -> None:
        ep = pj.Endpoint()
        ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = False
        cfg.uaConfig.maxCalls = PROBE_MAX_LEGS  # pjsua clamps it to its table silently; the probe measures
        cfg.uaConfig.userAgent = "softswitch-media"
        cfg.uaConfig.stunServer.clear()
        cfg.medConfig.threadCnt = 0
        cfg.medConfig.clockRate = CONF_CLOCK_RATE_HZ
        cfg.medConfig.sndClockRate = CONF_CLOCK_RATE_HZ
        cfg.medConfig.ecTailLen = 0  # echo cancellation belongs next to a loudspeaker, not in a switch
        level = PJ_LOG_LEVELS.get(self.options.log_level, 1)
        cfg.logConfig.level = level
        cfg.logConfig.consoleLevel = level
        cfg.logConfig.writer = self._log_writer
        ep.libInit(cfg)
        self.ep = ep
        ep.audDevManager().setNullDev()
        for codec in ep.codecEnum2():
            codec_id = str(codec.codecId)
            key = codec_id.rsplit("/", 1)[0] if codec_id.count("/") >= 2 else codec_id
            ep.codecSetPriority(codec_id, CODEC_PRIORITIES.get(key, 0))
        self.sip_port = self._create_transports(ep)
        ep.libStart()

    def _create_transports(self, ep: Any) -> int:
        """One UDP transport on loopback, and no TCP on purpose.

        With a TCP transport present pjsip moves requests over 1300 bytes to TCP (RFC 3261 §18.1.1), from
        an ephemeral port; without one they stay on UDP, which on loopback carries 64 KiB datagrams. So
        every request a worker sends comes from (127.0.0.1, its SIP port), the address the edge trusts.
        """
        cfg = pj.TransportConfig()
        cfg.boundAddress = LOOPBACK
        cfg.port = self.options.sip_port
        udp = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, cfg)
        return int(str(ep.transportGetInfo(udp).localName).rsplit(":", 1)[1])

    def _account_config(self, id_uri: str, *, via_edge: bool) -> Any:
        cfg = pj.AccountConfig()
        cfg.idUri = id_uri
        if via_edge:
            edge_host, edge_port = self.options.edge
            cfg.sipConfig.proxies.append(f"sip:{edge_host}:{edge_port};lr")  # pre-loaded route, §8.1.2
        low, high = self.options.rtp_ports
        media = cfg.mediaConfig.transportConfig
        media.boundAddress = LOOPBACK
        media.port = low
        media.portRange = high - low
        nat = cfg.natConfig
        nat.iceEnabled = False
        nat.turnEnabled = False
        nat.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        nat.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        nat.sipOutboundUse = 0
        nat.contactRewriteUse = 0
        nat.viaRewriteUse = 0
        nat.sdpNatRewriteUse = 0
        # An answer listing several codecs is valid (RFC 3264 §6.1) and the first is used; pjsua would
        # otherwise re-INVITE the far end to narrow it to one: needless signalling and a glare risk.
        if hasattr(cfg.mediaConfig, "lockCodecEnabled"):  # every engine we know has it; be safe anyway
            cfg.mediaConfig.lockCodecEnabled = False
        cfg.videoConfig.autoTransmitOutgoing = False
        cfg.videoConfig.autoShowIncoming = False
        return cfg

    def _create_account(self) -> None:
        account = _Account(self)
        account.create(
            self._account_config(f"sip:{self.options.worker_id}@{LOOPBACK}:{self.sip_port}", via_edge=True)
        )
        account.setDefault()
        self._account = account
        direct = _Account(self)
        direct.create(
            self._account_config(f"sip:{self.options.worker_id}@{LOOPBACK}:{self.sip_port}", via_edge=False)
        )
        self._direct_account = direct

    def _destroy(self) -> None:
        """Hang up everything, then tear the library down (TESTING.md: the order matters)."""
        ep = self.ep
        if ep is not None:
            self._hangup_all()
            self._reap()
            self._recordings.clear()  # closes the files (the WAV header is written on close)
            for leg in self._legs.values():
                leg.player = None
                leg.tone = None
            self._legs.clear()
            self._rejecting.clear()
            for account in [self._account, self._direct_account, *self._from_accounts.values()]:
                if account is not None:
                    with contextlib.suppress(pj.Error):
                        account.shutdown()
            self._account = None
            self._direct_account = None
            self._from_accounts.clear()
            gc.collect()
            ep.libDestroy()
            self.ep = None
        if self._outbox is not None:
            self._outbox.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()

    def _hangup_all(self) -> None:
        self._stopping = True
        live = [leg for leg in self._legs.values() if not leg.disconnected]
        for leg in live:
            if not leg.ending:
                leg.ending = True
                leg.released_by = "system"
        if live or self._rejecting:
            self.ep.hangupAllCalls()
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        while time.monotonic() < deadline and (
            any(not leg.disconnected for leg in self._legs.values()) or self._rejecting
        ):
            self.ep.libHandleEvents(POLL_MS)
            self._after_poll()

    # ------------------------------------------------------------------------------- main loop

    def _serve(self) -> None:
        next_gc = time.monotonic() + GC_INTERVAL_S
        assert self._outbox is not None
        while not self._stopping:
            self.ep.libHandleEvents(POLL_MS)
            self._after_poll()
            for _ in range(MAX_COMMANDS_PER_POLL):
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd is None:
                    self._connection_ended = True
                    self._stopping = True
                    break
                self._execute(cmd)
                self._after_poll()
            now = time.monotonic()
            self._fire_timers(now)
            if self._outbox.broken.is_set():
                self._stopping = True
            if now >= next_gc:
                gc.collect()
                next_gc = now + GC_INTERVAL_S

    def _after_poll(self) -> None:
        """Work the callbacks recorded: media connections, finished players, disconnected legs."""
        while self._media_dirty:
            leg = self._legs.get(self._media_dirty.pop())
            if leg is not None and not leg.disconnected:
                self._apply_media(leg)
        while self._player_eofs:
            leg_id, serial = self._player_eofs.popleft()
            leg = self._legs.get(leg_id)
            if leg is not None and leg.player is not None and leg.player_serial == serial:
                self._finish_player(leg)
        while self._rejected_done:
            # Drops the refused call here, outside its own callback.
            self._rejecting.pop(self._rejected_done.pop(), None)
        if self._dead:
            self._reap()

    def _fire_timers(self, now: float) -> None:
        for leg_id, deadline in list(self._ring_deadlines.items()):
            if now >= deadline:
                del self._ring_deadlines[leg_id]
                leg = self._legs.get(leg_id)
                if leg is not None and not leg.disconnected and not leg.answered and not leg.ending:
                    self._originate_timed_out(leg)
        for leg_id, deadline in list(self._player_deadlines.items()):
            if now >= deadline:
                del self._player_deadlines[leg_id]
                leg = self._legs.get(leg_id)
                if leg is not None and leg.player is not None and not leg.player_loop:
                    self._finish_player(leg)

    def _originate_timed_out(self, leg: _Leg) -> None:
        """RFC 3261 §9.1: CANCEL the unanswered INVITE; the controller hears 408 at once."""
        leg.ending = True
        leg.released_by = "system"
        leg.override = (408, "timeout")
        with contextlib.suppress(pj.Error):
            leg.call.hangup(pj.CallOpParam())
        if not leg.reported:  # the CANCEL may wait for a provisional response (§9.1): do not make it wait
            leg.reported = True
            self._emit(LegState(leg.id, "disconnected", 408, "timeout", leg.sip_call_id, "system"))

    def _reap(self) -> None:
        """Forget legs the library disconnected: their Call objects are dropped here, on this thread."""
        dead, self._dead = self._dead, []
        for leg_id in dead:
            leg = self._legs.pop(leg_id, None)
            if leg is None:
                continue
            for other_id in leg.hears | leg.heard_by:
                other = self._legs.get(other_id)
                if other is not None:
                    other.hears.discard(leg_id)
                    other.heard_by.discard(leg_id)
            for recording_id in leg.recordings:
                recording = self._recordings.get(recording_id)
                if recording is not None:
                    recording.legs.discard(leg_id)
            leg.player = None
            leg.tone = None
            self._account_refs[leg.account_id] -= 1
            self._ring_deadlines.pop(leg_id, None)
            self._player_deadlines.pop(leg_id, None)
            leg.call = None

    # ------------------------------------------------------------------------------- callbacks

    def _emit(self, event: Event) -> None:
        if self._outbox is not None and not self._connection_ended:
            self._outbox.send(encode(event))

    def _on_incoming(self, account: _Account, prm: Any) -> None:
        call = _Call(self, account, prm.callId)
        if self._probing is not None:
            self._probing.incoming(call)
            return
        if self._stopping or self._live_legs() >= self.capacity:
            op = pj.CallOpParam()
            op.statusCode = pj.PJSIP_SC_SERVICE_UNAVAILABLE
            op.reason = "Worker At Capacity" if not self._stopping else "Worker Shutting Down"
            header = pj.SipHeader()
            header.hName = "Retry-After"
            header.hValue = str(RETRY_AFTER_S)
            op.txOption.headers.append(header)
            self._rejecting[call.getId()] = call
            call.hangup(op)  # RFC 3261 §21.5.4 503, from the worker itself; no leg.incoming
            log.warning("incoming INVITE refused with 503", reason=op.reason, capacity=self.capacity)
            return
        rdata = prm.rdata
        whole = str(rdata.wholeMsg)
        head = parse_request_head(whole)
        info = call.getInfo()
        self._next_leg += 1
        leg_id = f"{self.options.worker_id}-{self._next_leg}"
        call.leg_id = leg_id
        account_id = int(info.accId)
        self._account_refs[account_id] += 1
        sip_call_id = head.first("call-id") or str(info.callIdString)
        self._legs[leg_id] = _Leg(leg_id, call, True, sip_call_id, account_id)
        from_display, from_uri = parse_name_addr(head.first("from") or str(info.remoteUri))
        _, to_uri = parse_name_addr(head.first("to") or str(info.localUri))
        self._emit(
            LegIncoming(
                leg=leg_id,
                sip_call_id=sip_call_id,
                from_uri=from_uri,
                from_display=from_display,
                to_uri=to_uri,
                request_uri=head.request_uri,
                identity=head.first(IDENTITY_HEADER),
                headers=interesting_headers(head),
            )
        )

    def _on_call_state(self, call: _Call) -> None:
        if self._probing is not None:
            self._probing.state(call)
            return
        info = call.getInfo()
        state = int(info.state)
        leg = self._legs.get(call.leg_id)
        if leg is None:
            if state == pj.PJSIP_INV_STATE_DISCONNECTED and int(info.id) in self._rejecting:
                self._rejected_done.append(int(info.id))  # an admission 503 completed
            return
        if not leg.sip_call_id:
            leg.sip_call_id = str(info.callIdString)
        code = int(info.lastStatusCode)
        reason = str(info.lastReason)
        name: str
        if state == pj.PJSIP_INV_STATE_CALLING:
            name = "calling"
        elif state == pj.PJSIP_INV_STATE_EARLY:
            name = "early" if code == 183 or _audio_status(info)[0] else "ringing"
        elif state == pj.PJSIP_INV_STATE_CONNECTING:
            name = "connecting"
            leg.answered = True
        elif state == pj.PJSIP_INV_STATE_CONFIRMED:
            name = "confirmed"
            leg.answered = True
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED:
            leg.disconnected = True
            self._dead.append(leg.id)
            if leg.reported:
                return
            leg.reported = True
            if leg.override is not None:
                code, reason = leg.override
            released_by = leg.released_by or ("system" if self._stopping else "remote")
            self._emit(LegState(leg.id, "disconnected", code, reason, leg.sip_call_id, released_by))
            return
        else:
            return  # INCOMING/NULL: leg.incoming already told the controller
        if leg.reported or (name, code) == (leg.state, leg.sip_code):
            return
        leg.state, leg.sip_code = name, code
        self._emit(LegState(leg.id, name, code, reason, leg.sip_call_id))

    def _on_transfer_request(self, call: _Call, prm: Any) -> None:
        """REFER from the phone (RFC 3515): accept it (202) and let the library place the new INVITE, as
        a leg of ours whose progress its NOTIFYs carry; the controller decides what to bridge. Refused
        (603) on a leg being torn down, (503) when the worker is full."""
        leg = self._legs.get(call.leg_id)
        if leg is None or leg.reported or leg.ending:
            prm.statusCode = pj.PJSIP_SC_DECLINE
            return
        if self._stopping or self._live_legs() >= self.capacity:
            prm.statusCode = pj.PJSIP_SC_SERVICE_UNAVAILABLE
            return
        accounts = [self._account, self._direct_account, *self._from_accounts.values()]
        account = next((a for a in accounts if a is not None and int(a.getId()) == leg.account_id), None)
        if account is None:
            prm.statusCode = pj.PJSIP_SC_DECLINE
            return
        self._next_leg += 1
        new_id = f"{self.options.worker_id}-{self._next_leg}"
        new_call = _Call(self, account)
        new_call.leg_id = new_id
        self._legs[new_id] = _Leg(new_id, new_call, False, "", leg.account_id)
        self._account_refs[leg.account_id] += 1
        self._ring_deadlines[new_id] = time.monotonic() + TRANSFER_RING_TIMEOUT_S
        prm.newCall = new_call
        prm.statusCode = pj.PJSIP_SC_ACCEPTED
        target = str(prm.dstUri)
        log.info("transfer requested by the phone", leg=leg.id, new_leg=new_id, target=target)
        self._emit(LegTransfer(leg.id, new_id, target))

    def _on_replaced(self, call: _Call, prm: Any) -> None:
        """An INVITE with Replaces took this call's place (RFC 3891): the library answers the new call
        and ends this one; the new one is a leg of ours from now on."""
        old = self._legs.get(call.leg_id)
        if old is None:
            return
        new_call = _Call(self, self._account, int(prm.newCallId))
        self._next_leg += 1
        new_id = f"{self.options.worker_id}-{self._next_leg}"
        new_call.leg_id = new_id
        info = new_call.getInfo()
        account_id = int(info.accId)
        self._account_refs[account_id] += 1
        sip_call_id = str(info.callIdString)
        self._legs[new_id] = _Leg(new_id, new_call, True, sip_call_id, account_id)
        prm.newCall = new_call
        old.ending, old.released_by = True, "local"
        _, from_uri = parse_name_addr(str(info.remoteUri))
        log.info("call replaced", leg=old.id, new_leg=new_id)
        self._emit(LegReplaced(old.id, new_id, sip_call_id, from_uri))

    def _on_media_state(self, call: _Call) -> None:
        if self._probing is not None:
            return
        leg = self._legs.get(call.leg_id)
        if leg is None or leg.disconnected:
            return
        active, held = _audio_status(call.getInfo())
        if (active, held) != (leg.media_active, leg.remote_hold):
            leg.media_active, leg.remote_hold = active, held
            if not leg.reported:
                self._emit(LegMedia(leg.id, active, held))
        if active:
            self._media_dirty.add(leg.id)

    def _on_dtmf(self, call: _Call, digit: str, method: int, duration_ms: int) -> None:
        leg = self._legs.get(call.leg_id)
        if leg is None or leg.reported:
            return
        name = "info" if method == pj.PJSUA_DTMF_METHOD_SIP_INFO else "rfc4733"
        assert name in DTMF_METHODS
        # PJSUA_UNKNOWN_DTMF_DURATION (all bits set) and other nonsense read as "not known".
        known = duration_ms if 0 < duration_ms <= MAX_DTMF_DURATION_MS else 0
        self._emit(LegDtmf(leg.id, digit, name, known))

    # ------------------------------------------------------------------------------- media

    def _apply_media(self, leg: _Leg) -> None:
        """(Re)connect the leg in the bridge: what it hears (other legs, itself, its player or tone), who
        hears it, and the recordings it goes into."""
        media = leg.call.getAudioMedia(-1)
        for other_id in leg.hears | leg.heard_by:
            other = self._legs.get(other_id)
            if other is None or not other.media_active or other.disconnected:
                continue
            other_media = other.call.getAudioMedia(-1)
            if other_id in leg.hears:
                other_media.startTransmit(media)
            if other_id in leg.heard_by:
                media.startTransmit(other_media)
        for recording_id in leg.recordings:
            recording = self._recordings.get(recording_id)
            if recording is not None:
                media.startTransmit(recording.recorder)
        if leg.echo:
            media.startTransmit(media)
        if leg.player is not None:
            leg.player.startTransmit(media)
            if not leg.player_connected:
                leg.player_connected = True
                if not HAS_EOF_CALLBACK and not leg.player_loop:
                    self._player_deadlines[leg.id] = time.monotonic() + leg.player_length_s
        if leg.tone is not None:
            leg.tone.startTransmit(media)

    def _finish_player(self, leg: _Leg) -> None:
        leg.player = None  # destroys the player port and its connection to the leg
        self._player_deadlines.pop(leg.id, None)
        leg.player_connected = False
        if not leg.reported:
            self._emit(PlayerDone(leg.id))

    # ------------------------------------------------------------------------------- commands

    def _execute(self, cmd: Command) -> None:
        handler = self._handlers.get(type(cmd))
        try:
            if handler is None:
                raise _fail("invalid_argument", f"command {cmd.type!r} is not supported by this worker")
            result = handler(self, cmd)
            reply = Reply.success(cmd.id, result)
        except CommandError as exc:
            reply = Reply.failure(cmd.id, exc.code, exc.message)
        except pj.Error as exc:
            log.warning("library refused a command", command=cmd.type, error=str(exc.info()))
            reply = Reply.failure(cmd.id, "internal", f"pjsua: {exc.reason} ({exc.status})")
        except Exception as exc:  # a bug: answer, log, keep serving every other leg
            log.exception("command failed", command=cmd.type)
            reply = Reply.failure(cmd.id, "internal", f"{type(exc).__name__}: {exc}")
        if self._outbox is not None:
            self._outbox.send(encode(reply))

    def _leg(self, leg_id: str) -> _Leg:
        leg = self._legs.get(leg_id)
        if leg is None or leg.reported:
            raise _fail("no_such_leg", f"no leg {leg_id!r} on worker {self.options.worker_id}")
        return leg

    def _live_legs(self) -> int:
        return len(self._legs) + len(self._rejecting)

    def _cmd_answer(self, cmd: Answer) -> dict[str, Any]:
        """RFC 3261 §13.3.1: a provisional (180-199) or the 200 to an incoming INVITE."""
        leg = self._leg(cmd.leg)
        if not (180 <= cmd.code <= 199 or cmd.code == 200):
            raise _fail("invalid_argument", f"answer code must be 180-199 or 200, got {cmd.code}")
        if not leg.incoming:
            raise _fail("invalid_state", f"leg {leg.id} is outgoing: nothing to answer")
        if leg.answered or leg.ending:
            raise _fail(
                "invalid_state", f"leg {leg.id} is already {'answered' if leg.answered else 'ending'}"
            )
        op = pj.CallOpParam()
        op.statusCode = cmd.code
        leg.call.answer(op)
        return {}

    def _cmd_reject(self, cmd: Reject) -> dict[str, Any]:
        """RFC 3261 §13.3.1.3: a final non-2xx response to an incoming INVITE."""
        leg = self._leg(cmd.leg)
        if not 300 <= cmd.code <= 699:
            raise _fail("invalid_argument", f"reject code must be 300-699, got {cmd.code}")
        _check_text("reason", cmd.reason)
        if not leg.incoming:
            raise _fail("invalid_state", f"leg {leg.id} is outgoing: hang it up instead")
        if leg.answered or leg.ending:
            raise _fail(
                "invalid_state", f"leg {leg.id} is already {'answered' if leg.answered else 'ending'}"
            )
        op = pj.CallOpParam()
        op.statusCode = cmd.code
        if cmd.reason:
            op.reason = cmd.reason
        leg.ending = True
        leg.released_by = "local"
        leg.call.hangup(op)
        return {}

    def _cmd_originate(self, cmd: Originate) -> dict[str, Any]:
        """RFC 3261 §8.1.2/§13.2.1: a new INVITE sent through the edge (pre-loaded Route)."""
        if not cmd.leg or len(cmd.leg) > MAX_LEG_ID_LEN or not cmd.leg.isprintable() or " " in cmd.leg:
            raise _fail("invalid_argument", f"leg id must be 1-{MAX_LEG_ID_LEN} printable characters")
        if cmd.leg in self._legs:
            raise _fail("invalid_argument", f"leg id {cmd.leg!r} is in use on this worker")
        if not 0 < cmd.timeout_s <= MAX_ORIGINATE_TIMEOUT_S:
            raise _fail("invalid_argument", f"timeout_s must be in (0, {MAX_ORIGINATE_TIMEOUT_S:g}]")
        if self.ep.utilVerifySipUri(cmd.uri) != 0:
            raise _fail("invalid_argument", f"uri {cmd.uri!r} is not a SIP URI")
        if self.ep.utilVerifySipUri(cmd.from_uri) != 0 or "<" in cmd.from_uri:
            raise _fail("invalid_argument", f"from_uri {cmd.from_uri!r} is not a SIP URI")
        _check_text("display_name", cmd.display_name)
        if len(cmd.headers) > MAX_EXTRA_HEADERS:
            raise _fail("invalid_argument", f"at most {MAX_EXTRA_HEADERS} extra headers")
        op = pj.CallOpParam(True)
        for name, value in cmd.headers.items():
            if not _TOKEN.match(name) or name.lower() in RESERVED_HEADERS:
                raise _fail("invalid_argument", f"header name {name!r} is not allowed")
            _check_text(f"header {name}", value)
            header = pj.SipHeader()
            header.hName = name
            header.hValue = value
            op.txOption.headers.append(header)
        if self._live_legs() >= self.capacity:
            raise _fail("capacity", f"worker {self.options.worker_id} holds {self.capacity} legs")
        display = quote_display(cmd.display_name) + " " if cmd.display_name else ""
        id_uri = f"{display}<{cmd.from_uri}>"  # name-addr: URI parameters stay in the URI (§20.20)
        if cmd.direct:
            if not re.match(rf"^sips?:[^@]+@{re.escape(LOOPBACK)}:\d+(;|$)", cmd.uri):
                raise _fail("invalid_argument", f"a direct leg goes to {LOOPBACK}:PORT only, not {cmd.uri!r}")
            assert self._direct_account is not None
            account = self._direct_account
        else:
            account = self._from_account(id_uri)
        call = _Call(self, account)
        call.leg_id = cmd.leg
        account_id = int(account.getId())
        leg = _Leg(cmd.leg, call, False, "", account_id)
        self._legs[cmd.leg] = leg  # before makeCall: its callbacks may run inside it
        self._account_refs[account_id] += 1
        try:
            call.makeCall(cmd.uri, op)
        except pj.Error as exc:
            self._legs.pop(cmd.leg, None)
            self._account_refs[account_id] -= 1
            leg.call = None
            if exc.status == PJ_ETOOMANY:
                raise _fail("capacity", "the call table is full") from None
            raise _fail("internal", f"makeCall: {exc.reason} ({exc.status})") from None
        if not leg.disconnected:
            self._ring_deadlines[leg.id] = time.monotonic() + cmd.timeout_s
            if not leg.sip_call_id:
                info = call.getInfo()
                leg.sip_call_id = str(info.callIdString)
        return {"leg": cmd.leg, "sip_call_id": leg.sip_call_id}

    def _from_account(self, id_uri: str) -> _Account:
        """An account whose From is ``id_uri`` (pjsua 2.12 takes From from the account, RFC 3261 §8.1.1.3).

        Accounts are cached by From; when the cache is full an idle one (else the least recently used;
        its calls keep their dialogs' own From) is modified to the new From. Accounts are never shut down
        and re-created while the library runs: pjsua2 2.12's `Account.shutdown()` leaves the object's id
        set, and when that Python object is collected its destructor deleted whichever account had been
        created in the freed slot since (calls then failed with PJ_EINVALIDOP, "account is not valid").
        """
        account = self._from_accounts.get(id_uri)
        if account is not None:
            self._from_accounts.move_to_end(id_uri)
            return account
        if len(self._from_accounts) >= self.from_account_limit:
            idle = next(
                (key for key, acc in self._from_accounts.items() if self._account_refs[acc.getId()] <= 0),
                next(iter(self._from_accounts)),
            )
            account = self._from_accounts.pop(idle)
            account.modify(self._account_config(id_uri, via_edge=True))
            self._from_accounts[id_uri] = account
            return account
        account = _Account(self)
        account.create(self._account_config(id_uri, via_edge=True))
        self._from_accounts[id_uri] = account
        return account

    def _cmd_bridge(self, cmd: Bridge) -> dict[str, Any]:
        """Both legs hear each other through the conference bridge (RFC 3550 mixing, RFC 7667 §3.7)."""
        a, b = self._leg(cmd.a), self._leg(cmd.b)
        if a is b:
            raise _fail("invalid_argument", "a leg cannot be bridged with itself: use echo")
        for x, y in ((a, b), (b, a)):
            x.hears.add(y.id)
            y.heard_by.add(x.id)
        connected = a.media_active and b.media_active
        if connected:
            self._apply_media(a)
        return {"connected": connected}

    def _cmd_unbridge(self, cmd: Unbridge) -> dict[str, Any]:
        a, b = self._leg(cmd.a), self._leg(cmd.b)
        if a is b:  # stops an echo
            was_echoing, a.echo = a.echo, False
            if was_echoing and a.media_active:
                media = a.call.getAudioMedia(-1)
                media.stopTransmit(media)
            return {"was_bridged": was_echoing}
        # Undoing what is not there is not an error (tear-down races); either direction counts.
        was = self._unlisten(a, b) | self._unlisten(b, a)
        return {"was_bridged": was}

    def _unlisten(self, leg: _Leg, source: _Leg) -> bool:
        """``leg`` stops hearing ``source``; whether it did."""
        if source.id not in leg.hears:
            return False
        leg.hears.discard(source.id)
        source.heard_by.discard(leg.id)
        if leg.media_active and source.media_active:
            source.call.getAudioMedia(-1).stopTransmit(leg.call.getAudioMedia(-1))
        return True

    def _cmd_listen(self, cmd: Listen) -> dict[str, Any]:
        """One-way: ``leg`` hears ``source`` (RFC 7667 §3.7 mixer, per-receiver mix)."""
        leg, source = self._leg(cmd.leg), self._leg(cmd.source)
        if leg is source:
            raise _fail("invalid_argument", "a leg cannot listen to itself: use echo")
        leg.hears.add(source.id)
        source.heard_by.add(leg.id)
        connected = leg.media_active and source.media_active
        if connected:
            source.call.getAudioMedia(-1).startTransmit(leg.call.getAudioMedia(-1))
        return {"connected": connected}

    def _cmd_unlisten(self, cmd: Unlisten) -> dict[str, Any]:
        return {"was_listening": self._unlisten(self._leg(cmd.leg), self._leg(cmd.source))}

    def _cmd_record(self, cmd: Record) -> dict[str, Any]:
        """A recorder port in the bridge that every named leg transmits to: one mixed WAV file."""
        if not cmd.recording or len(cmd.recording) > MAX_LEG_ID_LEN:
            raise _fail("invalid_argument", f"recording id must be 1-{MAX_LEG_ID_LEN} characters")
        if not cmd.legs or len(cmd.legs) > MAX_RECORD_LEGS:
            raise _fail("invalid_argument", f"legs must name 1-{MAX_RECORD_LEGS} legs")
        legs = [self._leg(leg_id) for leg_id in cmd.legs]
        recording = self._recordings.get(cmd.recording)
        if recording is None:
            if not os.path.isabs(cmd.path) or not cmd.path.endswith(".wav"):
                raise _fail("invalid_argument", f"{cmd.path!r} is not an absolute path to a .wav file")
            if not os.path.isdir(os.path.dirname(cmd.path)):
                raise _fail("invalid_argument", f"the directory of {cmd.path!r} does not exist")
            recorder = pj.AudioMediaRecorder()
            try:
                recorder.createRecorder(cmd.path)
            except pj.Error as exc:
                raise _fail("invalid_argument", f"cannot record to {cmd.path!r}: {exc.reason}") from None
            recording = _Recording(cmd.recording, cmd.path, recorder, time.monotonic())
            self._recordings[recording.id] = recording
        elif cmd.path != recording.path:
            raise _fail("invalid_argument", f"recording {cmd.recording!r} writes to {recording.path!r}")
        for leg in legs:
            if leg.id in recording.legs:
                continue
            recording.legs.add(leg.id)
            leg.recordings.add(recording.id)
            if leg.media_active:
                leg.call.getAudioMedia(-1).startTransmit(recording.recorder)
        return {"path": recording.path, "legs": sorted(recording.legs)}

    def _cmd_stop_record(self, cmd: StopRecord) -> dict[str, Any]:
        recording = self._recordings.pop(cmd.recording, None)
        if recording is None:
            return {"stopped": False}
        for leg_id in recording.legs:
            leg = self._legs.get(leg_id)
            if leg is not None:
                leg.recordings.discard(recording.id)
        recording.recorder = None  # destroys the port: the library writes the WAV header and closes the file
        return {
            "stopped": True,
            "path": recording.path,
            "duration_s": round(time.monotonic() - recording.started, 3),
        }

    def _cmd_hangup(self, cmd: Hangup) -> dict[str, Any]:
        """BYE (§15.1.1) when answered, CANCEL (§9.1) when outgoing and unanswered, else a final response."""
        leg = self._leg(cmd.leg)
        if cmd.code and not 300 <= cmd.code <= 699:
            raise _fail("invalid_argument", f"hangup code must be 0 or 300-699, got {cmd.code}")
        if leg.ending:
            return {"already": True}
        op = pj.CallOpParam()
        if cmd.code:
            op.statusCode = cmd.code
        leg.ending = True
        leg.released_by = "local"
        self._ring_deadlines.pop(leg.id, None)
        leg.call.hangup(op)
        return {}

    def _cmd_play(self, cmd: Play) -> dict[str, Any]:
        leg = self._leg(cmd.leg)
        if not cmd.files or len(cmd.files) > MAX_PLAY_FILES:
            raise _fail("invalid_argument", f"files must hold 1-{MAX_PLAY_FILES} paths")
        length = 0.0
        for path in cmd.files:
            if not os.path.isabs(path) or not os.path.isfile(path):
                raise _fail("invalid_argument", f"{path!r} is not an absolute path to a file")
            try:
                length += wav_duration_s(path)
            except (OSError, EOFError, wave.Error) as exc:
                raise _fail("invalid_argument", f"{path!r} is not a PCM WAV file: {exc}") from None
        leg.player_serial += 1
        player = _Player(self, leg.id, leg.player_serial)
        options = 0 if cmd.loop else pj.PJMEDIA_FILE_NO_LOOP
        try:
            if len(cmd.files) == 1:
                player.createPlayer(cmd.files[0], options)
            else:
                files = pj.StringVector()
                for path in cmd.files:
                    files.append(path)
                player.createPlaylist(files, f"play-{leg.id}", options)
        except pj.Error as exc:
            raise _fail("invalid_argument", f"cannot play {cmd.files}: {exc.reason}") from None
        leg.player = player  # replaces (and so stops) a previous player without a player.done
        leg.player_loop = cmd.loop
        leg.player_connected = False
        self._player_deadlines.pop(leg.id, None)
        leg.player_length_s = length
        if leg.media_active:
            self._apply_media(leg)
        return {"duration_s": round(length, 3)}

    def _cmd_stop_play(self, cmd: StopPlay) -> dict[str, Any]:
        leg = self._leg(cmd.leg)
        if leg.player is None:
            return {"stopped": False}
        leg.player = None
        self._player_deadlines.pop(leg.id, None)
        leg.player_connected = False
        return {"stopped": True}

    def _cmd_tone(self, cmd: Tone) -> dict[str, Any]:
        leg = self._leg(cmd.leg)
        plan = TONE_PLANS.get(cmd.kind)
        if plan is None:
            raise _fail(
                "invalid_argument", f"tone kind must be one of {sorted(TONE_PLANS)}, got {cmd.kind!r}"
            )
        frequency, on_ms, off_ms = plan
        tone = pj.ToneGenerator()
        tone.createToneGenerator(CONF_CLOCK_RATE_HZ, 1)
        desc = pj.ToneDesc()
        desc.freq1 = frequency
        desc.freq2 = 0
        desc.on_msec = on_ms
        desc.off_msec = off_ms
        desc.volume = 0  # the library's default level
        desc.flags = 0
        tones = pj.ToneDescVector()
        tones.append(desc)
        tone.play(tones, True)
        leg.tone = tone  # replaces a previous tone
        if leg.media_active:
            self._apply_media(leg)
        return {}

    def _cmd_stop_tone(self, cmd: StopTone) -> dict[str, Any]:
        leg = self._leg(cmd.leg)
        stopped, leg.tone = leg.tone is not None, None
        return {"stopped": stopped}

    def _cmd_echo(self, cmd: Echo) -> dict[str, Any]:
        leg = self._leg(cmd.leg)
        leg.echo = True
        if leg.media_active:
            self._apply_media(leg)
        return {"connected": leg.media_active}

    def _cmd_send_dtmf(self, cmd: SendDtmf) -> dict[str, Any]:
        """RFC 4733 telephone-events on the leg's RTP stream."""
        leg = self._leg(cmd.leg)
        if not cmd.digits or len(cmd.digits) > MAX_DTMF_DIGITS or not set(cmd.digits) <= DTMF_DIGITS:
            raise _fail("invalid_argument", f"digits must be 1-{MAX_DTMF_DIGITS} of 0-9 * # A-D")
        if not leg.media_active:
            raise _fail("invalid_state", f"leg {leg.id} has no active audio")
        leg.call.dialDtmf(cmd.digits)
        return {}

    def _cmd_ping(self, cmd: Ping) -> dict[str, Any]:
        """Answered from the main loop: a reply proves the loop turns, not just the reader thread."""
        return {"legs": len(self._legs)}

    def _cmd_shutdown(self, cmd: Shutdown) -> dict[str, Any]:
        self._stopping = True
        return {"legs": len(self._legs)}

    _handlers: ClassVar[dict[type[Command], Callable[[Worker, Any], dict[str, Any]]]] = {
        Answer: _cmd_answer,
        Reject: _cmd_reject,
        Originate: _cmd_originate,
        Bridge: _cmd_bridge,
        Unbridge: _cmd_unbridge,
        Listen: _cmd_listen,
        Unlisten: _cmd_unlisten,
        Record: _cmd_record,
        StopRecord: _cmd_stop_record,
        Hangup: _cmd_hangup,
        Play: _cmd_play,
        StopPlay: _cmd_stop_play,
        Tone: _cmd_tone,
        StopTone: _cmd_stop_tone,
        Echo: _cmd_echo,
        SendDtmf: _cmd_send_dtmf,
        Ping: _cmd_ping,
        Shutdown: _cmd_shutdown,
    }

    # ------------------------------------------------------------------------------- probe

    _probing: _Probe | None = None

    def _probe_capacity(self) -> int:
        """Hold as many loopback self-calls as the engine allows (bounded) and count the legs held."""
        cap = min(PROBE_MAX_LEGS, self.options.max_calls or PROBE_MAX_LEGS)
        self._log_writer.muted = True
        try:
            for attempt in range(1, PROBE_ATTEMPTS + 1):
                probe = _Probe(self)
                self._probing = probe
                held = probe.run(cap)
                self._probing = None
                if held or attempt == PROBE_ATTEMPTS:
                    break
                # Not a single leg: a passing shortage (another process holding the RTP ports for a
                # moment, as a neighbour's own probe does), not the engine's limit. Try again.
                log.warning("capacity probe held no leg: trying again", limit=probe.note, attempt=attempt)
                time.sleep(PROBE_RETRY_S)
        finally:
            self._probing = None
            self._log_writer.muted = False
        capacity = min(held, cap)
        if held < cap or cap == PROBE_MAX_LEGS:  # an engine limit, not our cap: keep room to refuse
            capacity = max(0, held - max(1, held // ADMISSION_HEADROOM_DIVISOR))
        report = log.warning if "budget" in probe.note else log.info
        report(
            "capacity probed",
            legs_held=held,
            capacity_legs=capacity,
            cap=cap,
            elapsed_s=round(probe.elapsed_s, 3),
            limit=probe.note,
        )
        return capacity


class _Probe:
    """Self-calls on the worker's own SIP port, answered 200 at once (RFC 3261 §13), no media connected."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.calls: dict[int, _Call] = {}
        self.confirmed: set[int] = set()
        self.disconnected: set[int] = set()
        self.elapsed_s = 0.0
        self.note = ""

    def incoming(self, call: _Call) -> None:
        self.calls[call.getId()] = call
        op = pj.CallOpParam()
        op.statusCode = 200
        call.answer(op)

    def state(self, call: _Call) -> None:
        info = call.getInfo()
        call_id = int(info.id)
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED:
            self.confirmed.add(call_id)
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.confirmed.discard(call_id)
            self.disconnected.add(call_id)

    def run(self, cap_legs: int) -> int:
        worker = self.worker
        ep = worker.ep
        account = _Account(worker)
        account.create(worker._account_config(f"sip:probe@{LOOPBACK}:{worker.sip_port}", via_edge=False))
        target = f"sip:probe@{LOOPBACK}:{worker.sip_port}"
        started = time.monotonic()
        deadline = started + PROBE_BUDGET_S
        batch = PROBE_BATCH
        best = 0
        try:
            while len(self.confirmed) < cap_legs and time.monotonic() < deadline:
                # A batch of self-calls, then wait until each is confirmed or refused. A batch that is not
                # fully confirmed hit a limit (call table, RTP ports); retrying one call at a time finds
                # the exact number, since the refused calls have released what they held.
                size = max(1, min(batch, (cap_legs - len(self.confirmed) + 1) // 2))
                outgoing: list[int] = []
                for _ in range(size):
                    call = _Call(worker, account)
                    try:
                        call.makeCall(target, pj.CallOpParam(True))
                    except pj.Error as exc:
                        self.note = f"makeCall: {exc.reason} ({exc.status})"
                        break
                    self.calls[call.getId()] = call
                    outgoing.append(call.getId())
                settled = self._settle(outgoing, deadline)
                best = max(best, len(self.confirmed))
                if self.note or not outgoing:
                    break
                if not settled:
                    if batch == 1:
                        break
                    batch = 1
            self.elapsed_s = time.monotonic() - started
            if not self.note and len(self.confirmed) < cap_legs and time.monotonic() >= deadline:
                self.note = f"time budget of {PROBE_BUDGET_S:g} s spent: the capacity may be under-reported"
        finally:
            if self.calls:
                ep.hangupAllCalls()
            drain_until = time.monotonic() + PROBE_DRAIN_S
            while len(self.disconnected) < len(self.calls) and time.monotonic() < drain_until:
                ep.libHandleEvents(POLL_MS)
            self.calls.clear()
            account.shutdown()
            del account
            gc.collect()
        return best

    def _settle(self, outgoing: list[int], deadline: float) -> bool:
        """Poll until every call in ``outgoing`` is confirmed or gone; True when all were confirmed (and
        their incoming halves too)."""
        ep = self.worker.ep
        last_progress = time.monotonic()
        resolved = 0
        while time.monotonic() < deadline:
            ep.libHandleEvents(POLL_MS)
            now_resolved = sum(1 for c in outgoing if c in self.confirmed or c in self.disconnected)
            now = time.monotonic()
            if now_resolved > resolved:
                resolved, last_progress = now_resolved, now
            if resolved == len(outgoing) and len(self.confirmed) == len(self.calls) - len(self.disconnected):
                break
            if now - last_progress > PROBE_STALL_S:
                break
        return all(c in self.confirmed for c in outgoing)


def _audio_status(info: Any) -> tuple[bool, bool]:
    """Whether the call's audio flows both ways, and whether the phone put it on hold (its offer was
    ``sendonly`` or ``inactive``, RFC 3264 §8.4)."""
    medias = info.media
    held = False
    for index in range(len(medias)):
        media = medias[index]
        if media.type != pj.PJMEDIA_TYPE_AUDIO:
            continue
        if media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
            return True, False
        held = held or media.status == pj.PJSUA_CALL_MEDIA_REMOTE_HOLD
    return False, held


def _progress(leg: _Leg) -> str:
    return "answered" if leg.answered else "ending"


def _check_text(what: str, value: str) -> None:
    if "\r" in value or "\n" in value or len(value) > MAX_HEADER_VALUE_LEN:
        raise CommandError("invalid_argument", f"{what} must be one line of at most {MAX_HEADER_VALUE_LEN}")


def raise_nofile_limit() -> None:
    """Two sockets per leg (RTP, RTCP): the usual soft limit of 1024 would cap a worker near 500 legs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ============================================================================================ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m softswitch.media.worker", description=__doc__)
    parser.add_argument("--controller", required=True, help="HOST:PORT of the controller's control socket")
    parser.add_argument("--worker-id", required=True, help="this worker's id; leg ids are ID-N")
    parser.add_argument("--sip-port", type=int, default=0, help="SIP port on 127.0.0.1 (0: any free)")
    parser.add_argument("--rtp-ports", required=True, help="RTP/RTCP port range A-B")
    parser.add_argument("--edge", required=True, help="HOST:PORT of the SIP edge (outbound proxy)")
    parser.add_argument("--max-calls", type=int, default=None, help="legs at most (default: probed)")
    parser.add_argument("--log-level", default="info", choices=sorted(PJ_LOG_LEVELS))
    return parser


def parse_options(argv: list[str] | None = None) -> WorkerOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = WorkerOptions(
            controller=parse_host_port(args.controller),
            worker_id=args.worker_id,
            sip_port=args.sip_port,
            rtp_ports=parse_port_range(args.rtp_ports),
            edge=parse_host_port(args.edge),
            max_calls=args.max_calls,
            log_level=args.log_level,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if not re.fullmatch(r"[A-Za-z0-9_.]{1,32}", options.worker_id):
        parser.error("--worker-id must be 1-32 letters, digits, '_' or '.'")
    if options.max_calls is not None and options.max_calls < 1:
        parser.error("--max-calls must be >= 1")
    if not 0 <= options.sip_port < 65536:
        parser.error("--sip-port must be 0-65535")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    configure_logging(options.log_level)
    structlog.contextvars.bind_contextvars(worker_id=options.worker_id)
    worker = Worker(options)

    def _terminate(signum: int, frame: FrameType | None) -> None:
        worker._stopping = True  # the poll loop notices within POLL_MS and shuts down cleanly

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        return worker.run()
    except OSError as exc:
        log.error("media worker failed", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
