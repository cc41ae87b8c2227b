"""The asyncio adapter of the SIP edge: sockets, the one timer, persistence and the event bus.

Nothing here knows SIP beyond framing TCP streams: every message goes to `EdgeCore.receive`, and what
the core queued is sent, published and persisted (STYLE.md 2: a thin adapter).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from softswitch.config import Config
from softswitch.events.bus import EventBus
from softswitch.events.types import DeviceUnregistered
from softswitch.metrics import Metrics
from softswitch.sip.edge import EdgeCore, EdgeSettings
from softswitch.sip.errors import SipParseError
from softswitch.sip.flow import Flow
from softswitch.sip.location import Binding, LocationService
from softswitch.sip.parser import StreamFramer
from softswitch.sip.registrar import RegistrarPolicy
from softswitch.store.db import BindingRow, Store

log = structlog.get_logger(__name__)

#: Kernel receive buffer asked for on the UDP socket: bursts of a few hundred calls/s overflow the
#: default (~200 KB) before the loop drains it (TESTING.md).
UDP_RCVBUF = 4 * 1024 * 1024
#: Largest datagram read; SIP over UDP stays well below (RFC 3261 §18.1.1), bigger ones are cut and
#: rejected by the parser's size limit.
UDP_MAX_DATAGRAM = 65_535
#: Concurrent TCP connections accepted; beyond this new ones are closed at once.
MAX_TCP_CONNECTIONS = 4096
#: A TCP connection that sends nothing for this long is closed (phones keep alive with CRLF or
#: re-registration well within it).
TCP_IDLE_TIMEOUT_S = 600.0
#: Seconds between write-behind flushes of binding changes to the store.
PERSIST_INTERVAL_S = 0.25
#: File holding the node's secret (nonces, flow tokens) so tokens survive a restart.
SECRET_FILE = "edge.secret"


def _load_secret(data_dir: Path) -> bytes:
    path = data_dir / SECRET_FILE
    try:
        value = path.read_bytes()
        if len(value) >= 32:
            return value
    except FileNotFoundError:
        pass
    value = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(value)
    tmp.chmod(0o600)
    tmp.replace(path)
    return value


#: Legs a new call needs on its worker (caller and callee).
LEGS_PER_CALL = 2


class _Worker(Protocol):
    sip_host: str
    sip_port: int

    @property
    def free(self) -> int: ...


class MediaWorkers(Protocol):
    """What the edge needs of the media pool: where to send a new call, and whom to trust."""

    def choose(self) -> _Worker | None: ...

    def is_worker_address(self, host: str, port: int) -> bool: ...

    def legs_in_use(self) -> int: ...

    def on_worker_died(self, callback: Callable[[Any], None]) -> None: ...


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, edge: SipEdge) -> None:
        self.edge = edge

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.edge.on_datagram(data, str(addr[0]), int(addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error", error=str(exc))


class _TcpConnection:
    def __init__(self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.id = conn_id
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.host, self.port = str(peer[0]), int(peer[1])
        self.framer = StreamFramer()


class SipEdge:
    """Binds UDP and TCP on `sip.listen` (one port for both) and runs the edge core."""

    def __init__(self, config: Config, store: Store, bus: EventBus, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.port = 0
        self.host = ""
        self.local_host = ""
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.Server | None = None
        self._conns: dict[int, _TcpConnection] = {}
        self._conn_by_remote: dict[tuple[str, int], int] = {}
        self._conn_ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pending: dict[tuple[str, str], Binding | None] = {}
        self._persist_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.core: EdgeCore | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sip = self.config.sip
        udp_sock, tcp_sock = self._bind(sip.listen_host, sip.listen_port)
        self.port = udp_sock.getsockname()[1]
        # Where the media workers on this machine reach the edge.
        self.local_host = "127.0.0.1" if sip.listen_host in ("0.0.0.0", "::") else sip.listen_host
        host = self.host = sip.external_address or (
            sip.listen_host if sip.listen_host not in ("0.0.0.0", "::") else sip.domain
        )
        settings = EdgeSettings(
            host=host,
            port=self.port,
            domain=sip.domain,
            aliases=frozenset({sip.listen_host, sip.domain, host, self.local_host}),
            realm=sip.realm,
            secret=_load_secret(Path(self.config.data_dir)),
            policy=RegistrarPolicy(sip.min_expires, sip.max_expires, sip.default_expires),
            nonce_ttl_s=sip.nonce_ttl_s,
            auth_max_failures=sip.auth_max_failures,
            auth_failure_window_s=sip.auth_failure_window_s,
            auth_block_s=sip.auth_block_s,
            digest_algorithms=tuple(sip.digest_algorithms),
            max_cps=self.config.media.max_cps,
        )
        passwords = {u.name: u.password for u in self.config.users}
        location = LocationService()
        now = time.time()
        restored = 0
        valid, expired = await asyncio.to_thread(self.store.load_and_expire_bindings, now)
        for row in valid:
            try:
                location.put(Binding.from_data(row.aor, row.contact, row.expires_at, row.data))
                restored += 1
            except Exception:
                log.warning("skipped unreadable stored binding", aor=row.aor, contact=row.contact)
        for row in expired:
            # Expired while the node was down: say so now, as the registrar would have then, so the
            # retained registration snapshot and the device's subscribers catch up (EVENTS.md).
            log.info("device unregistered", user=row.aor, contact=row.contact, reason="expired")
            try:
                transport = Binding.from_data(row.aor, row.contact, row.expires_at, row.data).flow.transport
            except Exception:
                transport = "udp"
            self.bus.publish(
                DeviceUnregistered(
                    user=row.aor, contact=row.contact, transport=transport.lower(), reason="expired"
                )
            )
        self.core = EdgeCore(settings, passwords, location, self.metrics)
        self.metrics.registrations.set(len(location))
        self.metrics.registered_users.set(location.user_count)
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp_sock)
        self._tcp_server = await asyncio.start_server(self._on_tcp_connection, sock=tcp_sock, limit=2**16)
        self._persist_task = asyncio.create_task(self._persist_loop())
        self._rearm()
        log.info(
            "sip edge listening",
            address=f"{sip.listen_host}:{self.port}",
            transports=["udp", "tcp"],
            domain=sip.domain,
            restored_bindings=restored,
        )

    @staticmethod
    def _bind(host: str, port: int) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP sockets on the same port; with port 0, a port free for both."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
                udp.bind((host, port))
                chosen = udp.getsockname()[1]
                tcp = socket.socket(family, socket.SOCK_STREAM)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    tcp.bind((host, chosen))
                except OSError:
                    tcp.close()
                    if port:
                        raise
                    udp.close()
                    continue
                tcp.listen(512)
                udp.setblocking(False)
                tcp.setblocking(False)
                return udp, tcp
            except OSError:
                udp.close()
                raise
        raise OSError(f"no port free for both UDP and TCP on {host}")

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for conn in list(self._conns.values()):
            conn.writer.close()
        if self._udp is not None:
            self._udp.close()
        if self._persist_task is not None:
            self._persist_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._persist_task
        for task in list(self._tasks):
            task.cancel()
        await self._flush()
        log.info("sip edge stopped")

    # -- the media plane ------------------------------------------------------------------------

    def attach_media(self, pool: MediaWorkers) -> None:
        """From now on calls from phones go to the media workers, which the edge trusts."""
        assert self.core is not None

        max_legs = self.config.media.max_calls

        def dispatch() -> Flow | None:
            # A new call takes two legs on one worker: the caller's and the callee's.
            if pool.legs_in_use() + LEGS_PER_CALL > max_legs:
                return None
            worker = pool.choose()
            if worker is None or worker.free < LEGS_PER_CALL:
                return None
            return Flow("UDP", worker.sip_host, worker.sip_port)

        self.core.trusted = lambda flow: pool.is_worker_address(flow.host, flow.port)
        self.core.media_dispatch = dispatch
        pool.on_worker_died(self._worker_died)

    def _worker_died(self, worker: _Worker) -> None:
        assert self.core is not None
        self.core.end_worker_dialogs(worker.sip_host, worker.sip_port, time.time())
        self._drain()

    def has_binding(self, user: str) -> bool:
        return self.core is not None and bool(self.core.location.bindings(user))

    # -- input ----------------------------------------------------------------------------------

    def on_datagram(self, data: bytes, host: str, port: int) -> None:
        if not data.strip(b"\r\n"):
            return  # RFC 5626 §4.4.1 keep-alive
        self._feed(data, Flow("UDP", host, port))

    async def _on_tcp_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        conn = _TcpConnection(next(self._conn_ids), reader, writer)
        self._register_conn(conn)
        await self._read_loop(conn)

    def _register_conn(self, conn: _TcpConnection) -> None:
        self._conns[conn.id] = conn
        self._conn_by_remote[(conn.host, conn.port)] = conn.id

    async def _read_loop(self, conn: _TcpConnection) -> None:
        flow = Flow("TCP", conn.host, conn.port, conn.id)
        try:
            while True:
                data = await asyncio.wait_for(conn.reader.read(65536), TCP_IDLE_TIMEOUT_S)
                if not data:
                    break
                for item in conn.framer.feed(data):
                    if isinstance(item, SipParseError):
                        log.info("tcp framing error", reason=item.reason, flow=str(flow))
                        self.metrics.sip_parse_errors.labels(action="resync").inc()
                        if item.message is not None:
                            self._feed_error(item, flow)
                        continue
                    if item == b"\r\n\r\n":
                        conn.writer.write(b"\r\n")  # RFC 5626 §3.5.1 pong
                        continue
                    self._feed(item, flow)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.pop(conn.id, None)
            if self._conn_by_remote.get((conn.host, conn.port)) == conn.id:
                del self._conn_by_remote[(conn.host, conn.port)]
            conn.writer.close()

    def _feed(self, data: bytes, flow: Flow) -> None:
        assert self.core is not None
        if self.config.log.sip_trace:
            log.debug("sip in", flow=str(flow), message=data.decode(errors="replace"))
        self.core.receive(data, flow, time.time())
        self._drain()

    def _feed_error(self, error: SipParseError, flow: Flow) -> None:
        assert self.core is not None
        self.core.reject_unparsable(error, flow)
        self._drain()

    # -- output ---------------------------------------------------------------------------------

    def _drain(self) -> None:
        core = self.core
        assert core is not None
        if core.outbox:
            sends = list(core.outbox)
            core.outbox.clear()
            for send in sends:
                self._send(send.data, send.flow)
        if core.events:
            events = list(core.events)
            core.events.clear()
            for event in events:
                self.metrics.events_published.labels(type=event.type).inc()
                self.bus.publish(event)
        if core.binding_changes:
            for kind, binding in core.binding_changes:
                self._pending[(binding.aor, binding.key)] = binding if kind == "upsert" else None
            core.binding_changes.clear()
        self._rearm()

    def _send(self, data: bytes, flow: Flow) -> None:
        if self.config.log.sip_trace:
            log.debug("sip out", flow=str(flow), message=data.decode(errors="replace"))
        if flow.transport == "UDP":
            if self._udp is not None:
                self._udp.sendto(data, flow.remote)
            return
        conn = self._conns.get(flow.conn_id) if flow.conn_id is not None else None
        if conn is None:
            conn_id = self._conn_by_remote.get(flow.remote)
            conn = self._conns.get(conn_id) if conn_id is not None else None
        if conn is not None and not conn.writer.is_closing():
            conn.writer.write(data)
            return
        task = asyncio.create_task(self._connect_and_send(data, flow))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_and_send(self, data: bytes, flow: Flow) -> None:
        """RFC 3261 §18.2.2: the connection is gone, open a new one to the same address."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(flow.host, flow.port), timeout=5)
        except (OSError, TimeoutError) as e:
            log.info("tcp connect failed", flow=str(flow), error=str(e))
            if self.core is not None:
                self.core.flow_failed(flow, time.time())
                self._drain()
            return
        conn = _TcpConnection(next(self._conn_ids), reader, writer)
        self._register_conn(conn)
        writer.write(data)
        task = asyncio.create_task(self._read_loop(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- timers ---------------------------------------------------------------------------------

    def _rearm(self) -> None:
        assert self.core is not None
        at = self.core.next_timer()
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            delay = max(0.0, at - time.time())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        assert self.core is not None
        self._timer = None
        self._timer_at = None
        try:
            self.core.handle_timers(time.time())
        except Exception:
            log.exception("timer handling failed")
        self._drain()

    # -- persistence (write-behind) -------------------------------------------------------------

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_INTERVAL_S)
            try:
                await self._flush()
            except Exception:
                log.exception("persisting bindings failed; will retry")

    async def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        upserts = [
            BindingRow(b.aor, b.key, b.contact, b.expires_at, b.to_data())
            for b in pending.values()
            if b is not None
        ]
        deletes = [key for key, b in pending.items() if b is None]
        try:
            await asyncio.to_thread(self.store.apply_binding_changes, upserts, deletes)
        except Exception:
            for key, b in pending.items():
                self._pending.setdefault(key, b)
            raise
