"""Commands over MQTT (EVENTS.md "Commands"): one subscription, one handler, replies where asked.

A backend publishes a JSON body to ``{prefix}/{tenant}/commands/{command}`` (QoS 1). The reply —
``{"ok", "code", "message", "data", "request_id"}`` — goes to:

- the MQTT 5 Response Topic of the request, with its Correlation Data (MQTT 5.0 §4.10), or
- the ``reply_to`` topic of the body (MQTT 3.1.1 clients), with the body's ``request_id`` echoed.

``reply_to`` and ``request_id`` are transport fields: they are taken out of the body before the handler
sees it. A request without either gets no reply (its outcome still shows in the events). Reply topics
are checked: no wildcards, and never inside the node's own topic tree except under
``{prefix}/{tenant}/replies/`` — a command cannot make the node publish on an event or command topic.

The server keeps its own connection (client id ``softswitch-<node>-commands``), MQTT 5 with brokers that
speak it, 3.1.1 otherwise (the embedded broker), and reconnects with backoff. Each command runs in its
own task, so a slow one does not hold the others; commands of one client keep their order only as far as
the handler's own locking does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import unquote

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from softswitch.config import Config

log = structlog.get_logger(__name__)

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

#: Largest command body accepted (a command is a few hundred bytes).
MAX_BODY_BYTES: Final = 64 * 1024
#: Longest command name (the last topic level).
MAX_COMMAND_LENGTH: Final = 64
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 5.0
KEEPALIVE_S: Final = 30
#: A handler slower than this is answered `internal` (the command may still complete).
HANDLER_TIMEOUT_S: Final = 10.0
#: Transport fields of a command body (MQTT 3.1.1 request/reply), removed before the handler sees it.
TRANSPORT_FIELDS: Final = ("reply_to", "request_id")


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message, "data": {}}


class MqttCommandServer:
    """Subscribes to the node's command topics and answers each command through ``handler``."""

    def __init__(
        self,
        config: Config,
        handler: Handler,
        node: str,
        *,
        broker_address: tuple[str, int] | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.node = node
        mqtt = config.mqtt
        self.host, self.port = broker_address or (mqtt.host, mqtt.port)
        self.prefix = f"{mqtt.prefix}/{config.tenant}"
        self.topic = f"{self.prefix}/commands/+"
        self.protocol = aiomqtt.ProtocolVersion.V311 if mqtt.embedded else aiomqtt.ProtocolVersion.V5
        self.handled = 0
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mqtt-commands")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._inflight):
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)

    # -- connection -------------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        mqtt = self.config.mqtt
        return aiomqtt.Client(
            self.host,
            self.port,
            username=unquote(mqtt.username) if mqtt.username is not None else None,
            password=unquote(mqtt.password) if mqtt.password is not None else None,
            identifier=f"softswitch-{self.node}-commands",
            protocol=self.protocol,
            keepalive=KEEPALIVE_S,
            timeout=CONNECT_TIMEOUT_S,
            tls_context=ssl.create_default_context() if mqtt.tls else None,
        )

    async def _run(self) -> None:
        backoff = RECONNECT_MIN_S
        reported = False
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    log.info("MQTT commands subscribed", topic=self.topic, protocol=self.protocol.name)
                    backoff, reported = RECONNECT_MIN_S, False
                    async for message in client.messages:
                        task = asyncio.create_task(self._handle(client, message))
                        self._inflight.add(task)
                        task.add_done_callback(self._inflight.discard)
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                if self.protocol is aiomqtt.ProtocolVersion.V5 and "protocol" in str(exc).lower():
                    log.info("broker refused MQTT 5: commands use MQTT 3.1.1", error=str(exc))
                    self.protocol = aiomqtt.ProtocolVersion.V311
                    continue
                if not reported:
                    log.warning("MQTT commands: broker unavailable", error=str(exc))
                    reported = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    # -- one command ------------------------------------------------------------------------------

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        command = topic.rsplit("/", 1)[-1]
        properties = message.properties
        response_topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
        correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
        body, problem = _decode(message.payload)
        reply_to = response_topic or (body.get("reply_to") if isinstance(body.get("reply_to"), str) else None)
        request_id = body.get("request_id")
        with structlog.contextvars.bound_contextvars(command=command, request_id=request_id):
            if problem:
                reply = error_reply("invalid_argument", problem)
            elif len(command) > MAX_COMMAND_LENGTH:
                reply = error_reply("unknown_command", "command name too long")
            else:
                fields = {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS}
                try:
                    reply = await asyncio.wait_for(self.handler(command, fields), HANDLER_TIMEOUT_S)
                except TimeoutError:
                    reply = error_reply("internal", f"no outcome within {HANDLER_TIMEOUT_S:g} s")
                except Exception:
                    log.exception("command handler failed")
                    reply = error_reply("internal", "the command failed inside the softswitch")
            self.handled += 1
            if reply_to is None:
                log.info("command without a reply destination", ok=reply.get("ok"), code=reply.get("code"))
                return
            refusal = self.reply_topic_problem(reply_to)
            if refusal:
                log.warning("command reply topic refused", reply_to=reply_to, reason=refusal)
                return
            reply = {**reply, "request_id": request_id if isinstance(request_id, str | int) else None}
            out: Properties | None = None
            if response_topic is not None and correlation is not None:
                out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                out.CorrelationData = correlation
            try:
                await client.publish(
                    reply_to, json.dumps(reply, separators=(",", ":")), qos=1, properties=out
                )
            except aiomqtt.MqttError as exc:
                log.warning("command reply not sent", reply_to=reply_to, error=str(exc))

    def reply_topic_problem(self, topic: str) -> str:
        """Why the node must not publish a reply on ``topic`` ("" when it may)."""
        if not topic or len(topic) > 1024 or any(c in topic for c in "+#\0"):
            return "not a topic name (empty, too long, or with wildcards)"
        own = self.config.mqtt.prefix + "/"
        if topic.startswith(own) and not topic.startswith(f"{self.prefix}/replies/"):
            return f"inside {own}: replies may only go under {self.prefix}/replies/"
        return ""


def _decode(payload: Any) -> tuple[dict[str, Any], str]:
    """The JSON object of a command body, or ({}, why not)."""
    if not isinstance(payload, bytes | bytearray):
        return {}, "the body must be a JSON object"
    if len(payload) > MAX_BODY_BYTES:
        return {}, f"the body is larger than {MAX_BODY_BYTES} bytes"
    try:
        body = json.loads(payload) if payload else {}
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, f"the body is not JSON: {exc}"
    if not isinstance(body, dict):
        return {}, "the body must be a JSON object"
    return body, ""
