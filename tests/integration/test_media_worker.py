"""One media worker process (real PJSUA2) driven over the control protocol by an in-test controller.

Real peers on 127.0.0.1: baresip phones and SIPp call the worker's SIP port directly (the worker does not
need the edge for incoming INVITEs); originated legs go to a phone whose address is given as the worker's
``--edge``, so the pre-loaded Route (RFC 3261 §8.1.2) names that phone. Media is proved by tones: each
party sends its own sine and the Goertzel analysis of what the other recorded names who heard whom.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from softswitch.media.protocol import (
    Answer,
    Bridge,
    Command,
    Echo,
    Event,
    FrameDecoder,
    Hangup,
    LegDtmf,
    LegIncoming,
    LegMedia,
    LegState,
    Originate,
    Play,
    PlayerDone,
    Reject,
    Reply,
    SendDtmf,
    Shutdown,
    StopPlay,
    StopTone,
    Tone,
    Unbridge,
    WorkerReady,
    encode,
)
from softswitch.media.worker import parse_name_addr, parse_request_head
from tests.integration.audio import make_tone, measure_tone
from tests.integration.conftest import TONE_A_HZ, TONE_B_HZ, PhoneFactory, Tones
from tests.integration.peers import LOOPBACK, REPO_ROOT, Baresip, Sipp, free_port

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 20.0  # spawn, libInit, capacity probe (bounded at ~2 s) and WorkerReady
COMMAND_TIMEOUT_S = 5.0  # a command is executed within one poll (10 ms); 5 s means the worker is stuck
EVENT_TIMEOUT_S = 10.0  # call set-up and teardown on loopback take milliseconds
EXIT_TIMEOUT_S = 15.0  # Shutdown: hang up (≤ 3 s drain), libDestroy (~1 s)
RTP_SPAN = 160  # RTP/RTCP ports given to a worker: 2 per leg, so up to 80 legs
SMALL_RTP_SPAN = 40  # for tests that cap the worker with --max-calls
AUDIO_SECONDS = 3.0  # of tone exchanged before hanging up
MIN_VOICED_S = 1.5  # of AUDIO_SECONDS that must arrive as sound (set-up and jitter buffer eat the rest)
FREQUENCY_TOLERANCE_HZ = 8.0  # two fine-scan bins of tests/integration/audio.py
PROMPT_HZ = 1000.0  # the WAV a worker plays: far from both parties' tones
PROMPT_SECONDS = 1.5
TONE_HZ = 450.0  # the worker's call-progress tones (ITU-T E.180, 450 Hz)
RINGBACK_ON_S = 1.0  # ringback cadence: 1 s on, 4 s off
FALLBACK_WHEEL_LEGS = 64  # "capacity reported > 64 with the built engine"
WORKER_LOG_TAIL = 6_000

Predicate = Callable[[Any], bool]


def _close_to(measured: float, expected: float) -> bool:
    return abs(measured - expected) <= FREQUENCY_TOLERANCE_HZ


class ControllerError(AssertionError):
    pass


class TinyController:
    """The controller side of the protocol, just enough to drive one worker from a test."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server = socket.create_server((LOOPBACK, 0))
        self.port = int(self.server.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "worker.log"
        self.conn: socket.socket | None = None
        self.ready: WorkerReady | None = None
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._consumed: set[int] = set()
        self._replies: dict[int, Reply] = {}
        self._closed = False
        self._next_id = 0
        self._reader: threading.Thread | None = None

    # -- worker process -----------------------------------------------------------------------------

    def start_worker(
        self, *, edge_port: int, max_calls: int | None = None, rtp_span: int = RTP_SPAN, worker_id: str = "w1"
    ) -> WorkerReady:
        rtp_low = free_port(span=rtp_span, udp=True, tcp=False)
        cmd = [
            sys.executable,
            "-m",
            "softswitch.media.worker",
            "--controller",
            f"{LOOPBACK}:{self.port}",
            "--worker-id",
            worker_id,
            "--sip-port",
            "0",
            "--rtp-ports",
            f"{rtp_low}-{rtp_low + rtp_span - 1}",
            "--edge",
            f"{LOOPBACK}:{edge_port}",
        ]
        if max_calls is not None:
            cmd += ["--max-calls", str(max_calls)]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.server.settimeout(READY_TIMEOUT_S)
        try:
            conn, _ = self.server.accept()
        except TimeoutError as exc:
            raise ControllerError(f"worker never connected\n{self.log_tail()}") from exc
        conn.settimeout(None)
        self.conn = conn
        self._reader = threading.Thread(target=self._read, name="tiny-controller", daemon=True)
        self._reader.start()
        ready = self.wait_event(WorkerReady, READY_TIMEOUT_S)
        assert isinstance(ready, WorkerReady)
        self.ready = ready
        return ready

    @property
    def sip_port(self) -> int:
        assert self.ready is not None
        return self.ready.sip_port

    def log_tail(self) -> str:
        try:
            return self.log_path.read_bytes()[-WORKER_LOG_TAIL:].decode(errors="replace")
        except OSError:
            return ""

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            self.conn.close()
            self.conn = None
        self.server.close()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=EXIT_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=EXIT_TIMEOUT_S)

    # -- protocol ------------------------------------------------------------------------------------

    def _read(self) -> None:
        assert self.conn is not None
        decoder = FrameDecoder()
        try:
            while True:
                data = self.conn.recv(65_536)
                if not data:
                    break
                for message in decoder.feed(data):
                    with self._cond:
                        if isinstance(message, Reply):
                            self._replies[message.id] = message
                        elif isinstance(message, Event):
                            self._events.append(message)
                        self._cond.notify_all()
        except OSError:
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def send_raw(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def command(self, cmd: Command, timeout_s: float = COMMAND_TIMEOUT_S) -> Reply:
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        from dataclasses import replace

        self.send_raw(encode(replace(cmd, id=msg_id)))
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while msg_id not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise ControllerError(f"no reply to {cmd}\n{self.log_tail()}")
                self._cond.wait(remaining)
            return self._replies.pop(msg_id)

    def ok(self, cmd: Command) -> dict[str, Any]:
        reply = self.command(cmd)
        assert reply.ok, f"{cmd} failed: {reply.error_code} {reply.error_message}"
        return reply.result

    def wait_event(
        self,
        kind: type[Event],
        timeout_s: float = EVENT_TIMEOUT_S,
        where: Callable[[Any], bool] | None = None,
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for index, event in enumerate(self._events):
                    if index in self._consumed or not isinstance(event, kind):
                        continue
                    if where is None or where(event):
                        self._consumed.add(index)
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ControllerError(
                        f"no {kind.__name__} within {timeout_s:g} s; "
                        f"events: {self._events}\n{self.log_tail()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def wait_for_all(self, kind: type[Event], where: Predicate, count: int) -> list[Any]:
        """At least ``count`` events of ``kind`` matching ``where`` (waiting up to EVENT_TIMEOUT_S)."""
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        with self._cond:
            while True:
                found = [e for e in self._events if isinstance(e, kind) and where(e)]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    return found
                self._cond.wait(min(remaining, 0.5))

    def wait_state(self, leg: str, state: str, timeout_s: float = EVENT_TIMEOUT_S) -> LegState:
        event: LegState = self.wait_event(LegState, timeout_s, lambda e: e.leg == leg and e.state == state)
        return event

    def events(self) -> list[Event]:
        with self._cond:
            return list(self._events)

    @property
    def connection_closed(self) -> bool:
        with self._cond:
            return self._closed


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[TinyController]:
    ctl = TinyController(tmp_path)
    try:
        yield ctl
    finally:
        ctl.close()


def _active_media_of(leg: str) -> Predicate:
    return lambda event: isinstance(event, LegMedia) and event.leg == leg and event.active


def _incoming_call(ctl: TinyController, phone: Baresip, user: str = "1000") -> LegIncoming:
    phone.dial(f"sip:{user}@{LOOPBACK}:{ctl.sip_port}")
    event: LegIncoming = ctl.wait_event(LegIncoming)
    return event


def _answered_call(ctl: TinyController, phone: Baresip) -> str:
    incoming = _incoming_call(ctl, phone)
    ctl.ok(Answer(incoming.leg, 200))
    phone.wait_event("CALL_ESTABLISHED", EVENT_TIMEOUT_S)
    ctl.wait_state(incoming.leg, "confirmed")
    ctl.wait_event(LegMedia, where=lambda e: e.leg == incoming.leg and e.active)
    return incoming.leg


# ---------------------------------------------------------------------------------------- pure helpers


def test_request_head_parsing_unfolds_and_expands_compact_forms() -> None:
    raw = (
        "INVITE sip:1002@127.0.0.1:5070;transport=udp SIP/2.0\r\n"
        'f: "Alice \\"A\\"" <sip:1001@127.0.0.1>;tag=9\r\n'
        "t: <sip:1002@127.0.0.1>\r\n"
        "i: abc@127.0.0.1\r\n"
        "X-Softswitch-Identity: 1001\r\n"
        "User-Agent: baresip\r\n"
        " v1.0\r\n"
        "\r\n"
        "v=0\r\nX-Not-A-Header: body\r\n"
    )
    head = parse_request_head(raw)
    assert head.request_uri == "sip:1002@127.0.0.1:5070;transport=udp"
    assert head.first("call-id") == "abc@127.0.0.1"
    assert head.first("user-agent") == "baresip v1.0"
    assert head.first("x-softswitch-identity") == "1001"
    assert "x-not-a-header" not in head.headers
    assert parse_name_addr(head.first("from")) == ('Alice "A"', "sip:1001@127.0.0.1")
    assert parse_name_addr("sip:1003@127.0.0.1;tag=x") == ("", "sip:1003@127.0.0.1")
    assert parse_name_addr("Bob <sip:b@h>") == ("Bob", "sip:b@h")


# ------------------------------------------------------------------------------------ calls and media


@pytest.mark.timeout(120)
def test_two_phones_bridged_through_the_worker_hear_each_other(
    controller: TinyController, phones: PhoneFactory, tones: Tones
) -> None:
    caller = phones.start("1001", tones.a)
    callee = phones.start("1002", tones.b)
    ready = controller.start_worker(edge_port=callee.sip_port)
    assert ready.engine == "high-capacity", ready
    assert ready.capacity > FALLBACK_WHEEL_LEGS, ready
    assert ready.sip_host == LOOPBACK and ready.pid == controller.proc.pid  # type: ignore[union-attr]

    incoming = _incoming_call(controller, caller, "1002")
    assert incoming.leg == "w1-1"
    assert incoming.from_uri.startswith("sip:1001@127.0.0.1"), incoming
    assert incoming.request_uri == f"sip:1002@{LOOPBACK}:{controller.sip_port}", incoming
    assert incoming.identity == ""  # no edge in between: nobody vouched for the caller
    assert any(name.lower() == "user-agent" for name in incoming.headers), incoming
    controller.ok(Answer(incoming.leg, 180))
    controller.wait_state(incoming.leg, "ringing")
    caller.wait_event("CALL_RINGING", EVENT_TIMEOUT_S)
    controller.ok(Answer(incoming.leg, 200))
    caller.wait_event("CALL_ESTABLISHED", EVENT_TIMEOUT_S)
    controller.wait_state(incoming.leg, "confirmed")

    result = controller.ok(
        Originate(
            leg="b-1",
            uri=callee.direct_uri,
            from_uri="sip:1001@127.0.0.1",
            display_name="Alice Caller",
            headers={"X-Conversation": "c-42", "X-Padding": "p" * 700},  # > 1300 bytes: still UDP
            timeout_s=10.0,
        )
    )
    assert result["leg"] == "b-1" and result["sip_call_id"], result
    controller.wait_state("b-1", "confirmed")
    callee.wait_event("CALL_ESTABLISHED", EVENT_TIMEOUT_S)
    for leg in (incoming.leg, "b-1"):
        controller.wait_event(LegMedia, where=_active_media_of(leg))
    assert controller.ok(Bridge(incoming.leg, "b-1")) == {"connected": True}
    for phone in (caller, callee):
        phone.wait_event("CALL_RTPESTAB", EVENT_TIMEOUT_S)
    time.sleep(AUDIO_SECONDS)

    caller.hangup()  # BYE from the caller's side
    ended = controller.wait_state(incoming.leg, "disconnected")
    assert ended.released_by == "remote", ended
    controller.ok(Hangup("b-1"))  # BYE from the worker's side
    ended_b = controller.wait_state("b-1", "disconnected")
    assert ended_b.released_by == "local", ended_b
    for phone in (caller, callee):
        phone.wait_event("CALL_CLOSED", EVENT_TIMEOUT_S)

    heard_by_caller = measure_tone(caller.received_wav())
    heard_by_callee = measure_tone(callee.received_wav())
    assert heard_by_caller.voiced_s >= MIN_VOICED_S, heard_by_caller.describe()
    assert heard_by_callee.voiced_s >= MIN_VOICED_S, heard_by_callee.describe()
    assert _close_to(heard_by_caller.dominant_hz, TONE_B_HZ), heard_by_caller.describe()
    assert _close_to(heard_by_callee.dominant_hz, TONE_A_HZ), heard_by_callee.describe()

    # The originated INVITE (RFC 3261 §8.1.1): From from the command, the pre-loaded Route to the "edge",
    # the extra header, and G.711 first in the offer.
    invites = [m for m in callee.sip_trace() if m.method == "INVITE"]
    assert invites, callee.log_tail()
    text = invites[0].text
    lines = {line.split(":", 1)[0].lower(): line for line in text.splitlines() if ":" in line}
    assert '"Alice Caller" <sip:1001@127.0.0.1>' in lines["from"], text
    assert f"<sip:{LOOPBACK}:{callee.sip_port};lr>" in lines["route"], text
    assert lines["x-conversation"].endswith("c-42"), text
    # From the worker's own SIP port over UDP even above 1300 bytes (no switch to TCP, §18.1.1).
    assert (invites[0].transport, invites[0].source) == ("UDP", f"{LOOPBACK}:{controller.sip_port}")
    assert len(text) > 1300
    m_line = next(line for line in text.splitlines() if line.startswith("m=audio"))
    assert m_line.split()[3:5] == ["0", "8"], m_line  # PCMU, then PCMA


@pytest.mark.timeout(90)
def test_echo_play_and_dtmf_on_one_leg(
    controller: TinyController, phones: PhoneFactory, tones: Tones, tmp_path: Path
) -> None:
    prompt = make_tone(tmp_path / "prompt.wav", PROMPT_HZ, seconds=PROMPT_SECONDS)
    caller = phones.start("1001", tones.a)
    controller.start_worker(edge_port=caller.sip_port, max_calls=4, rtp_span=SMALL_RTP_SPAN)
    leg = _answered_call(controller, caller)

    started = time.monotonic()
    assert controller.ok(Play(leg, [str(prompt)]))["duration_s"] == pytest.approx(PROMPT_SECONDS, abs=0.01)
    controller.wait_event(PlayerDone, PROMPT_SECONDS + EVENT_TIMEOUT_S, lambda e: e.leg == leg)
    assert time.monotonic() - started >= PROMPT_SECONDS - 0.2  # it really played to the end

    caller.command("sndcode", "5")  # RFC 4733 from the phone
    digit = controller.wait_event(LegDtmf, where=lambda e: e.leg == leg)
    assert (digit.digit, digit.method) == ("5", "rfc4733"), digit
    controller.ok(SendDtmf(leg, "7"))  # and to the phone
    heard = caller.wait_event("CALL_DTMF_START", EVENT_TIMEOUT_S)
    assert heard.param == "7", heard.raw

    assert controller.ok(Echo(leg)) == {"connected": True}
    time.sleep(AUDIO_SECONDS)
    assert controller.ok(Unbridge(leg, leg)) == {"was_bridged": True}
    assert controller.ok(Unbridge(leg, leg)) == {"was_bridged": False}
    controller.ok(Hangup(leg))
    controller.wait_state(leg, "disconnected")
    caller.wait_event("CALL_CLOSED", EVENT_TIMEOUT_S)

    heard_by_caller = measure_tone(caller.received_wav())
    # The prompt (1000 Hz) and then the caller's own tone came back; both are there, nothing else.
    assert heard_by_caller.voiced_s >= MIN_VOICED_S, heard_by_caller.describe()
    assert heard_by_caller.power_ratio(PROMPT_HZ, TONE_B_HZ) > 10, heard_by_caller.describe()
    assert heard_by_caller.power_ratio(TONE_A_HZ, TONE_B_HZ) > 10, heard_by_caller.describe()


@pytest.mark.timeout(90)
def test_ringback_tone_is_sent_as_early_media(
    controller: TinyController, phones: PhoneFactory, tones: Tones
) -> None:
    """183 with SDP (RFC 3261 §13.3.1.1, RFC 3960 early media) carrying the worker's ringback tone."""
    caller = phones.start("1001", tones.a)
    controller.start_worker(edge_port=caller.sip_port, max_calls=4, rtp_span=SMALL_RTP_SPAN)
    incoming = _incoming_call(controller, caller)
    controller.ok(Answer(incoming.leg, 183))
    early = controller.wait_state(incoming.leg, "early")
    assert early.sip_code == 183, early
    controller.wait_event(LegMedia, where=lambda e: e.leg == incoming.leg and e.active)
    controller.ok(Tone(incoming.leg, "ringback"))
    time.sleep(AUDIO_SECONDS)
    assert controller.ok(StopTone(incoming.leg)) == {"stopped": True}
    controller.ok(Hangup(incoming.leg, 480))
    ended = controller.wait_state(incoming.leg, "disconnected")
    assert (ended.sip_code, ended.released_by) == (480, "local"), ended
    closed = caller.wait_event("CALL_CLOSED", EVENT_TIMEOUT_S)
    assert closed.param.startswith("480"), closed.raw
    heard = measure_tone(caller.received_wav())
    assert _close_to(heard.dominant_hz, TONE_HZ), heard.describe()
    # The E.180 cadence, 1 s on and 4 s off: about one second of tone in AUDIO_SECONDS, not all of it.
    assert RINGBACK_ON_S / 2 <= heard.voiced_s <= RINGBACK_ON_S * 2, heard.describe()


@pytest.mark.timeout(90)
def test_reject_and_originate_timeout(controller: TinyController, phones: PhoneFactory, tones: Tones) -> None:
    caller = phones.start("1001", tones.a)
    callee = phones.start("1002", tones.b, answermode="manual")
    controller.start_worker(edge_port=callee.sip_port, max_calls=4, rtp_span=SMALL_RTP_SPAN)

    incoming = _incoming_call(controller, caller)
    controller.ok(Reject(incoming.leg, 486, "Busy Here"))
    ended = controller.wait_state(incoming.leg, "disconnected")
    assert (ended.sip_code, ended.released_by) == (486, "local"), ended
    closed = caller.wait_event("CALL_CLOSED", EVENT_TIMEOUT_S)
    assert closed.param.startswith("486"), closed.raw
    assert not controller.command(Answer(incoming.leg)).ok  # the leg is gone

    started = time.monotonic()
    controller.ok(Originate(leg="b-9", uri=callee.direct_uri, from_uri="sip:1001@127.0.0.1", timeout_s=1.5))
    controller.wait_state("b-9", "ringing")
    callee.wait_event("CALL_INCOMING", EVENT_TIMEOUT_S)
    timeout = controller.wait_state("b-9", "disconnected")
    assert (timeout.sip_code, timeout.reason, timeout.released_by) == (408, "timeout", "system"), timeout
    assert 1.4 <= time.monotonic() - started < 1.5 + 2.0
    callee.wait_event("CALL_CLOSED", EVENT_TIMEOUT_S)  # the CANCEL reached the phone (RFC 3261 §9)
    time.sleep(0.5)  # the 487 to the CANCELled INVITE must not produce a second disconnected
    assert [e for e in controller.events() if isinstance(e, LegState) and e.leg == "b-9"][-1] == timeout


@pytest.mark.timeout(90)
def test_command_errors_are_precise_replies(
    controller: TinyController, phones: PhoneFactory, tones: Tones
) -> None:
    caller = phones.start("1001", tones.a)
    controller.start_worker(edge_port=caller.sip_port, max_calls=4, rtp_span=SMALL_RTP_SPAN)
    cases: list[tuple[Command, str]] = [
        (Hangup("w1-404"), "no_such_leg"),
        (Bridge("w1-404", "w1-405"), "no_such_leg"),
        (Originate(leg="x", uri="not a uri", from_uri="sip:a@127.0.0.1"), "invalid_argument"),
        (
            Originate(leg="x", uri="sip:a@127.0.0.1", from_uri="sip:a@127.0.0.1", timeout_s=0),
            "invalid_argument",
        ),
        (
            Originate(leg="x", uri="sip:a@127.0.0.1", from_uri="sip:a@127.0.0.1", headers={"Via": "x"}),
            "invalid_argument",
        ),
    ]
    for cmd, code in cases:
        reply = controller.command(cmd)
        assert (reply.ok, reply.error_code) == (False, code), (cmd, reply)
        assert reply.error_message, reply

    incoming = _incoming_call(controller, caller)
    for cmd, code in [
        (Answer(incoming.leg, 100), "invalid_argument"),
        (Tone(incoming.leg, "siren"), "invalid_argument"),
        (Play(incoming.leg, ["relative.wav"]), "invalid_argument"),
        (SendDtmf(incoming.leg, "12"), "invalid_state"),  # no audio yet
        (SendDtmf(incoming.leg, "x"), "invalid_argument"),
        (Bridge(incoming.leg, incoming.leg), "invalid_argument"),
    ]:
        reply = controller.command(cmd)
        assert (reply.ok, reply.error_code) == (False, code), (cmd, reply)
    assert controller.ok(StopTone(incoming.leg)) == {"stopped": False}  # idempotent stops
    assert controller.ok(StopPlay(incoming.leg)) == {"stopped": False}
    controller.ok(Answer(incoming.leg, 200))
    controller.wait_state(incoming.leg, "confirmed")
    reply = controller.command(Answer(incoming.leg, 200))
    assert (reply.ok, reply.error_code) == (False, "invalid_state"), reply
    reply = controller.command(Reject(incoming.leg, 486))
    assert (reply.ok, reply.error_code) == (False, "invalid_state"), reply

    # An undecodable frame: the worker closes the connection and exits cleanly, hanging up its call.
    controller.send_raw(b'{"v":1,"kind":"cmd","id":1,"type":"answer","args":{}}\n')
    assert controller.wait_exit() == 0, controller.log_tail()
    caller.wait_event("CALL_CLOSED", EVENT_TIMEOUT_S)


@pytest.mark.timeout(90)
def test_admission_control_answers_503_itself(
    controller: TinyController, phones: PhoneFactory, tones: Tones
) -> None:
    first = phones.start("1001", tones.a)
    second = phones.start("1003", tones.b)
    ready = controller.start_worker(edge_port=first.sip_port, max_calls=1, rtp_span=SMALL_RTP_SPAN)
    assert ready.capacity == 1, ready
    leg = _answered_call(controller, first)

    second.dial(f"sip:1000@{LOOPBACK}:{controller.sip_port}")
    closed = second.wait_event("CALL_CLOSED", EVENT_TIMEOUT_S)
    assert closed.param.startswith("503"), closed.raw
    assert [e for e in controller.events() if isinstance(e, LegIncoming)] == [
        e for e in controller.events() if isinstance(e, LegIncoming) and e.leg == leg
    ]
    reply = controller.command(Originate(leg="b-1", uri=second.direct_uri, from_uri="sip:1001@127.0.0.1"))
    assert (reply.ok, reply.error_code) == (False, "capacity"), reply

    controller.ok(Hangup(leg))
    controller.wait_state(leg, "disconnected")
    second.dial(f"sip:1000@{LOOPBACK}:{controller.sip_port}")  # a slot is free again
    again = controller.wait_event(LegIncoming)
    assert again.leg != leg


@pytest.mark.timeout(90)
def test_sipp_caller_and_shutdown(
    controller: TinyController, phones: PhoneFactory, tones: Tones, sipp: Sipp
) -> None:
    """A SIPp UAC calls the worker directly and hangs up itself; then Shutdown ends a live call."""
    phone = phones.start("1002", tones.b)
    controller.start_worker(edge_port=phone.sip_port, max_calls=4, rtp_span=SMALL_RTP_SPAN)
    uac = sipp.start(
        "uac_record_route",
        controller.sip_port,
        users=[("1001", "unused")],
        sets={"media": "yes"},
        extra_args=["-s", "1000", "-d", "1500"],
        timeout_s=20,
    )
    incoming: LegIncoming = controller.wait_event(LegIncoming)
    assert incoming.from_uri == f"sip:1001@{LOOPBACK}", incoming
    assert incoming.headers.get("User-Agent") == "SIPp uac_record_route", incoming
    controller.ok(Answer(incoming.leg, 200))
    controller.wait_state(incoming.leg, "confirmed")
    ended = controller.wait_state(incoming.leg, "disconnected")
    assert ended.released_by == "remote", ended
    result = uac.wait()
    assert result.ok, result.describe()

    leg = _answered_call(controller, phone)
    assert controller.ok(Shutdown()) == {"legs": 1}
    ended = controller.wait_state(leg, "disconnected")
    assert ended.released_by == "system", ended
    phone.wait_event("CALL_CLOSED", EVENT_TIMEOUT_S)  # the worker sent BYE before exiting
    assert controller.wait_exit() == 0, controller.log_tail()


@pytest.mark.timeout(60)
def test_worker_exits_when_the_controller_goes_away(controller: TinyController, phones: PhoneFactory) -> None:
    controller.start_worker(edge_port=free_port(), max_calls=2, rtp_span=SMALL_RTP_SPAN)
    assert controller.conn is not None
    controller.conn.shutdown(socket.SHUT_RDWR)
    assert controller.wait_exit() == 0, controller.log_tail()


BURST_CALLS = 200  # calls in the burst test
BURST_RATE = 100  # calls per second: about half the rate a one-thread PJSUA2 B2BUA sustained here
BURST_LIMIT = 60  # calls in flight at most (120 legs with SIPp's side)
BURST_HOLD_MS = 300  # SIPp hangs up this long after its ACK
BURST_TIMEOUT_S = 40.0


@pytest.mark.timeout(120)
def test_a_burst_of_calls_answered_over_the_protocol(controller: TinyController, sipp: Sipp) -> None:
    """SIPp at 100 calls/s: every INVITE is offered, answered by the controller, and ended by a BYE."""
    controller.start_worker(edge_port=free_port(), rtp_span=RTP_SPAN)
    uac = sipp.start(
        "uac_record_route",
        controller.sip_port,
        users=[("1001", "unused")],
        calls=BURST_CALLS,
        rate=BURST_RATE,
        limit=BURST_LIMIT,
        trace_msg=False,
        extra_args=["-s", "1000", "-d", str(BURST_HOLD_MS)],
        timeout_s=BURST_TIMEOUT_S,
    )
    answered: set[str] = set()
    deadline = time.monotonic() + BURST_TIMEOUT_S
    while len(answered) < BURST_CALLS and time.monotonic() < deadline:
        try:
            incoming: LegIncoming = controller.wait_event(LegIncoming, 1.0)
        except ControllerError:
            continue
        controller.ok(Answer(incoming.leg, 200))
        answered.add(incoming.leg)
    result = uac.wait()
    assert result.ok and result.successful == BURST_CALLS, result.describe()
    assert len(answered) == BURST_CALLS
    ended = {
        e.leg
        for e in controller.wait_for_all(LegState, lambda e: e.state == "disconnected", BURST_CALLS)
        if e.released_by == "remote"
    }
    assert ended == answered
    assert controller.proc is not None and controller.proc.poll() is None  # still serving
    assert controller.ok(Shutdown()) == {"legs": 0}
    assert controller.wait_exit() == 0, controller.log_tail()


DISTINCT_CALLERS = 150  # well beyond the 62 From accounts one worker keeps


@pytest.mark.timeout(120)
def test_originate_from_more_callers_than_the_worker_has_accounts(
    controller: TinyController, sipp: Sipp
) -> None:
    """Each From identity needs a pjsua account; past the cache size idle accounts are reused. Every
    originated leg still leaves with its own From (none fails with "account is not valid")."""
    uas_port = free_port()
    uas = sipp.start("uas_busy", None, local_port=uas_port, calls=DISTINCT_CALLERS, timeout_s=100)
    time.sleep(0.3)
    controller.start_worker(edge_port=uas_port, rtp_span=RTP_SPAN)
    for i in range(DISTINCT_CALLERS):
        leg = f"o-{i}"
        controller.ok(
            Originate(leg=leg, uri=f"sip:1002@{LOOPBACK}:{uas_port}", from_uri=f"sip:{3000 + i}@{LOOPBACK}")
        )
        ended = controller.wait_state(leg, "disconnected")
        assert ended.sip_code == 486, (i, ended)
        if i % 25 == 0:
            gc_pause = 0.2  # give the worker's periodic garbage collection a chance to run between bursts
            time.sleep(gc_pause)
    result = uas.wait()
    assert result.successful == DISTINCT_CALLERS, result.describe()
    froms = [
        m.split("\nFrom:", 1)[1].split("\n", 1)[0] if "\nFrom:" in m else ""
        for m in result.received_messages()
        if m.startswith("INVITE ")
    ]
    assert any(f"sip:{3000 + DISTINCT_CALLERS - 1}@" in f for f in froms), froms[-3:]
    assert controller.proc is not None and controller.proc.poll() is None
