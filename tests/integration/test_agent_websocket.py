"""The WebSocket agent API against a running softswitch: authentication, commands as the agent, its own
events pushed live (the same envelopes as on MQTT), heartbeat, and resume after a disconnect."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.integration.conftest import DEMO_PASSWORDS
from tests.integration.helpers import running_softswitch
from tests.integration.peers import Sipp, free_port
from tests.integration.test_cti_rest import request

pytestmark = pytest.mark.integration

FRAME_TIMEOUT_S = 10.0


async def frames_until(ws: ClientConnection, done: Any) -> list[dict[str, Any]]:
    """Frames received until `done(frame)`; the last one included."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + FRAME_TIMEOUT_S
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, seen
        frame = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        seen.append(frame)
        if done(frame):
            return seen


def state_of(frame: dict[str, Any]) -> str | None:
    if frame.get("type") == "event" and frame["event"]["type"] == "agent.state_changed":
        state: str = frame["event"]["data"]["state"]
        return state
    return None


@pytest.mark.timeout(90)
async def test_an_agent_on_the_websocket(tmp_path: Path, sipp: Sipp) -> None:
    with running_softswitch(tmp_path / "node") as node:
        registered = await asyncio.to_thread(
            sipp.run, "register_digest", node.sip_port, local_port=free_port(),
            users=[("1001", DEMO_PASSWORDS["1001"])], sets={"expires": "300"}, timeout_s=30,
        )  # fmt: skip
        assert registered.ok, registered.describe()
        url = f"ws://127.0.0.1:{node.http_port}/ws/agent"

        async with connect(url) as ws:  # wrong password: refused and closed
            await ws.send(json.dumps({"type": "auth", "agent_id": "8001", "password": "nope"}))
            refused = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S))
            assert (refused["ok"], refused["code"]) == (False, "authentication_failed"), refused
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401

        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "agent_id": "8001", "password": "demo8001"}))
            welcome = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S))
            assert welcome == {"type": "auth", "ok": True, "agent_id": "8001"}, welcome
            await ws.send(
                json.dumps({"type": "command", "command": "agent.login", "body": {}, "request_id": "a"})
            )
            frames = await frames_until(ws, lambda f: state_of(f) == "ready")
            if not any(f["type"] == "reply" for f in frames):  # the reply may follow the events it caused
                frames += await frames_until(ws, lambda f: f["type"] == "reply")
            replies = [f for f in frames if f["type"] == "reply"]
            assert replies[0]["ok"] and replies[0]["request_id"] == "a", replies
            events = [f["event"] for f in frames if f["type"] == "event"]
            assert events[0]["type"] == "agent.logged_in" and events[0]["source"].startswith("softswitch://")
            last_seq = max(e["seq"] for e in events)

            # Acting on another agent is refused; a bad frame gets an error, a ping its pong.
            body = {"agent_id": "8002", "state": "ready"}
            await ws.send(json.dumps({"type": "command", "command": "agent.set_state", "body": body}))
            denied = (await frames_until(ws, lambda f: f["type"] == "reply" and f["request_id"] is None))[-1]
            assert (denied["ok"], denied["code"]) == (False, "not_permitted"), denied
            await ws.send("not json")
            error = (await frames_until(ws, lambda f: f["type"] == "error"))[-1]
            assert (error["type"], error["code"]) == ("error", "invalid_argument"), error
            await ws.send(json.dumps({"type": "ping"}))
            pong = (await frames_until(ws, lambda f: f["type"] == "pong"))[-1]
            assert pong == {"type": "pong"}

        # Disconnected: a service changes the agent's state meanwhile.
        status, reply, _ = request(
            node, "POST", "/v1/agents/8001/set_state", {"state": "not_ready", "reason": "break"}
        )
        assert status == 200, reply

        async with connect(url) as ws:  # back, resuming after the last event it saw
            auth = {"type": "auth", "agent_id": "8001", "password": "demo8001", "last_seq": last_seq}
            await ws.send(json.dumps(auth))
            frames = await frames_until(ws, lambda f: state_of(f) == "not_ready")
            missed = [f["event"] for f in frames if f["type"] == "event"]
            assert all(e["seq"] > last_seq for e in missed), missed
            assert [e["seq"] for e in missed] == list(range(last_seq + 1, last_seq + 1 + len(missed)))
