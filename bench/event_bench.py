#!/usr/bin/env python3
"""Event benchmark: how late call events reach an MQTT subscriber, and how fast the sink publishes.

Everything on 127.0.0.1, bounded in calls, events and seconds, for both brokers the node supports: the
embedded amqtt broker (`mqtt.url = "embedded"`, inside the node's event loop) and Mosquitto (an external
process, `mqtt.url = "mqtt://…"`). The subscriber is always `mosquitto_sub` in its own process, so it does
not share the node's CPU; it stamps each message's arrival (`-F "%U %p"`: Unix time, ns).

1. **Latency with real calls.** A fresh `softswitch serve`; the callee SIPp registers 1900 with digest and
   answers every call (`uas_record_route.xml`); the caller SIPp (`uac_record_route.xml`, users 1100-…,
   `-trace_msg`) places N calls at R calls/s: INVITE → 407 → INVITE with Proxy-Authorization → 200 → ACK,
   a hold, BYE. Each event of the caller leg is matched to the SIP message that caused it by the caller's
   SIP Call-ID (`data.sip_call_id` of the `caller`-role events):

   - `call.initiated` ← the authenticated INVITE SIPp sent (the one carrying Proxy-Authorization);
   - `call.answered` ← the 200 OK to that INVITE, as SIPp received it;
   - `call.ended` ← the BYE SIPp sent.

   Latency = arrival at the subscriber − SIPp's trace timestamp of that message, both read from the
   machine's wall clock. SIPp stamps `messages.log` in local time (`YYYY-MM-DD HH:MM:SS.micro`): this
   script runs with `TZ=UTC`, which SIPp inherits, so a stamp converts to Unix time without any DST
   ambiguity. The controller's CPU (user + system, /proc) over the run gives CPU per call.

2. **Sustained publisher throughput** (no calls, no node): an `MqttSink` in this process on a SQLite
   outbox in a temporary directory, the embedded broker in this process's event loop (as the node runs
   it) or Mosquitto. A burst of synthetic call events is put on the sink at once (every event is written
   to the outbox, published with QoS 1 and deleted once acknowledged); timed until the outbox is empty
   (events/s acknowledged) and until the subscriber has received all of them (events/s delivered).

    .venv/bin/python bench/event_bench.py [--calls 200] [--rate 10] [--burst 20000] [--json out.json]
    .venv/bin/python bench/event_bench.py --write-docs      # refresh the "Measured" section of docs/events.md
    .venv/bin/python bench/event_bench.py --smoke           # a few calls and a small burst per broker, < 60 s

Exit status: 0 when every call completed, every event was matched and every burst was delivered; 1
otherwise; 2 when SIPp, Mosquitto or the softswitch is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from call_bench import (
    CALLEE,
    CALLER_FIRST,
    NODE_MAX_CALLS,
    NODE_MAX_CPS,
    NODE_RTP_PORTS,
    UAC_RECV_TIMEOUT_MS,
    conditions,
    fmt,
    node_processes,
    register_callee,
    start_uas,
)
from common import (
    ROOT,
    SOFTSWITCH_EXE,
    auth_csv,
    free_port,
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

LOOPBACK = "127.0.0.1"
PREFIX = "softswitch/v1"
BROKERS = ("embedded", "mosquitto")
#: The caller-leg events matched to SIP messages, and the message each one is matched to.
MATCHED = {
    "call.initiated": "the authenticated INVITE sent",
    "call.answered": "the 200 to it received",
    "call.ended": "the BYE sent",
}
CALLS = 200
RATE = 10.0
#: Talk time of each call (SIPp -d): the BYE follows the ACK after this.
HOLD_MS = 1000
#: Distinct caller users (1100..): each INVITE answers a 407 with its caller's credentials.
CALLERS = 20
BURST = 20_000
#: Media workers of the node: calls carry no RTP here (the events are measured), one is plenty.
WORKERS = 1
SMOKE_CALLS = 4
SMOKE_RATE = 4.0
SMOKE_HOLD_MS = 500
SMOKE_BURST = 500
#: Seconds a SIPp caller run may take beyond calls/rate + hold before its -timeout ends it.
CALL_SLACK_S = 30.0
#: Seconds the events of a finished call run have to reach the subscriber.
EVENTS_WAIT_S = 30.0
#: Seconds a fresh subscriber gets to show it is subscribed (the callee's registration event, or its
#: retained snapshot), and how many subscribers are tried before giving up.
SUBSCRIBE_WAIT_S = 5.0
SUBSCRIBE_ATTEMPTS = 4
#: Seconds for a broker to listen, for a probe event to arrive.
BROKER_WAIT_S = 20.0
#: Throughput run: the outbox must drain, and the subscriber receive everything, within
#: max(THROUGHPUT_MIN_WAIT_S, burst / THROUGHPUT_FLOOR_PER_S) seconds each (a bound, not a target).
THROUGHPUT_MIN_WAIT_S = 60.0
THROUGHPUT_FLOOR_PER_S = 50.0
#: Seconds Mosquitto and mosquitto_sub get to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 10.0
#: Events per synthetic call in the throughput burst (two legs, as a basic answered call publishes).
EVENTS_PER_CALL = 10
DOCS_FILE = ROOT / "docs" / "events.md"
DOCS_HEADING = "## Measured"
DOCS_BEGIN = "<!-- event_bench summary: begin (written by bench/event_bench.py --write-docs) -->"
DOCS_END = "<!-- event_bench summary: end -->"


# --- brokers and the subscriber ---------------------------------------------------------------------------


class Mosquitto:
    """A Mosquitto 2.x broker on 127.0.0.1:`port` (no persistence, no queue limit), stopped by its PID."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "mosquitto.conf"
        # max_queued_messages 0: no limit on what waits for a slow subscriber (the default, 1000, would
        # drop most of a burst).
        self.conf.write_text(
            f"listener {port} {LOOPBACK}\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages 0\nlog_dest file {directory}/mosquitto.log\n"
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + BROKER_WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: see {self.directory / 'mosquitto.log'}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to one process by its PID, a bounded wait, SIGKILL if it overstays."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(STOP_TIMEOUT_S)


class Subscriber:
    """`mosquitto_sub` on `topic` with QoS 1 in its own process, each line `<arrival Unix time> <payload>`.

    Keeps the first copy of every CloudEvent (by `id`: delivery is at least once) with its arrival time,
    and counts them by `kind(envelope)`. Retained registration snapshots are kept apart in `snapshots`.
    `-W` ends it by itself after `bound_s`; `stop()` ends it by its PID.
    """

    def __init__(
        self,
        port: int,
        topic: str,
        bound_s: float,
        kind: Callable[[dict[str, Any]], str] = lambda envelope: str(envelope["type"]),
    ) -> None:
        self.kind = kind
        self.lock = threading.Lock()
        self.events: dict[str, tuple[float, dict[str, Any]]] = {}
        self.counts: Counter[str] = Counter()
        self.snapshots: list[dict[str, Any]] = []
        self.duplicates = 0
        self.unreadable = 0
        self.last_arrival = 0.0
        self.proc = subprocess.Popen(
            [
                "mosquitto_sub", "-h", LOOPBACK, "-p", str(port), "-q", "1", "-t", topic,
                "-F", "%U %p", "-W", str(max(1, int(bound_s))),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at, _, payload = line.strip().partition(b" ")
            if not payload:  # a cleared retained snapshot
                continue
            try:
                arrival = float(at)
                envelope = json.loads(payload)
            except ValueError:
                self.unreadable += 1
                continue
            with self.lock:
                if "id" not in envelope:
                    self.snapshots.append(envelope)
                elif envelope["id"] in self.events:
                    self.duplicates += 1
                else:
                    self.events[envelope["id"]] = (arrival, envelope)
                    self.counts[self.kind(envelope)] += 1
                    self.last_arrival = max(self.last_arrival, arrival)

    def received(self) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return list(self.events.values())

    def count(self, kind: str) -> int:
        with self.lock:
            return self.counts[kind]

    def stop(self) -> None:
        terminate(self.proc)
        self._reader.join(STOP_TIMEOUT_S)


@contextlib.contextmanager
def mosquitto_broker(directory: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(directory, free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# --- part 1: latency with real calls ----------------------------------------------------------------------


def sipp_stamp(text: str) -> float:
    """Unix time of a SIPp trace stamp (`2026-11-22 06:19:55.404760`, local time = UTC here)."""
    stamp = datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f")
    return calendar.timegm(stamp.timetuple()) + stamp.microsecond / 1e6


_TRACE_ENTRY = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\n", re.MULTILINE)


def _header(lines: list[str], name: str) -> str | None:
    prefix = name.lower() + ":"
    for line in lines:
        if line.lower().startswith(prefix):
            return line.split(":", 1)[1].strip()
    return None


def sip_moments(messages_log: Path) -> dict[str, dict[str, float]]:
    """Per SIP Call-ID, when SIPp sent or received the message each matched event follows (Unix time):
    the first copy of each (a retransmission is stamped again, later)."""
    moments: dict[str, dict[str, float]] = {}
    text = messages_log.read_text(errors="replace") if messages_log.exists() else ""
    parts = _TRACE_ENTRY.split(text)
    for stamp, body in zip(parts[1::2], parts[2::2], strict=True):
        # "UDP message sent (661 bytes):" or "UDP message received [485] bytes :", a blank line, then
        # the message: its start line, its headers up to a blank line, its body.
        direction, _, message = body.lstrip("\n").partition("\n")
        lines = message.lstrip("\n").splitlines()
        if not lines:
            continue
        start = lines[0]
        headers = lines[1 : lines.index("")] if "" in lines else lines[1:]
        call_id = _header(headers, "Call-ID")
        cseq = (_header(headers, "CSeq") or "").split()
        if call_id is None or len(cseq) != 2:
            continue
        event: str | None = None
        if "message sent" in direction:
            if start.startswith("INVITE ") and _header(headers, "Proxy-Authorization") is not None:
                event = "call.initiated"
            elif start.startswith("BYE "):
                event = "call.ended"
        elif "message received" in direction and start.startswith("SIP/2.0 200") and cseq[1] == "INVITE":
            event = "call.answered"
        if event is not None:
            moments.setdefault(call_id, {}).setdefault(event, sipp_stamp(stamp))
    return moments


def distribution(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 0.50),
        "p95": percentile(ordered, 0.95),
        "p99": percentile(ordered, 0.99),
        "max": round(ordered[-1], 2) if ordered else None,
        "mean": round(statistics.fmean(ordered), 2) if ordered else None,
    }


def match_events(
    moments: dict[str, dict[str, float]], received: list[tuple[float, dict[str, Any]]]
) -> dict[str, Any]:
    """Latency (ms) of every caller-leg event whose SIP message SIPp traced; what is missing on each side."""
    arrivals: dict[tuple[str, str], float] = {}
    for arrival, envelope in received:
        data = envelope.get("data") or {}
        if envelope.get("type") in MATCHED and data.get("role") == "caller":
            key = (str(data.get("sip_call_id")), str(envelope["type"]))
            arrivals[key] = min(arrival, arrivals.get(key, arrival))
    latency: dict[str, list[float]] = {kind: [] for kind in MATCHED}
    expected: Counter[str] = Counter()
    for call_id, sent in moments.items():
        for kind, at in sent.items():
            expected[kind] += 1
            if (call_id, kind) in arrivals:
                latency[kind].append(1000 * (arrivals[(call_id, kind)] - at))
    unmatched_events = sum(
        1 for (call_id, kind) in arrivals if call_id not in moments or kind not in moments[call_id]
    )
    every = [v for values in latency.values() for v in values]
    return {
        "latency_ms": {**{kind: distribution(v) for kind, v in latency.items()}, "all": distribution(every)},
        "expected": {kind: expected[kind] for kind in MATCHED},
        "matched": {kind: len(latency[kind]) for kind in MATCHED},
        "events_without_sip_message": unmatched_events,
    }


def registered_1900(subscriber: Subscriber) -> bool:
    """The subscriber saw the callee's registration: the event itself, or the retained snapshot."""
    with subscriber.lock:
        snapshots = list(subscriber.snapshots)
    if any(s.get("type") == "device.registration" and s.get("user") == CALLEE[0] for s in snapshots):
        return True
    return any(
        e["type"] == "device.registered" and (e.get("data") or {}).get("user") == CALLEE[0]
        for _, e in subscriber.received()
    )


def subscribe_calls(mqtt_port: int, bound_s: float) -> Subscriber:
    """A subscriber on every topic, known to be subscribed (it saw the callee's registration)."""
    for _ in range(SUBSCRIBE_ATTEMPTS):
        subscriber = Subscriber(mqtt_port, f"{PREFIX}/#", bound_s)
        deadline = time.monotonic() + SUBSCRIBE_WAIT_S
        while time.monotonic() < deadline and subscriber.proc.poll() is None:
            if registered_1900(subscriber):
                return subscriber
            time.sleep(0.05)
        subscriber.stop()  # subscribed too late for the event and too early for the snapshot: again
    raise RuntimeError(f"mosquitto_sub on port {mqtt_port} never saw the callee's registration")


def call_latency(
    broker: str,
    work: Path,
    *,
    calls: int,
    rate: float,
    hold_ms: int,
    callers: int,
    workers: int | str,
    log_level: str,
) -> dict[str, Any]:
    """Part 1 for one broker: a fresh node, N calls through it, each caller-leg event matched to SIPp."""
    caller_users = [(str(CALLER_FIRST + i), f"bench-pw-{CALLER_FIRST + i}") for i in range(callers)]
    work.mkdir(parents=True, exist_ok=True)
    injection = auth_csv(work / "callers.csv", caller_users)
    expected_s = calls / rate + hold_ms / 1000
    sipp_timeout_s = expected_s + CALL_SLACK_S
    bound_s = sipp_timeout_s + EVENTS_WAIT_S + 4 * CALL_SLACK_S  # the subscriber outlives the run
    with contextlib.ExitStack() as stack:
        mqtt_url = "embedded://127.0.0.1:0"
        mosquitto: Mosquitto | None = None
        if broker == "mosquitto":
            mosquitto = stack.enter_context(mosquitto_broker(work / "mosquitto"))
            mqtt_url = f"mqtt://{LOOPBACK}:{mosquitto.port}"
        media = f'max_calls = {NODE_MAX_CALLS}\nmax_cps = {NODE_MAX_CPS}\nrtp_ports = "{NODE_RTP_PORTS}"'
        node, sip_port = start_softswitch(
            work / "node",
            [*caller_users, CALLEE],
            media_workers=workers,
            media_extra=media,
            log_level=log_level,
            mqtt_url=mqtt_url,
        )
        stack.callback(stop_node, node, work)
        ports = json.loads((work / "node" / "data" / "ports.json").read_text())
        mqtt_port = mosquitto.port if mosquitto is not None else int(ports["mqtt"])
        callee_port = free_port()
        register_callee(work, sip_port, callee_port)
        subscriber = subscribe_calls(mqtt_port, bound_s)
        stack.callback(subscriber.stop)
        uas = start_uas(work, callee_port)
        stack.callback(stop_sipp, uas)

        cmd = sipp_command(
            "uac_record_route",
            local_port=free_port(),
            target_port=sip_port,
            calls=calls,
            rate=rate,
            injection=injection,
            sets={"media": "no"},
            extra=[
                "-s", CALLEE[0], "-d", str(hold_ms), "-recv_timeout", str(UAC_RECV_TIMEOUT_MS),
                "-trace_msg", "-message_file", "messages.log",
            ],
            timeout_s=sipp_timeout_s,
        )  # fmt: skip
        rundir = work / "calls"
        watched = node_processes(node.pid)
        cpu_start = {w.pid: (process_sample(w.pid) or (0.0, 0))[0] for w in watched}
        broker_cpu_start = None
        if mosquitto is not None and mosquitto.proc is not None:
            broker_cpu_start = (process_sample(mosquitto.proc.pid) or (0.0, 0))[0]
        busy0, total0 = machine_busy_ticks()
        started = time.monotonic()
        uac = start_sipp(cmd, rundir)
        code, uac_cpu = wait_sipp(uac, sipp_timeout_s + CALL_SLACK_S)
        sipp_elapsed = time.monotonic() - started
        outcome = read_outcome(rundir, code, sipp_elapsed, uac_cpu)
        moments = sip_moments(rundir / "messages.log")
        wanted = sum(len(sent) for sent in moments.values())
        # Until every traced SIP message has its event at the subscriber (bounded).
        deadline = time.monotonic() + EVENTS_WAIT_S
        while True:
            matched = match_events(moments, subscriber.received())
            if sum(matched["matched"].values()) >= wanted or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        busy1, total1 = machine_busy_ticks()
        cpu_s = {
            w.role + (f"-{i}" if w.role == "worker" else ""): (process_sample(w.pid) or (0.0, 0))[0]
            - cpu_start[w.pid]
            for i, w in enumerate(watched)
        }
        broker_cpu_s = None
        if broker_cpu_start is not None and mosquitto is not None and mosquitto.proc is not None:
            broker_cpu_s = (process_sample(mosquitto.proc.pid) or (0.0, 0))[0] - broker_cpu_start

    completed = outcome.successful
    per_call = max(1, completed)
    all_matched = (
        completed == calls
        and all(matched["expected"][kind] == completed for kind in MATCHED)
        and all(matched["matched"][kind] == matched["expected"][kind] for kind in MATCHED)
    )
    controller = cpu_s.get("controller", 0.0)
    worker_cpu = sum(v for k, v in cpu_s.items() if k.startswith("worker"))
    return {
        "broker": broker,
        "calls": calls,
        "offered_rate": rate,
        "hold_ms": hold_ms,
        "successful": completed,
        "failed": outcome.failed,
        "retransmissions": outcome.retransmissions,
        "sipp_exit_code": outcome.exit_code,
        "sipp_watchdog": outcome.watchdog,
        **matched,
        "all_matched": all_matched,
        "subscriber_duplicates": subscriber.duplicates,
        "elapsed_s": round(elapsed, 2),
        "controller_cpu_s": round(controller, 3),
        "controller_cpu_ms_per_call": round(1000 * controller / per_call, 2),
        "controller_cpu_percent_of_one_core": round(100 * controller / max(elapsed, 1e-3), 1),
        "workers_cpu_ms_per_call": round(1000 * worker_cpu / per_call, 2),
        "mosquitto_cpu_ms_per_call": None
        if broker_cpu_s is None
        else round(1000 * broker_cpu_s / per_call, 2),
        # All cores together, this run and everything else on the machine (it is shared).
        "machine_busy_percent": round(100 * (busy1 - busy0) / max(1, total1 - total0), 1),
        "errors": outcome.error_tail if not all_matched else [],
        "rundir": str(rundir),
    }


def stop_node(node: subprocess.Popen[bytes], work: Path) -> None:
    code = stop_softswitch(node)
    if code not in (0, None):
        print(f"  softswitch exited with {code}: see {work / 'node' / 'softswitch.log'}", flush=True)


# --- part 2: sustained publisher throughput ---------------------------------------------------------------


def synthetic_call(conversation: str) -> list[Any]:
    """The events of a basic answered call, both legs, as the node publishes them (EVENTS_PER_CALL)."""
    from softswitch.events.types import (
        CallAnswered,
        CallBridged,
        CallEnded,
        CallInitiated,
        CallRinging,
        CdrCreated,
        ConversationEnded,
    )

    a, b = f"{conversation}-a", f"{conversation}-b"

    def leg(call_id: str, role: str) -> dict[str, Any]:
        return {
            "conversation_id": conversation,
            "call_id": call_id,
            "sip_call_id": f"{call_id}@{LOOPBACK}",
            "direction": "inbound" if role == "caller" else "outbound",
            "from_": "1100",
            "to": "1900",
            "role": role,
            "user_data": None,
        }

    return [
        CallInitiated(**leg(a, "caller"), user="1100"),
        CallInitiated(**leg(b, "callee"), user="1900"),
        CallRinging(**leg(b, "callee")),
        CallAnswered(**leg(b, "callee"), answered_by="1900"),
        CallBridged(**leg(a, "caller"), peer_call_id=b),
        CallBridged(**leg(b, "callee"), peer_call_id=a),
        CallEnded(**leg(b, "callee"), final_status="completed", released_by="remote", talk_s=1.0),
        CallEnded(**leg(a, "caller"), final_status="completed", released_by="local", talk_s=1.0),
        ConversationEnded(conversation, (a, b), 1.2, "completed"),
        CdrCreated(conversation, {"conversationSid": conversation, "cdrs": [{"call_id": a}, {"call_id": b}]}),
    ]


async def sink_throughput(broker: str, work: Path, burst: int) -> dict[str, Any]:
    """Part 2 for one broker: a burst of `burst` events accepted at once; acknowledged and delivered."""
    from softswitch.config import parse_config
    from softswitch.events.broker import EmbeddedBroker
    from softswitch.events.mqtt import MqttSink
    from softswitch.events.types import CallRinging
    from softswitch.metrics import Metrics
    from softswitch.store.db import Store

    wait_s = max(THROUGHPUT_MIN_WAIT_S, burst / THROUGHPUT_FLOOR_PER_S)
    work.mkdir(parents=True, exist_ok=True)
    # Undone in reverse order, even on failure: the sink, the subscriber, the store, the broker.
    async with contextlib.AsyncExitStack() as stack:
        if broker == "mosquitto":
            port = stack.enter_context(mosquitto_broker(work / "mosquitto")).port
            config = parse_config(f'[mqtt]\nurl = "mqtt://{LOOPBACK}:{port}"\n', "bench")
        else:  # in this event loop, beside the sink, as `mqtt.url = "embedded"` runs it in the node
            embedded = EmbeddedBroker(LOOPBACK, 0)
            await embedded.start()
            stack.push_async_callback(embedded.stop)
            port = embedded.port
            config = parse_config('[mqtt]\nurl = "embedded"\n', "bench")
        store = Store(f"sqlite:///{work / 'softswitch.db'}")
        stack.callback(store.close)
        subscriber = Subscriber(
            port,
            f"{PREFIX}/#",
            3 * wait_s + BROKER_WAIT_S,
            kind=lambda e: "probe" if e["subject"] == "PROBE" else "burst",
        )
        stack.callback(subscriber.stop)
        sink = MqttSink(config, store, Metrics(), "bench")
        await sink.start((LOOPBACK, port))
        stack.push_async_callback(sink.stop)

        # Until the subscriber is known to be subscribed: a probe event every 100 ms.
        probe = CallRinging(
            conversation_id="PROBE",
            call_id="probe-a",
            sip_call_id=f"probe-a@{LOOPBACK}",
            direction="inbound",
            from_="1100",
            to="1900",
            role="caller",
            user_data=None,
        )
        deadline = time.monotonic() + BROKER_WAIT_S
        while not subscriber.count("probe"):
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto_sub never received a probe event")
            sink(probe)
            await asyncio.sleep(0.1)
        events = [e for n in range(-(-burst // EVENTS_PER_CALL)) for e in synthetic_call(f"TP{n}")][:burst]

        started = time.perf_counter()
        wall_start = time.time()
        for event in events:
            sink(event)
        accepted_s = time.perf_counter() - started
        deadline = time.monotonic() + wait_s
        while sink.queued and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        acknowledged_s = time.perf_counter() - started
        acknowledged = burst - sink.queued
        deadline = time.monotonic() + wait_s
        while subscriber.count("burst") < burst and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the reader thread: the last line parsed
        delivered = subscriber.count("burst")
        with subscriber.lock:
            last = max(
                (at for at, e in subscriber.events.values() if e["subject"] != "PROBE"), default=wall_start
            )
        delivered_s = last - wall_start
    return {
        "broker": broker,
        "burst": burst,
        "accepted_s": round(accepted_s, 3),
        "acknowledged": acknowledged,
        "acknowledged_s": round(acknowledged_s, 3),
        "acknowledged_per_s": round(acknowledged / max(acknowledged_s, 1e-6)),
        "delivered": delivered,
        "delivered_s": round(delivered_s, 3),
        "delivered_per_s": round(delivered / max(delivered_s, 1e-6)),
        "complete": acknowledged == burst and delivered == burst,
        "subscriber_duplicates": subscriber.duplicates,
    }


# --- report -----------------------------------------------------------------------------------------------


def machine_conditions() -> dict[str, Any]:
    facts = conditions()
    facts.pop("media_engine", None)
    version = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout
    # "mosquitto version 2.0.11" → "Mosquitto 2.0.11"
    found = next((x.strip() for x in version.splitlines() if "version" in x), "mosquitto version ?")
    facts["mosquitto"] = found.replace("mosquitto version", "Mosquitto")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        facts["amqtt"] = importlib.metadata.version("amqtt")
    return facts


def describe_calls(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    parts = [
        f"{kind} p50/p95/p99/max={lat[kind]['p50']}/{lat[kind]['p95']}/{lat[kind]['p99']}/{lat[kind]['max']}"
        for kind in [*MATCHED, "all"]
    ]
    matched = sum(r["matched"].values())
    expected = r["successful"] * len(MATCHED)
    line = (
        f"{r['broker']:>9} calls: {r['successful']}/{r['calls']} ok at {r['offered_rate']:g}/s, "
        f"matched {matched}/{expected} events; latency ms " + "; ".join(parts) + "; "
        f"controller {r['controller_cpu_ms_per_call']} ms CPU/call "
        f"({r['controller_cpu_percent_of_one_core']}% of a core); machine busy {r['machine_busy_percent']}%"
    )
    if not r["all_matched"]:
        line += f"  NOT ALL MATCHED (expected {r['expected']}, matched {r['matched']}, failed {r['failed']})"
    if r["sipp_watchdog"]:
        line += "  SIPp WATCHDOG: run invalid"
    return line


def describe_burst(r: dict[str, Any]) -> str:
    line = (
        f"{r['broker']:>9} burst: {r['burst']} events: {r['acknowledged_per_s']} events/s acknowledged "
        f"({r['acknowledged_s']} s), {r['delivered_per_s']} events/s delivered ({r['delivered_s']} s)"
    )
    if not r["complete"]:
        line += f"  INCOMPLETE: {r['acknowledged']} acknowledged, {r['delivered']} delivered"
    return line


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for broker in BROKERS:
        calls = next((r for r in report["calls"] if r["broker"] == broker), None)
        burst = next((r for r in report["throughput"] if r["broker"] == broker), None)
        summary[broker] = {
            "acknowledged_per_s": burst["acknowledged_per_s"] if burst else None,
            "delivered_per_s": burst["delivered_per_s"] if burst else None,
            "burst_complete": burst["complete"] if burst else False,
            "latency_ms": {
                kind: {q: calls["latency_ms"][kind][q] for q in ("p50", "p95", "p99", "max")}
                for kind in [*MATCHED, "all"]
            }
            if calls
            else None,
            "events_matched": sum(calls["matched"].values()) if calls else 0,
            "events_expected": calls["successful"] * len(MATCHED) if calls else 0,
            "all_matched": calls["all_matched"] if calls else False,
            "controller_cpu_ms_per_call": calls["controller_cpu_ms_per_call"] if calls else None,
        }
    return summary


def _p50_p99(summary: dict[str, Any], kind: str) -> str:
    lat = (summary.get("latency_ms") or {}).get(kind) or {}
    return f"{fmt(lat.get('p50'))} / {fmt(lat.get('p99'))} ms"


def docs_section(report: dict[str, Any]) -> str:
    c = report["conditions"]
    s = report["summary"]
    p = report["parameters"]
    load = ", ".join(f"{x:.2f}" for x in c["load_average_at_start"])
    names = {"embedded": f"embedded (amqtt {c.get('amqtt', '?')}, in the node)", "mosquitto": c["mosquitto"]}
    rows = []
    for broker in BROKERS:
        b = s[broker]
        rows.append(
            f"| {names[broker]} | {fmt(b['acknowledged_per_s'])} | {fmt(b['delivered_per_s'])} "
            f"| {_p50_p99(b, 'call.initiated')} | {_p50_p99(b, 'call.answered')} "
            f"| {_p50_p99(b, 'call.ended')} | {fmt(b['controller_cpu_ms_per_call'], ' ms')} |"
        )
    matched = [
        f"{broker}: {s[broker]['events_matched']} of {s[broker]['events_expected']}"
        + ("" if s[broker]["all_matched"] else " (NOT all: the figures above are partial)")
        for broker in BROKERS
    ]
    overall = [
        f"{broker} p50 {fmt(lat['p50'])}, p95 {fmt(lat['p95'])}, p99 {fmt(lat['p99'])}, "
        f"max {fmt(lat['max'])} ms"
        for broker in BROKERS
        if (lat := (s[broker].get("latency_ms") or {}).get("all"))
    ]
    notes = []
    embedded = s["embedded"]
    if (embedded["acknowledged_per_s"] or 0) < 2 * (embedded["delivered_per_s"] or 1):
        notes = [
            "",
            "With the embedded broker, acknowledgement kept pace with delivery to the subscriber over this "
            "burst: amqtt, in the node's own event loop, sets the pace of a sustained stream of events.",
        ]
    lines = [
        DOCS_BEGIN,
        "",
        f"Measured by `bench/event_bench.py` on {c['date_utc']}: {c['cores']} cores ({c['cpu_model']}), "
        f"Linux {c['kernel']}, Python {c['python']}, {c['sipp']}; load average at start {load} (the "
        "machine is shared with other work: the figures vary between runs). Everything on loopback; the "
        "subscriber is `mosquitto_sub` in its own process.",
        "",
        f"- **Throughput**: a burst of {p['burst']:,} synthetic call events put on an `MqttSink` at once "
        "(outbox on SQLite in WAL mode: every event written, published with QoS 1, deleted once "
        "acknowledged), timed until the outbox was empty (acknowledged) and until the subscriber had all of "
        "them (delivered).",
        f"- **Latency**: {p['calls']} calls at {p['rate']:g} calls/s through a fresh node (SIPp caller, "
        f"digest with a 407 round trip, {p['hold_ms']} ms talk time, SIPp callee registered), each event of "
        "the caller leg matched by SIP Call-ID to the SIP message that caused it: `call.initiated` ← the "
        "authenticated INVITE sent, `call.answered` ← the 200 received, `call.ended` ← the BYE sent. "
        "Latency = arrival at the subscriber − SIPp's trace timestamp of the message (same clock). It "
        "includes the outbox's 5 ms write batching.",
        "- **Controller CPU per call**: user + system time of the node's main process over the calls "
        "(with the embedded broker, that process also runs the broker and its fan-out to the subscriber).",
        "",
        "| broker | events/s acknowledged | events/s delivered | call.initiated p50 / p99 "
        "| call.answered p50 / p99 | call.ended p50 / p99 | controller CPU per call |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The three call events together: " + "; ".join(overall) + ". "
        "Events matched to their SIP message: " + "; ".join(matched) + ".",
        *notes,
        "",
        DOCS_END,
    ]
    return "\n".join(lines)


def write_docs(report: dict[str, Any], path: Path) -> None:
    """Replace the section between the markers of docs/events.md, or add it under "Measured" at the end."""
    section = docs_section(report)
    text = path.read_text()
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        tail = rest.split(DOCS_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + f"\n\n{DOCS_HEADING}\n\n{section}\n"
    path.write_text(text)


# --- main -------------------------------------------------------------------------------------------------


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def complete(report: dict[str, Any]) -> bool:
    return (
        len(report["calls"]) == len(report["brokers"]) == len(report["throughput"])
        and all(r["all_matched"] for r in report["calls"])
        and all(r["complete"] for r in report["throughput"])
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=CALLS, help=f"calls per broker (default {CALLS})")
    parser.add_argument("--rate", type=float, default=RATE, help=f"calls/s (default {RATE:g})")
    parser.add_argument(
        "--hold-ms", type=int, default=HOLD_MS, help=f"talk time per call (default {HOLD_MS})"
    )
    parser.add_argument(
        "--callers", type=int, default=CALLERS, help=f"distinct caller users (default {CALLERS})"
    )
    parser.add_argument(
        "--burst", type=int, default=BURST, help=f"events in the throughput burst (default {BURST})"
    )
    parser.add_argument(
        "--brokers", default=",".join(BROKERS), help="comma-separated, of: embedded, mosquitto (default both)"
    )
    parser.add_argument(
        "--workers", default=str(WORKERS), help='media.workers of the node ("auto" or a number)'
    )
    parser.add_argument("--node-log-level", default="warning", help="log.level of the node")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_CALLS} calls at {SMOKE_RATE:g}/s and a burst of {SMOKE_BURST} per broker",
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument(
        "--write-docs", action="store_true", help=f"refresh the measured section of {DOCS_FILE.name}"
    )
    parser.add_argument("--work", type=Path, help="keep SIPp traces and node logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    if not brokers or any(b not in BROKERS for b in brokers):
        parser.error(f"--brokers takes {', '.join(BROKERS)}")
    if args.smoke:
        args.calls, args.rate, args.hold_ms, args.burst = SMOKE_CALLS, SMOKE_RATE, SMOKE_HOLD_MS, SMOKE_BURST
    if args.calls < 1 or args.rate <= 0 or args.burst < 1 or not 1 <= args.callers <= 799:
        parser.error("--calls, --rate and --burst must be positive, --callers within 1..799")
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    for tool, package in (
        ("sipp", "sip-tester"),
        ("mosquitto", "mosquitto"),
        ("mosquitto_sub", "mosquitto-clients"),
    ):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install {package} (make test installs it)", file=sys.stderr)
            return 2
    if not SOFTSWITCH_EXE.exists():
        print(f"{SOFTSWITCH_EXE} is missing: .venv/bin/pip install -e '.[test]'", file=sys.stderr)
        return 2
    # SIPp stamps its message trace in local time: make local time UTC for it and for this process.
    os.environ["TZ"] = "UTC"
    time.tzset()
    from softswitch.logging import configure_logging

    configure_logging("warning", "json")
    work = args.work or Path(tempfile.mkdtemp(prefix="event-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    workers: int | str = int(args.workers) if args.workers.isdigit() else args.workers
    report: dict[str, Any] = {
        "conditions": machine_conditions(),
        "parameters": {
            "calls": args.calls,
            "rate": args.rate,
            "hold_ms": args.hold_ms,
            "callers": args.callers,
            "burst": args.burst,
            "workers": workers,
            "smoke": args.smoke,
        },
        "brokers": brokers,
        "calls": [],
        "throughput": [],
    }
    print(f"work dir: {work}", flush=True)
    started = time.monotonic()
    for broker in brokers:
        result = call_latency(
            broker,
            work / f"calls-{broker}",
            calls=args.calls,
            rate=args.rate,
            hold_ms=args.hold_ms,
            callers=args.callers,
            workers=workers,
            log_level=args.node_log_level,
        )
        report["calls"].append(result)
        print(describe_calls(result), flush=True)
    for broker in brokers:
        burst = asyncio.run(sink_throughput(broker, work / f"burst-{broker}", args.burst))
        report["throughput"].append(burst)
        print(describe_burst(burst), flush=True)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["conditions"]["load_average_at_end"] = list(os.getloadavg())
    report["summary"] = summarize(report)
    report["complete"] = complete(report)
    print(json.dumps(report["summary"], indent=2), flush=True)
    if not report["complete"]:
        print("NOT every call completed, event matched and burst delivered: see above", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.write_docs:
        write_docs(report, DOCS_FILE)
        print(f"summary written to {DOCS_FILE}", flush=True)
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
