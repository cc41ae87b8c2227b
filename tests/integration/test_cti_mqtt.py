"""Agents driven purely over MQTT against a running softswitch, with real phones registering:

- on the embedded broker (MQTT 3.1.1: `reply_to` + `request_id` in the body): login, the agent going
  offline and back with its phone's registration, not_ready with a reason, get_state, logout, the
  retained agent snapshot, and the refusals (unknown agent, bad field, wrong password, a `call.*` command
  this node does not carry out yet, a reply topic inside the node's own tree);
- on Mosquitto with MQTT 5 (Response Topic + Correlation Data);
- across a restart: the agent is still logged in, reconciled with its phone's registration.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.conftest import DEMO_PASSWORDS
from tests.integration.helpers import RunningSoftswitch, running_softswitch
from tests.integration.peers import Sipp, free_port
from tests.integration.test_mqtt_sink import (
    Mosquitto,
    assert_valid_and_gap_free,
    collecting,
    mosquitto,
    retained_eventually,
)

pytestmark = pytest.mark.integration

__all__ = ["mosquitto"]  # the fixture, re-used

PREFIX = "softswitch/v1/default"
AGENT, PASSWORD, PHONE = "8001", "demo8001", "1001"  # the demo agent and its extension
REPLY_TIMEOUT_S = 10.0
SIPP_TIMEOUT_S = 30.0
QUIET_S = 1.0  # how long a refused reply topic is watched for a message that must not come


class Commander:
    """A backend on MQTT: publishes commands, collects replies on its own reply topic."""

    def __init__(self, client: aiomqtt.Client, v5: bool) -> None:
        self.client = client
        self.v5 = v5
        self.reply_topic = f"app/{uuid.uuid4().hex[:8]}/replies"
        self.replies: dict[str, dict[str, Any]] = {}
        self.correlations: dict[str, bytes] = {}

    async def run(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            reply = json.loads(payload)
            key = reply.get("request_id")
            if self.v5 and message.properties is not None:
                correlation = getattr(message.properties, "CorrelationData", None)
                if correlation is not None:
                    key = correlation.decode()
                    self.correlations[key] = correlation
            self.replies[str(key)] = reply

    async def send(self, command: str, body: dict[str, Any], *, reply_to: str | None = None) -> str:
        request_id = uuid.uuid4().hex
        properties = None
        if self.v5 and reply_to is None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ResponseTopic = self.reply_topic
            properties.CorrelationData = request_id.encode()
        else:
            body = {**body, "reply_to": reply_to or self.reply_topic, "request_id": request_id}
        await self.client.publish(
            f"{PREFIX}/commands/{command}", json.dumps(body), qos=1, properties=properties
        )
        return request_id

    async def call(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        request_id = await self.send(command, body)
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while request_id not in self.replies:
            assert time.monotonic() < deadline, f"no reply to {command} {body}"
            await asyncio.sleep(0.02)
        return self.replies.pop(request_id)


@asynccontextmanager
async def commander(port: int, *, v5: bool) -> AsyncIterator[Commander]:
    protocol = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client("127.0.0.1", port, protocol=protocol, timeout=5) as client:
        c = Commander(client, v5)
        await client.subscribe(f"{c.reply_topic}/#" if not v5 else c.reply_topic, qos=1)
        await client.subscribe(f"{PREFIX}/replies/#", qos=1)
        task = asyncio.create_task(c.run())
        try:
            yield c
        finally:
            task.cancel()


def _register(sipp: Sipp, node: RunningSoftswitch, expires: int, port: int) -> None:
    """REGISTER the agent's phone from `port` (its contact); expires 0: `Contact: *`, every binding
    removed (RFC 3261 §10.2.2)."""
    result = sipp.run(
        "register_digest" if expires else "unregister_star", node.sip_port, local_port=port,
        users=[(PHONE, DEMO_PASSWORDS[PHONE])], sets={"expires": str(expires or 300)},
        timeout_s=SIPP_TIMEOUT_S,
    )  # fmt: skip
    assert result.ok, result.describe()


def _states(events: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [
        (e["data"]["state"], e["data"]["reason"])
        for e in events
        if e["type"] == "agent.state_changed" and e["data"]["agent_id"] == AGENT
    ]


async def _wait_state(collector: Any, state: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while True:
        events = collector.events()
        if _states(events) and _states(events)[-1][0] == state:
            return list(events)
        assert time.monotonic() < deadline, _states(events)
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_an_agent_over_mqtt_on_the_embedded_broker(tmp_path: Path, sipp: Sipp) -> None:
    phone = free_port()
    with running_softswitch(tmp_path / "node") as node:
        assert node.mqtt_port is not None
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/agents/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            # Logged in while its phone is not registered: offline, never offered a call.
            reply = await app.call("agent.login", {"agent_id": AGENT, "password": PASSWORD})
            assert reply["ok"] and reply["code"] == "ok", reply
            await _wait_state(collector, "offline")
            # The phone registers: the agent is ready (the login's initial state).
            await asyncio.to_thread(_register, sipp, node, 300, phone)
            await _wait_state(collector, "ready")

            reply = await app.call(
                "agent.set_state", {"agent_id": AGENT, "state": "not_ready", "reason": "lunch"}
            )
            assert reply["ok"], reply
            await _wait_state(collector, "not_ready")
            state = await app.call("agent.get_state", {"agent_id": AGENT})
            assert state["ok"] and state["data"]["state"] == "not_ready", state
            assert state["data"]["reason"] == "lunch", state
            snapshot = await retained_eventually(
                node.mqtt_port, f"{PREFIX}/agents/{AGENT}/state", lambda m: m is not None
            )
            assert snapshot is not None and snapshot.retain
            assert snapshot.json()["data"]["state"] == "not_ready", snapshot.json()

            # The phone unregisters: offline; it comes back: not_ready with its reason, as before.
            await asyncio.to_thread(_register, sipp, node, 0, phone)
            await _wait_state(collector, "offline")
            await asyncio.to_thread(_register, sipp, node, 300, phone)
            events = await _wait_state(collector, "not_ready")
            assert _states(events)[-1] == ("not_ready", "lunch")

            # Refusals, each with its stable code and a message naming what is wrong.
            unknown = await app.call("agent.get_state", {"agent_id": "9999"})
            assert (unknown["ok"], unknown["code"]) == (False, "unknown_agent"), unknown
            bad = await app.call("agent.set_state", {"agent_id": AGENT, "state": "ready", "colour": "red"})
            assert (bad["ok"], bad["code"]) == (False, "invalid_argument") and "colour" in bad["message"], bad
            wrong = await app.call("agent.login", {"agent_id": "8002", "password": "nope"})
            assert (wrong["ok"], wrong["code"]) == (False, "authentication_failed"), wrong
            hangup = await app.call("call.hangup", {"agent_id": AGENT})
            assert not hangup["ok"] and hangup["code"] in ("no_active_call", "not_supported"), hangup
            nothing = await app.call("agent.fly", {})
            assert (nothing["ok"], nothing["code"]) == (False, "unknown_command"), nothing
            # A reply topic inside the node's own tree is refused: nothing is published there.
            spoof = await app.send("agent.get_state", {"agent_id": AGENT}, reply_to=f"{PREFIX}/agents/x/y")
            await asyncio.sleep(QUIET_S)
            assert spoof not in app.replies
            allowed = await app.send("agent.get_state", {"agent_id": AGENT}, reply_to=f"{PREFIX}/replies/a")
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while allowed not in app.replies:
                assert time.monotonic() < deadline, "no reply under the replies tree"
                await asyncio.sleep(0.02)

            reply = await app.call("agent.logout", {"agent_id": AGENT})
            assert reply["ok"], reply
            events = await _wait_state(collector, "logged_out")

    assert_valid_and_gap_free(events)
    types = [e["type"] for e in events if e["data"].get("agent_id") == AGENT]
    assert types[0] == "agent.logged_in" and "agent.logged_out" in types, types


@pytest.mark.timeout(120)
async def test_mqtt5_replies_carry_the_correlation_data_and_state_survives_a_restart(
    tmp_path: Path, sipp: Sipp, mosquitto: Mosquitto
) -> None:
    extra = f'[mqtt]\nurl = "mqtt://127.0.0.1:{mosquitto.port}"\n'
    with running_softswitch(tmp_path / "node", extra) as node:
        await asyncio.to_thread(_register, sipp, node, 300, free_port())
        async with commander(mosquitto.port, v5=True) as app:
            request_id = await app.send("agent.login", {"agent_id": AGENT, "password": PASSWORD})
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while request_id not in app.replies:
                assert time.monotonic() < deadline, "no MQTT 5 reply"
                await asyncio.sleep(0.02)
            assert app.replies[request_id]["ok"], app.replies[request_id]
            assert app.correlations[request_id] == request_id.encode()
            state = await app.call("agent.get_state", {"agent_id": AGENT})
            assert state["data"]["state"] == "ready", state
            await asyncio.sleep(0.5)  # the state is saved within SAVE_DELAY_S

    with running_softswitch(tmp_path / "node", extra):
        async with commander(mosquitto.port, v5=True) as app:
            state = await app.call("agent.get_state", {"agent_id": AGENT})
    # Still logged in after the restart, and ready: its phone's binding was restored with the node.
    assert state["ok"] and state["data"]["state"] == "ready", state
