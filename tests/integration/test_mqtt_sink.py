"""The MQTT sink against real brokers on 127.0.0.1: Mosquitto (started here) and the embedded amqtt broker.

Topics, QoS 1, retained registration snapshots, schema-valid payloads and gap-free `seq` (EVENTS.md);
a broker outage and a crash of the sink lose nothing and keep the order. Throughput and latency are
measured by `bench/event_bench.py`, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest

from softswitch.config import Config, parse_config
from softswitch.events.broker import EmbeddedBroker
from softswitch.events.bus import EventBus
from softswitch.events.mqtt import MqttSink
from softswitch.events.schemas import all_schemas
from softswitch.events.types import (
    CallAnswered,
    CallBridged,
    CallEnded,
    CallInitiated,
    CallRinging,
    CdrCreated,
    ConversationEnded,
    DeviceRegistered,
    DeviceUnregistered,
    Event,
)
from softswitch.metrics import Metrics
from softswitch.store.db import Store
from softswitch.store.outbox import Outbox
from tests.integration.peers import free_port, require_binary

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LOOPBACK = "127.0.0.1"
PREFIX = "softswitch/v1"
ALL_TOPICS = f"{PREFIX}/#"
#: Longest wait for a broker to listen, for messages to arrive, for an outbox to drain.
WAIT_S = 20.0
UNTIL_TIMEOUT_S = 30.0  # for the events of a few calls through a node to arrive
#: Quiet period after which no further (unexpected) message is taken to be coming.
QUIET_S = 0.5
VALIDATORS = {name: jsonschema.Draft202012Validator(schema) for name, schema in all_schemas()}
REPO_ROOT = Path(__file__).resolve().parents[2]


# -- Mosquitto ------------------------------------------------------------------------------------------


class Mosquitto:
    """A Mosquitto 2.x broker on 127.0.0.1:`port`, persisting sessions in `directory` across restarts."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(
            textwrap.dedent(
                f"""\
                listener {port} {LOOPBACK}
                allow_anonymous true
                persistence true
                persistence_location {directory}/
                max_queued_messages 0
                log_dest file {directory}/mosquitto.log
                """
            )
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [require_binary("mosquitto"), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.directory / 'mosquitto.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its sessions), bounded wait, SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto", free_port(udp=False))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# -- a subscriber ---------------------------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float  # time.perf_counter() on arrival

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.payload)
        return value


