"""The composition root (STYLE.md 9): builds every component of a node, wires them, starts and stops them.

Nothing else lives here: no protocol logic, no policy. Start order is store, SIP edge, MQTT broker, HTTP;
stop order is the reverse. Once everything listens, the chosen ports go to `{data_dir}/ports.json`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import structlog
from fastapi import FastAPI

from softswitch import __version__
from softswitch.api.agent_ws import AgentEventHub, add_agent_websocket
from softswitch.api.cti_rest import add_cti_routes
from softswitch.api.http import HttpServer, build_http_app
from softswitch.api.mqtt_commands import MqttCommandServer
from softswitch.calls.cdr import CdrBuilder, recover_open_cdrs
from softswitch.calls.control import CallControl
from softswitch.config import Config
from softswitch.cti.core import CtiCore
from softswitch.cti.runtime import CtiRuntime
from softswitch.dialplan.configured import load_configured_dialplan, prompt_set
from softswitch.events.broker import EmbeddedBroker
from softswitch.events.bus import EventBus
from softswitch.events.mqtt import MqttSink
from softswitch.media.pool import MediaPool
from softswitch.metrics import Metrics
from softswitch.sip.transport import SipEdge
from softswitch.store.agents import CtiStateStore
from softswitch.store.db import Store

log = structlog.get_logger(__name__)

#: Name of the file, under data_dir, that tells tools which ports this node listens on.
PORTS_FILE = "ports.json"


@dataclass(frozen=True, slots=True)
class Ports:
    """The ports a running node listens on; `mqtt` is None with an external broker."""

    sip: int
    http: int
    mqtt: int | None


class Node:
    """One softswitch node: every component the composition root built, and their lifecycle.

    `http_app` exists from construction, so features can add routers before `start()`.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.bus = EventBus()
        self.store: Store | None = None
        self.edge: SipEdge | None = None
        self.media: MediaPool | None = None
        self.mqtt: MqttSink | None = None
        self.calls: CallControl | None = None
        self.cti: CtiRuntime | None = None
        self.broker: EmbeddedBroker | None = None
        self.http_app: FastAPI = build_http_app(
            version=__version__, metrics=self.metrics, sip_port=lambda: self.edge.port if self.edge else None
        )
        self.http: HttpServer | None = None
        self.ports: Ports | None = None
        self._stack = AsyncExitStack()

    async def start(self) -> Ports:
        """Start everything; on failure, stop what had started and re-raise."""
        config = self.config
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            ports_file = config.data_dir / PORTS_FILE
            ports_file.unlink(missing_ok=True)  # a stale file would point tools at a dead node

            store = Store(config.store.url)
            self.store = store
            self._stack.callback(store.close)

            dialplan = load_configured_dialplan(config)

            # Event sinks first, so that everything the node does from now on is recorded and published;
            # stopped last (after call control released its calls), in reverse order.
            sink = MqttSink(config, store, self.metrics, node_name())
            self.bus.subscribe(sink)
            mqtt_port: int | None = None
            if config.mqtt.embedded:
                broker = EmbeddedBroker(config.mqtt.host, config.mqtt.port)
                await broker.start()
                self.broker = broker
                self._stack.push_async_callback(broker.stop)
                mqtt_port = broker.port
            await sink.start((config.mqtt.host, mqtt_port) if mqtt_port is not None else None)
            self.mqtt = sink
            self._stack.push_async_callback(sink.stop)
            cdrs = CdrBuilder(store, self.bus)
            for event in recover_open_cdrs(store, time.time()):
                self.bus.publish(event)  # records a crash left open, closed as failed
            cdrs.start()
            self._stack.push_async_callback(cdrs.stop)

            edge = SipEdge(config, store, self.bus, self.metrics)
            await edge.start()
            self.edge = edge
            self._stack.push_async_callback(edge.stop)

            pool = MediaPool(
                workers=config.media.workers,
                rtp_ports=(config.media.rtp_port_min, config.media.rtp_port_max),
                edge_host=edge.local_host,
                edge_port=edge.port,
                log_level=config.log.level,
                max_calls=config.media.max_calls,
            )
            self.media = pool
            self.metrics.watch_workers(
                lambda: [(str(w.slot), w.capacity, len(w.legs), w.restarts, w.ready) for w in pool.workers]
            )
            self._stack.push_async_callback(pool.stop)
            await pool.start()

            control = CallControl(
                pool,
                dialplan,
                self.bus,
                users={u.name: u.display_name for u in config.users},
                has_binding=edge.has_binding,
                domain=config.sip.domain,
                prompts=prompt_set(config),
                recordings_dir=config.data_dir.resolve() / "recordings",
            )
            control.start()
            self.calls = control
            self.bus.subscribe(self.metrics.on_event)
            self.metrics.watch_calls(lambda: (len(control.conversations), len(control.legs)))
            self._stack.push_async_callback(control.stop)
            edge.attach_media(pool)

            # Agents and queues: restored and reconciled with who is registered now; commands over MQTT.
            cti = CtiRuntime(
                CtiCore.from_config(config),
                self.bus,
                CtiStateStore(store, node_name()),
                has_binding=edge.has_binding,
            )
            cti.calls = control
            control.queues = cti
            await cti.start({u.name for u in config.users if edge.has_binding(u.name)})
            self.cti = cti
            self._stack.push_async_callback(cti.stop)
            commands = MqttCommandServer(
                config,
                cti.command,
                node_name(),
                broker_address=(config.mqtt.host, mqtt_port) if mqtt_port is not None else None,
            )
            await commands.start()
            self._stack.push_async_callback(commands.stop)
            add_cti_routes(self.http_app, config, cti.command)
            agent_events = AgentEventHub(config)
            sink.envelope_listeners.append(agent_events.on_envelope)
            add_agent_websocket(self.http_app, config, agent_events, cti.command)

            def publish_ports(http_port: int) -> None:
                self.ports = Ports(sip=edge.port, http=http_port, mqtt=mqtt_port)
                write_ports_file(ports_file, self.ports)

            # ports.json is written the moment HTTP serves, before it can answer anything: a tool that
            # sees the file finds every port open.
            http = HttpServer(
                self.http_app, config.http.listen_host, config.http.listen_port, on_serving=publish_ports
            )
            self.http = http
            self._stack.push_async_callback(http.stop)
            self._stack.callback(ports_file.unlink, missing_ok=True)
            await http.start()
        except BaseException:
            await self.stop()
            raise
        ports = self.ports
        if ports is None:  # HttpServer.start() returns only after on_serving ran
            raise RuntimeError("HTTP server started without reporting its port")
        log.info("softswitch ready", sip_port=ports.sip, http_port=ports.http, mqtt_port=ports.mqtt)
        return ports

    async def stop(self) -> None:
        """Stop everything that started, in reverse order. Safe to call more than once."""
        stack, self._stack = self._stack, AsyncExitStack()
        await stack.aclose()


def node_name() -> str:
    """The node's name in event sources and outbox rows: the host name, stable across restarts."""
    return socket.gethostname() or "node-1"


def write_ports_file(path: Path, ports: Ports) -> None:
    """Write `{"sip": …, "http": …, "mqtt": …}` atomically: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps({"sip": ports.sip, "http": ports.http, "mqtt": ports.mqtt}) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)


async def run(config: Config) -> None:
    """Run a node until SIGINT or SIGTERM, then stop it cleanly."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def request_stop(signame: str) -> None:
        log.info("stop requested", signal=signame)
        stop_requested.set()

    handled = (signal.SIGINT, signal.SIGTERM)
    for sig in handled:
        loop.add_signal_handler(sig, request_stop, sig.name)
    try:
        log.info("softswitch starting", version=__version__, pid=os.getpid(), **config.summary())
        node = Node(config)
        await node.start()
        try:
            await stop_requested.wait()
        finally:
            log.info("softswitch stopping")
            await node.stop()
        log.info("softswitch stopped")
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
