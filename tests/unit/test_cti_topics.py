"""Agent and queue events on the MQTT topics of EVENTS.md, and their retained snapshots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from softswitch.config import Config, parse_config
from softswitch.events.mqtt import (
    MqttSink,
    agent_state_topic,
    event_topic,
    queue_stats_topic,
    snapshot_topic,
)
from softswitch.events.types import (
    AgentLoggedIn,
    AgentOffered,
    AgentStateChanged,
    AgentStats,
    CallDequeued,
    CallQueued,
    QueueStats,
)
from softswitch.metrics import Metrics
from softswitch.store.db import Store
from softswitch.store.outbox import Outbox
from tests.integration.peers import free_port

pytestmark = pytest.mark.timeout(60)

P, T = "softswitch/v1", "default"
LEG = {
    "conversation_id": "CV1",
    "call_id": "CA1",
    "sip_call_id": "x@127.0.0.1",
    "direction": "inbound",
    "from_": "+8613800000000",
    "to": "8000",
    "role": "caller",
    "user_data": None,
}


def state_changed(agent_id: str = "8001", state: str = "ready") -> AgentStateChanged:
    return AgentStateChanged(
        agent_id, state, "logged_out", None, "2026-11-22T10:15:03.482Z", None, ("support",)
    )


def test_agent_events_land_under_agents() -> None:
    assert event_topic(P, T, state_changed()) == "softswitch/v1/default/agents/8001/agent.state_changed"
    login = AgentLoggedIn("8001", {"kind": "sip", "address": "1001"}, None)
    assert event_topic(P, T, login) == "softswitch/v1/default/agents/8001/agent.logged_in"
    offered = AgentOffered("8001", "CV1", "support")
    assert event_topic(P, T, offered) == "softswitch/v1/default/agents/8001/agent.offered"
    assert event_topic(P, T, AgentStats("8001", 1, 1, 2.0)) == "softswitch/v1/default/agents/8001/agent.stats"


def test_queue_events_land_under_queues_and_call_queue_events_under_calls() -> None:
    stats = QueueStats("support", 1, 2.0, 1, 0, 0, 0, None)
    assert event_topic(P, T, stats) == "softswitch/v1/default/queues/support/queue.stats"
    queued = CallQueued(**LEG, queue_id="support", position=1)
    assert event_topic(P, T, queued) == "softswitch/v1/default/calls/CV1/call.queued"
    dequeued = CallDequeued(**LEG, queue_id="support", position=1, reason="answered")
    assert event_topic(P, T, dequeued) == "softswitch/v1/default/calls/CV1/call.dequeued"


def test_snapshot_topics() -> None:
    assert agent_state_topic(P, T, "8001") == "softswitch/v1/default/agents/8001/state"
    assert queue_stats_topic(P, T, "support") == "softswitch/v1/default/queues/support/stats"
    assert snapshot_topic(P, T, state_changed()) == "softswitch/v1/default/agents/8001/state"
    stats = QueueStats("support", 0, 0.0, 0, 0, 0, 0, None)
    assert snapshot_topic(P, T, stats) == "softswitch/v1/default/queues/support/stats"
    assert snapshot_topic(P, T, AgentOffered("8001", "CV1", "support")) is None
    assert snapshot_topic(P, T, CallQueued(**LEG)) is None
    # An id with topic separators stays inside its level.
    assert agent_state_topic(P, T, "a/b") == "softswitch/v1/default/agents/a%2Fb/state"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'softswitch.db'}")
    yield store
    store.close()


@pytest.fixture
def config() -> Config:
    # Nothing listens on this loopback port: messages stay in the outbox where the test reads them.
    return parse_config(f'[mqtt]\nurl = "mqtt://127.0.0.1:{free_port(udp=False)}"\n', "test")


async def test_sink_retains_agent_state_and_queue_stats(config: Config, store: Store) -> None:
    sink = MqttSink(config, store, Metrics(), "node-1")
    await sink.start()
    sink(state_changed())
    sink(AgentOffered("8001", "CV1", "support"))
    sink(QueueStats("support", 1, 3.5, 0, 1, 0, 0, None))
    await sink.stop()
    pending = [m for _, m in Outbox(store, "node-1").load_pending()]
    assert [(m.topic, m.retain) for m in pending] == [
        ("softswitch/v1/default/agents/8001/agent.state_changed", False),
        ("softswitch/v1/default/agents/8001/state", True),
        ("softswitch/v1/default/agents/8001/agent.offered", False),
        ("softswitch/v1/default/queues/support/queue.stats", False),
        ("softswitch/v1/default/queues/support/stats", True),
    ]
    # The retained snapshot is the event's own envelope (same id and seq).
    assert pending[0].payload == pending[1].payload
    envelope = json.loads(pending[1].payload)
    assert (envelope["type"], envelope["subject"], envelope["seq"]) == ("agent.state_changed", "8001", 1)
    assert json.loads(pending[2].payload)["seq"] == 2
    assert json.loads(pending[4].payload)["data"]["waiting"] == 1