@dataclass
class Collector:
    """Subscribes to `topic` with QoS 1 in a persistent session (it survives a broker restart), and
    reconnects until stopped."""

    port: int
    topic: str = ALL_TOPICS
    identifier: str = "collector"
    messages: list[Received] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    LOOPBACK, self.port, identifier=self.identifier, clean_session=False, timeout=5
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        payload = message.payload
                        assert isinstance(payload, bytes)
                        self.messages.append(
                            Received(
                                str(message.topic), payload, message.qos, message.retain, time.perf_counter()
                            )
                        )
            except (aiomqtt.MqttError, OSError):  # the broker went away (or died with its node)
                await asyncio.sleep(0.05)

    async def wait_for(self, count: int, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.events())} of {count} events arrived")
            await asyncio.sleep(0.01)

    async def until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = UNTIL_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """The events received once `done(events)` holds (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.events()
            if done(current):
                return current
            assert time.monotonic() < deadline, [(e["type"], e["data"].get("state")) for e in current]
            await asyncio.sleep(0.05)

    def events(self) -> list[dict[str, Any]]:
        """Distinct CloudEvents received (first copy of each id: delivery is at least once)."""
        seen: set[str] = set()
        out = []
        for message in self.messages:
            if (
                message.topic.endswith("/registration")
                or "/commands/" in message.topic
                or not message.payload
            ):
                continue  # snapshots of devices, and commands (a backend's own messages), are no events
            envelope = message.json()
            if envelope["id"] not in seen:
                seen.add(envelope["id"])
                out.append(envelope)
        return out


def event_with(event_type: str, **data: Any) -> Callable[[list[dict[str, Any]]], bool]:
    """A `Collector.until` condition: an event of `event_type` whose data has these values arrived."""

    def done(events: list[dict[str, Any]]) -> bool:
        return any(
            e["type"] == event_type and all(e["data"].get(k) == v for k, v in data.items()) for e in events
        )

    return done


@contextlib.asynccontextmanager
async def collecting(
    port: int, topic: str = ALL_TOPICS, identifier: str = "collector"
) -> AsyncIterator[Collector]:
    collector = Collector(port, topic, identifier)
    task = asyncio.create_task(collector.run())
    try:
        await asyncio.wait_for(collector.subscribed.wait(), WAIT_S)
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def drained(sink: MqttSink, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while sink.queued:
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox still holds {sink.queued} events")
        await asyncio.sleep(0.01)


def mqtt_config(port: int) -> Config:
    return parse_config(f'[mqtt]\nurl = "mqtt://{LOOPBACK}:{port}"\n', "test")


# -- what a call looks like on the bus -------------------------------------------------------------------


def leg(conversation: str, call_id: str, role: str, **extra: Any) -> dict[str, Any]:
    return {
        "conversation_id": conversation,
        "call_id": call_id,
        "sip_call_id": f"{call_id}@{LOOPBACK}",
        "direction": "inbound" if role == "caller" else "outbound",
        "from_": "1001",
        "to": "1002",
        "role": role,
        "user_data": None,
        **extra,
    }


def call_events(conversation: str) -> list[Event]:
    """The documented sequence of a basic answered call (issue 4 "Tests")."""
    a, b = f"{conversation}-a", f"{conversation}-b"
    return [
        CallInitiated(**leg(conversation, a, "caller"), user="1001"),
        CallInitiated(**leg(conversation, b, "callee"), user="1002"),
        CallRinging(**leg(conversation, b, "callee")),
        CallAnswered(**leg(conversation, b, "callee"), answered_by="1002"),
        CallBridged(**leg(conversation, a, "caller"), peer_call_id=b),
        CallBridged(**leg(conversation, b, "callee"), peer_call_id=a),
        CallEnded(
            **leg(conversation, b, "callee"), final_status="completed", released_by="remote", talk_s=3.0
        ),
        CallEnded(
            **leg(conversation, a, "caller"), final_status="completed", released_by="local", talk_s=3.0
        ),
        ConversationEnded(conversation, (a, b), 4.0, "completed"),
        CdrCreated(conversation, {"byeType": 3, "cdrs": [{"call_id": a}, {"call_id": b}]}),
    ]


def register(user: str, port: int) -> DeviceRegistered:
    return DeviceRegistered(
        user, f"sip:{user}@{LOOPBACK}:{port}", "udp", 300, "baresip", f"{LOOPBACK}:{port}"
    )


def unregister(user: str, port: int) -> DeviceUnregistered:
    return DeviceUnregistered(user, f"sip:{user}@{LOOPBACK}:{port}", "udp", "unregistered")


def assert_valid_and_gap_free(events: list[dict[str, Any]]) -> None:
    """Every event matches its schema; per subject, seq runs 1, 2, 3, … in arrival order."""
    by_subject: dict[tuple[str, str], list[int]] = {}
    for envelope in events:
        VALIDATORS[envelope["type"]].validate(envelope)
        kind = "device" if envelope["type"].startswith("device.") else "conversation"
        by_subject.setdefault((kind, envelope["subject"]), []).append(envelope["seq"])
    for subject, numbers in by_subject.items():
        assert numbers == list(range(1, len(numbers) + 1)), subject


# -- the contract on the wire --------------------------------------------------------------------------


async def check_contract(port: int, sink: MqttSink, metrics: Metrics) -> None:
    bus = EventBus()
    bus.subscribe(sink)
    async with collecting(port) as collector:
        bus.publish(register("1001", 5070))
        bus.publish(register("1001", 5080))
        for event in call_events("CV1"):
            bus.publish(event)
        await collector.wait_for(12)
        await drained(sink)

        by_topic = {(m.topic, m.json()["type"] if m.payload else None) for m in collector.messages}
        expected_calls = [e.type for e in call_events("CV1")[:-1]]
        calls = [(m.topic, m.json()["type"]) for m in collector.messages if "/calls/" in m.topic]
        assert calls == [(f"{PREFIX}/default/calls/CV1/{t}", t) for t in expected_calls]
        assert (f"{PREFIX}/default/cdr/CV1", "cdr.created") in by_topic
        assert (f"{PREFIX}/default/devices/1001/device.registered", "device.registered") in by_topic
        assert all(m.qos == 1 for m in collector.messages)
        assert_valid_and_gap_free(collector.events())
        assert metrics.mqtt_connected._value.get() == 1
        assert metrics.mqtt_published.labels(type="call.bridged")._value.get() == 2
        assert metrics.outbox_queued._value.get() == 0

    # A subscriber arriving later gets the retained snapshot: both bindings.
    registration = f"{PREFIX}/default/devices/1001/registration"
    both = [f"sip:1001@{LOOPBACK}:5070", f"sip:1001@{LOOPBACK}:5080"]
    snapshot = await retained_eventually(port, registration, lambda r: r is not None and contacts(r) == both)
    assert snapshot is not None
    VALIDATORS["device.registration"].validate(snapshot.json())
    # The last binding gone: the snapshot is cleared, a new subscriber gets nothing retained.
    bus.publish(unregister("1001", 5070))
    bus.publish(unregister("1001", 5080))
    await drained(sink)
    assert await retained_eventually(port, registration, lambda r: r is None) is None


def contacts(snapshot: Received) -> list[str]:
    return [c["contact"] for c in snapshot.json()["contacts"]]


async def retained_eventually(port: int, topic: str, accept: Any) -> Received | None:
    """What a new subscriber to `topic` receives as retained, once `accept` takes it.

    A PUBACK means the broker has the message; amqtt updates its retained store a moment later, so a
    fresh subscriber is tried until the expected state shows (bounded by WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    attempt = 0
    while True:
        attempt += 1
        async with collecting(port, topic, f"late-{attempt}") as late:
            await asyncio.sleep(QUIET_S)
            retained = [m for m in late.messages if m.retain]
        latest = retained[-1] if retained and retained[-1].payload else None
        if accept(latest) or time.monotonic() > deadline:
            return latest


async def wait_until(predicate: Any, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_contract_on_mosquitto(mosquitto: Mosquitto, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'softswitch.db'}")
    metrics = Metrics()
    sink = MqttSink(mqtt_config(mosquitto.port), store, metrics, "node-1")
    await sink.start()
    try:
        await check_contract(mosquitto.port, sink, metrics)
    finally:
        await sink.stop()
        store.close()
    assert Outbox(Store(f"sqlite:///{tmp_path / 'softswitch.db'}"), "node-1").count() == 0


async def test_contract_on_the_embedded_broker(tmp_path: Path) -> None:
    broker = EmbeddedBroker(LOOPBACK, 0)
    await broker.start()
    store = Store(f"sqlite:///{tmp_path / 'softswitch.db'}")
    metrics = Metrics()
    config = parse_config('[mqtt]\nurl = "embedded"\n', "test")
    sink = MqttSink(config, store, metrics, "node-1")
    await sink.start((LOOPBACK, broker.port))  # the embedded broker's port is known once it listens
    try:
        await check_contract(broker.port, sink, metrics)
    finally:
        await sink.stop()
        store.close()
        await broker.stop()


# -- nothing lost ----------------------------------------------------------------------------------------


async def test_broker_outage_loses_nothing_and_keeps_order(mosquitto: Mosquitto, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'softswitch.db'}")
    metrics = Metrics()
    sink = MqttSink(mqtt_config(mosquitto.port), store, metrics, "node-1")
    await sink.start()
    conversations = [f"CV{n}" for n in range(20)]
    try:
        async with collecting(mosquitto.port) as collector:
            # Interleave 20 calls: 200 events; the broker dies halfway.
            stream = [
                e for batch in zip(*(call_events(c) for c in conversations), strict=True) for e in batch
            ]
            for event in stream[:100]:
                sink(event)
                await asyncio.sleep(0)
            await drained(sink)
            # Acknowledged is the broker's responsibility; Mosquitto 2.0.11 may drop what it still had
            # queued for a connected subscriber at shutdown, so the outage starts once those arrived.
            await collector.wait_for(100)
            mosquitto.stop()
            await wait_until(lambda: not sink.connected)
            for event in stream[100:]:
                sink(event)
            await asyncio.sleep(0.3)
            assert sink.queued == 100  # all of them durable in the outbox, none acknowledged
            assert metrics.mqtt_connected._value.get() == 0
            assert Outbox(store, "node-1").count() == 100
            mosquitto.start()
            await collector.wait_for(200)
            await drained(sink)
            events = collector.events()
            assert len(events) == 200
            assert_valid_and_gap_free(events)
            for conversation in conversations:
                types = [e["type"] for e in events if e["subject"] == conversation]
                assert types == [e.type for e in call_events(conversation)]
    finally:
        await sink.stop()
        store.close()


CRASHING_NODE = """
import asyncio, sys, time
from softswitch.config import parse_config
from softswitch.events.mqtt import MqttSink
from softswitch.metrics import Metrics
from softswitch.store.db import Store
from softswitch.store.outbox import Outbox
from tests.integration.test_mqtt_sink import call_events

async def main(url, port, count):
    store = Store(url)
    config = parse_config(f'[mqtt]\\nurl = "mqtt://127.0.0.1:{port}"\\n', "node")
    sink = MqttSink(config, store, Metrics(), "node-1")
    await sink.start()
    for n in range(count):
        for event in call_events(f"CV{n}"):
            sink(event)
    outbox = Outbox(store, "node-1")
    while outbox.count() < count * 10:
        await asyncio.sleep(0.01)
    print("written", flush=True)
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_crashed_sink_delivers_its_outbox_after_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'softswitch.db'}"
    broker = Mosquitto(tmp_path / "mosquitto", free_port(udp=False))
    calls = 30
    # A node whose broker is down queues 300 events, then dies without any shutdown (SIGKILL).
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_NODE, url, str(broker.port), str(calls)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert proc.stdout is not None
        stdout = proc.stdout

        def written() -> bool:
            # The node logs to stdout too: skip to its "written" line (or the end of its output).
            return any(line.strip() == b"written" for line in iter(stdout.readline, b""))

        assert await asyncio.wait_for(asyncio.to_thread(written), WAIT_S)
    finally:
        proc.kill()  # by its own PID
        proc.wait(timeout=10)

    broker.start()
    store = Store(url)
    sink = MqttSink(mqtt_config(broker.port), store, Metrics(), "node-1")
    try:
        async with collecting(broker.port) as collector:
            await sink.start()
            await collector.wait_for(calls * 10)
            await drained(sink)
            events = collector.events()
            assert_valid_and_gap_free(events)
            for n in range(calls):
                assert [e["type"] for e in events if e["subject"] == f"CV{n}"] == [
                    e.type for e in call_events(f"CV{n}")
                ]
            # Acknowledged rows are deleted in the writer's next batch.
            await wait_until(lambda: Outbox(store, "node-1").count() == 0)
    finally:
        await sink.stop()
        store.close()
        broker.stop()
