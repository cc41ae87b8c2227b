"""The durable outbox: order, bound, batching and restart, on an SQLite file on disk.

The MQTT sink runs here with no broker listening (its connection attempts to a closed loopback port
fail): everything it accepts must end up in the outbox, in order, and survive a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from softswitch.config import Config, parse_config
from softswitch.events.mqtt import MqttSink
from softswitch.events.types import (
    CallAnswered,
    CallRinging,
    CdrCreated,
    ConversationEnded,
    DeviceRegistered,
    DeviceUnregistered,
)
from softswitch.metrics import Metrics
from softswitch.store.db import Store
from softswitch.store.outbox import Outbox, OutboxMessage, SubjectState
from tests.integration.peers import free_port

pytestmark = pytest.mark.timeout(60)


def leg(conversation: str = "CV1", **extra: Any) -> dict[str, Any]:
    return {
        "conversation_id": conversation,
        "call_id": "CA1",
        "sip_call_id": "x@127.0.0.1",
        "direction": "inbound",
        "from_": "1001",
        "to": "1002",
        "role": "caller",
        "user_data": None,
        **extra,
    }


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'softswitch.db'}"


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url)
    yield store
    store.close()


@pytest.fixture
def config() -> Config:
    # Nothing listens on this loopback port: the sink keeps retrying while events queue.
    return parse_config(f'[mqtt]\nurl = "mqtt://127.0.0.1:{free_port(udp=False)}"\n', "test")


def message(n: int, key: str = "device:1001") -> OutboxMessage:
    return OutboxMessage(key, "device.registered", f"t/{n}", json.dumps({"n": n}), False, float(n))


# -- the table --------------------------------------------------------------------------------------


def test_outbox_keeps_order_and_deletes_acknowledged(store: Store) -> None:
    outbox = Outbox(store, "node-1")
    first = outbox.apply([message(n) for n in range(3)], [], [], [])
    second = outbox.apply([message(n) for n in range(3, 6)], [first[1]], [], [])
    assert first == sorted(first) and second == sorted(second) and first[-1] < second[0]
    pending = outbox.load_pending()
    assert [json.loads(m.payload)["n"] for _, m in pending] == [0, 2, 3, 4, 5]
    assert [i for i, _ in pending] == sorted(i for i, _ in pending)
    assert outbox.count() == 5


def test_nodes_sharing_a_store_keep_separate_outboxes(store: Store) -> None:
    a, b = Outbox(store, "node-a"), Outbox(store, "node-b")
    a.apply([message(1)], [], [SubjectState("device:1001", 7, None, None)], [])
    b.apply([message(2)], [], [SubjectState("device:1001", 3, None, None)], [])
    assert [m.topic for _, m in a.load_pending()] == ["t/1"]
    assert [(s.subject_key, s.seq) for s in b.load_subjects()] == [("device:1001", 3)]


def test_subject_counters_upsert_and_drop(store: Store) -> None:
    outbox = Outbox(store, "node-1")
    outbox.apply([], [], [SubjectState("conversation:CV1", 1, None, None)], [])
    outbox.apply([], [], [SubjectState("conversation:CV1", 5, None, 10.0)], [])
    assert outbox.load_subjects() == [SubjectState("conversation:CV1", 5, None, 10.0)]
    outbox.apply([], [], [], ["conversation:CV1"])
    assert outbox.load_subjects() == []


# -- the sink with its broker down -----------------------------------------------------------------


def pending_envelopes(store: Store, node: str = "node-1") -> list[dict[str, Any]]:
    """The CloudEvents in the outbox, oldest first (registration snapshots left out)."""
    pending = Outbox(store, node).load_pending()
    return [json.loads(m.payload) for _, m in pending if not m.topic.endswith("/registration")]


async def test_bound_drops_new_events_and_leaves_a_gap(config: Config, store: Store) -> None:
    metrics = Metrics()
    sink = MqttSink(config, store, metrics, "node-1", outbox_limit=5)
    await sink.start()
    with structlog.testing.capture_logs() as logs:
        for _ in range(8):
            sink(CallRinging(**leg()))
    await sink.stop()
    assert [e["seq"] for e in pending_envelopes(store)] == [1, 2, 3, 4, 5]
    assert metrics.outbox_dropped.labels(type="call.ringing")._value.get() == 3
    assert metrics.outbox_queued._value.get() == 5
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
        "event outbox full: dropping new events until the broker catches up"
    ]
    # A restart continues the sequence after the dropped ones: consumers see the gap 6..8.
    restarted = MqttSink(config, store, Metrics(), "node-1", outbox_limit=10)
    await restarted.start()
    restarted(CallAnswered(**leg()))
    await restarted.stop()
    assert [e["seq"] for e in pending_envelopes(store)] == [1, 2, 3, 4, 5, 9]


async def test_events_are_written_in_batches_off_the_call_path(config: Config, store: Store) -> None:
    statements: list[str] = []
    commits: list[int] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    sa.event.listen(store.engine, "commit", lambda *a: commits.append(1))
    sink = MqttSink(config, store, Metrics(), "node-1")
    await sink.start()
    statements.clear()
    for n in range(2000):
        sink(CallRinging(**leg(f"CV{n % 10}")))
    assert statements == []  # the bus call never touches the store
    await sink.stop()
    assert len(commits) <= 5
    envelopes = pending_envelopes(store)
    assert len(envelopes) == 2000
    for conversation in (f"CV{n}" for n in range(10)):
        assert [e["seq"] for e in envelopes if e["subject"] == conversation] == list(range(1, 201))


async def test_restart_restores_counters_and_registration_state(config: Config, store: Store) -> None:
    sink = MqttSink(config, store, Metrics(), "node-1")
    await sink.start()
    sink(DeviceRegistered("1001", "sip:1001@127.0.0.1:5070", "udp", 300, "ua-a", "127.0.0.1:5070"))
    sink(DeviceRegistered("1001", "sip:1001@127.0.0.1:5080", "tcp", 300, "ua-b", "127.0.0.1:5080"))
    sink(CallRinging(**leg("CV1")))
    await sink.stop()

    restarted = MqttSink(config, store, Metrics(), "node-1")
    await restarted.start()
    restarted(DeviceUnregistered("1001", "sip:1001@127.0.0.1:5070", "udp", "unregistered"))
    restarted(CallAnswered(**leg("CV1")))
    await restarted.stop()
    pending = Outbox(store, "node-1").load_pending()
    snapshots = [m for _, m in pending if m.topic.endswith("/devices/1001/registration")]
    assert all(m.retain for m in snapshots)
    last = json.loads(snapshots[-1].payload)
    assert [c["contact"] for c in last["contacts"]] == ["sip:1001@127.0.0.1:5080"]
    assert last["seq"] == 3
    envelopes = pending_envelopes(store)
    assert [e["seq"] for e in envelopes if e["subject"] == "CV1"] == [1, 2]

    third = MqttSink(config, store, Metrics(), "node-1")
    await third.start()
    third(DeviceUnregistered("1001", "sip:1001@127.0.0.1:5080", "tcp", "expired"))
    await third.stop()
    final = [m for _, m in Outbox(store, "node-1").load_pending() if m.topic.endswith("/registration")][-1]
    assert final.payload == "" and final.retain  # no binding left: the retained snapshot is cleared


async def test_conversation_counter_ends_with_its_cdr(config: Config, store: Store) -> None:
    sink = MqttSink(config, store, Metrics(), "node-1")
    await sink.start()
    sink(CallRinging(**leg("CV9")))
    sink(ConversationEnded("CV9", ("CA1",), 1.0, "completed"))
    await sink.stop()
    subjects = {s.subject_key: s for s in Outbox(store, "node-1").load_subjects()}
    assert subjects["conversation:CV9"].seq == 2
    assert subjects["conversation:CV9"].ended_at is not None

    # Crash recovery closes the record after a restart: its cdr.created continues the sequence.
    restarted = MqttSink(config, store, Metrics(), "node-1")
    await restarted.start()
    restarted(CdrCreated("CV9", {"byeType": 0}))
    await restarted.stop()
    assert [e["seq"] for e in pending_envelopes(store) if e["subject"] == "CV9"] == [1, 2, 3]
    assert "conversation:CV9" not in {s.subject_key for s in Outbox(store, "node-1").load_subjects()}


async def test_a_failing_sink_never_raises_into_the_bus(config: Config, store: Store) -> None:
    sink = MqttSink(config, store, Metrics(), "node-1")

    class Broken(CallRinging):
        subject_kind = "nothing-we-know"

    with structlog.testing.capture_logs() as logs:
        sink(Broken(**leg()))
    assert any(entry["event"] == "MQTT sink could not queue an event" for entry in logs)
