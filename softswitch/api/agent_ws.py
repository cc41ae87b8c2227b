"""The WebSocket agent API: `/ws/agent` — an agent's commands and its own events, live.

The protocol (JSON text frames):

1. The client's first frame, within 10 s: `{"type": "auth", "agent_id": "8001", "password": "…",
   "last_seq": 41}` (`last_seq` optional). Wrong credentials: `{"type": "auth", "ok": false, "code":
   "authentication_failed", …}` and close code 4401. Otherwise `{"type": "auth", "ok": true}`, then the
   agent's events published since `last_seq` (resume after a short disconnect; the node keeps the last
   256 per agent), then live events.
2. `{"type": "command", "command": "agent.set_state", "body": {…}, "request_id": "r1"}` runs the command
   as that agent (EVENTS.md; the same handler as MQTT and REST; `agent_id` defaults to the socket's
   agent) and is answered `{"type": "reply", "request_id": "r1", "ok", "code", "message", "data"}`.
3. Events: `{"type": "event", "event": <the CloudEvents envelope, as on MQTT>}` for the agent's own
   `agent.*` events (a supervisor also gets its team's).
4. Heartbeat: the node sends `{"type": "ping"}` every 20 s; the client may send `{"type": "ping"}` and
   gets `{"type": "pong"}`. A client silent for 60 s is closed (code 4408).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's signature at run time.
import asyncio
import contextlib
import hmac
import json
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from softswitch.config import Config
from softswitch.cti.commands import Actor
from softswitch.events.types import Event

log = structlog.get_logger(__name__)

Runner = Callable[[str, dict[str, Any], Actor], Awaitable[dict[str, Any]]]

AUTH_TIMEOUT_S: Final = 10.0
HEARTBEAT_S: Final = 20.0
IDLE_TIMEOUT_S: Final = 60.0
REPLAY_EVENTS: Final = 256  # per agent: what a client can catch up on after a short disconnect
MAX_FRAME_BYTES: Final = 64 * 1024
CLOSE_UNAUTHENTICATED: Final = 4401
CLOSE_IDLE: Final = 4408


class AgentEventHub:
    """The agents' recent envelopes and the sockets that follow them."""

    def __init__(self, config: Config) -> None:
        self.recent: dict[str, deque[dict[str, Any]]] = defaultdict(lambda: deque(maxlen=REPLAY_EVENTS))
        self.followers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        # A supervisor follows its team: agent id -> the supervisors who see its events too.
        self.supervisors: dict[str, set[str]] = defaultdict(set)
        for agent in config.agents:
            for member in agent.team:
                self.supervisors[member].add(agent.id)

    def on_envelope(self, event: Event, envelope: dict[str, Any]) -> None:
        if event.subject_kind != "agent":
            return
        agent_id = event.subject
        self.recent[agent_id].append(envelope)
        for watcher in (agent_id, *self.supervisors.get(agent_id, ())):
            for queue in self.followers.get(watcher, ()):
                queue.put_nowait(envelope)

    def missed(self, agent_id: str, last_seq: int) -> list[dict[str, Any]]:
        return [e for e in self.recent.get(agent_id, ()) if int(e.get("seq", 0)) > last_seq]


def add_agent_websocket(app: FastAPI, config: Config, hub: AgentEventHub, run: Runner) -> None:
    passwords = {a.id: a.password for a in config.agents}

    @app.websocket("/ws/agent")
    async def agent_socket(socket: WebSocket) -> None:
        await socket.accept()
        try:
            first = await asyncio.wait_for(socket.receive_text(), AUTH_TIMEOUT_S)
        except (TimeoutError, WebSocketDisconnect):
            with contextlib.suppress(Exception):
                await socket.close(CLOSE_UNAUTHENTICATED)
            return
        auth = _frame(first)
        agent_id = auth.get("agent_id") if auth.get("type") == "auth" else None
        password = auth.get("password")
        expected = passwords.get(agent_id) if isinstance(agent_id, str) else None
        if (
            expected is None
            or not isinstance(password, str)
            or not hmac.compare_digest(expected.encode(), password.encode())
        ):
            await socket.send_json(
                {"type": "auth", "ok": False, "code": "authentication_failed",
                 "message": "the first frame must be {type: auth, agent_id, password} of a configured agent"}
            )  # fmt: skip
            await socket.close(CLOSE_UNAUTHENTICATED)
            return
        assert isinstance(agent_id, str)
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        hub.followers[agent_id].add(inbox)
        log.info("agent WebSocket connected", agent_id=agent_id)
        try:
            await socket.send_json({"type": "auth", "ok": True, "agent_id": agent_id})
            last_seq = auth.get("last_seq")
            if isinstance(last_seq, int) and not isinstance(last_seq, bool):
                for envelope in hub.missed(agent_id, last_seq):
                    await socket.send_json({"type": "event", "event": envelope})
            await _serve(socket, agent_id, inbox, run)
        except WebSocketDisconnect:
            pass
        finally:
            hub.followers[agent_id].discard(inbox)
            log.info("agent WebSocket closed", agent_id=agent_id)


async def _serve(socket: WebSocket, agent_id: str, inbox: asyncio.Queue[dict[str, Any]], run: Runner) -> None:
    actor = Actor.agent(agent_id)
    loop = asyncio.get_running_loop()
    heard = loop.time()
    receiving: asyncio.Task[str] = asyncio.create_task(socket.receive_text())
    pushing: asyncio.Task[dict[str, Any]] = asyncio.create_task(inbox.get())
    try:
        while True:
            done, _ = await asyncio.wait(
                {receiving, pushing}, timeout=HEARTBEAT_S, return_when="FIRST_COMPLETED"
            )
            if pushing in done:
                await socket.send_json({"type": "event", "event": pushing.result()})
                pushing = asyncio.create_task(inbox.get())
            if receiving in done:
                text = receiving.result()  # raises WebSocketDisconnect when the client left
                heard = loop.time()
                answer = await _answer(_frame(text), actor, run)
                if answer is not None:
                    await socket.send_json(answer)
                receiving = asyncio.create_task(socket.receive_text())
            if not done:
                if loop.time() - heard > IDLE_TIMEOUT_S:
                    await socket.close(CLOSE_IDLE)
                    return
                await socket.send_json({"type": "ping"})
    finally:
        for task in (receiving, pushing):
            task.cancel()


async def _answer(frame: dict[str, Any], actor: Actor, run: Runner) -> dict[str, Any] | None:
    kind = frame.get("type")
    if kind == "ping":
        return {"type": "pong"}
    if kind == "pong":
        return None  # the answer to the node's own ping: being heard is all it is for
    if kind != "command" or not isinstance(frame.get("command"), str):
        expected = 'expected {"type": "command", "command": …, "body": {…}} or {"type": "ping"}'
        return {"type": "error", "ok": False, "code": "invalid_argument", "message": expected}
    body = frame.get("body") or {}
    if not isinstance(body, dict):
        problem = "body: expected a JSON object"
        return {
            "type": "reply", "request_id": frame.get("request_id"), "ok": False,
            "code": "invalid_argument", "message": problem, "data": {},
        }  # fmt: skip
    command = frame["command"]
    if "agent_id" not in body and "call_id" not in body and command != "call.monitor":
        body = {**body, "agent_id": actor.agent_id}  # the socket's own agent, unless the body names one
    reply = await run(command, body, actor)
    return {"type": "reply", **reply, "request_id": frame.get("request_id")}


def _frame(text: str) -> dict[str, Any]:
    if len(text) > MAX_FRAME_BYTES:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
