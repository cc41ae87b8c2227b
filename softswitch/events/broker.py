"""The embedded MQTT broker (`mqtt.url = "embedded"`): amqtt in the node's own event loop.

MQTT 3.1.1 (OASIS standard, §3.1 CONNECT onwards) for the node's event sinks and for consumers on the
same machine; a deployment that outgrows it points `mqtt.url` at Mosquitto or EMQX (ARCHITECTURE.md).
We bind the listening socket ourselves and hand each accepted connection to amqtt as an "external"
listener: port 0 then picks a free port and we know which one, with no reach into amqtt's internals.
Anonymous clients are allowed and nothing is persisted: bind it to loopback only.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import structlog
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker

log = structlog.get_logger(__name__)

#: Concurrent client connections accepted; more are closed at once. The embedded broker serves one
#: node's sinks and a handful of local consumers: this bounds file descriptors and per-session memory.
MAX_CLIENT_CONNECTIONS = 1024
#: Pending connections in the kernel's accept queue (listen backlog).
LISTEN_BACKLOG = 128
#: How long shutdown waits for client sessions to wind down before cancelling them.
SHUTDOWN_TIMEOUT_S = 5.0

_LISTENER = "default"


class EmbeddedBroker:
    """An amqtt broker listening on `host:port` (port 0 picks a free one) until `stop()`."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._requested_port = port
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The port actually bound (known after `start()`)."""
        if self._server is None:
            raise RuntimeError("broker not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        config: dict[str, Any] = {
            "listeners": {_LISTENER: {"type": "external", "bind": f"{self._host}:{self._requested_port}"}},
            # Only anonymous authentication: no event or packet loggers, no $SYS publisher, no persistence.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        broker = Broker(config)
        await broker.start()
        self._broker = broker
        try:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self._host, self._requested_port))
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                raise OSError(
                    exc.errno, f"cannot listen on {self._host}:{self._requested_port} (MQTT): {exc.strerror}"
                ) from None
            self._server = await asyncio.start_server(self._connected, sock=sock)
        except BaseException:
            await broker.shutdown()
            self._broker = None
            raise
        log.info("embedded MQTT broker listening", host=self._host, port=self.port)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        broker = self._broker
        if broker is None or len(self._sessions) >= MAX_CLIENT_CONNECTIONS:
            log.warning("MQTT connection refused", peer=writer.get_extra_info("peername"))
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None  # a stream callback always runs in a task
        self._sessions.add(task)
        try:
            await broker.external_connected(
                StreamReaderAdapter(reader), StreamWriterAdapter(writer), _LISTENER
            )
        except Exception:
            log.exception("MQTT session failed", peer=writer.get_extra_info("peername"))
        finally:
            self._sessions.discard(task)
            writer.close()

    async def stop(self) -> None:
        """Stop accepting, end every session, shut amqtt down."""
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
        if self._sessions:
            _, pending = await asyncio.wait(set(self._sessions), timeout=SHUTDOWN_TIMEOUT_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=SHUTDOWN_TIMEOUT_S)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        log.info("embedded MQTT broker stopped")
