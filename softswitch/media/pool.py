"""The controller side of the media plane: a supervised pool of media worker processes.

The pool listens for its workers on a control socket (127.0.0.1, port chosen by the system), spawns them
(``python -m softswitch.media.worker``), splits the RTP port range between them, and speaks the control
protocol (``softswitch.media.protocol``) with each: commands with request ids and replies, and the
workers' events fanned out to subscribers. It tracks which legs live on which worker, so dispatch can pick
the worker with the most free slots (ARCHITECTURE.md: "All legs of one conversation live on one worker").

When a worker dies, every leg it held is failed with a synthetic ``leg.state`` (disconnected, 500,
"media worker died", released by "system") and a new worker process takes its slot (new worker id, same
RTP ports), after a back-off that grows while workers keep dying young.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import structlog

from softswitch.media.protocol import (
    MAX_FRAME,
    Command,
    CommandError,
    Event,
    LegIncoming,
    LegState,
    Originate,
    Ping,
    ProtocolError,
    Reply,
    Shutdown,
    WorkerReady,
    decode,
    encode,
)

log = structlog.get_logger(__name__)

CONTROL_HOST: Final = "127.0.0.1"  # workers run on this machine; a remote worker would dial a routable one
READY_TIMEOUT_S: Final = 30.0  # spawn + libInit + the worker's capacity probe (bounded at ~2 s) + margin
FIRST_FRAME_TIMEOUT_S: Final = 30.0  # a connection must introduce itself with worker.ready by then
SHUTDOWN_REPLY_TIMEOUT_S: Final = 5.0  # the worker answers Shutdown within one poll
STOP_TIMEOUT_S: Final = 10.0  # Shutdown to exit: hang-up drain (≤ 3 s) and libDestroy (~1 s)
KILL_TIMEOUT_S: Final = 5.0  # SIGKILL to reaped
EOF_EXIT_GRACE_S: Final = 5.0  # a worker whose connection closed must exit by then, or it is killed
RESTART_BACKOFF_INITIAL_S: Final = 0.5  # first restart delay: a crash loop must not spin the CPU
RESTART_BACKOFF_MAX_S: Final = 10.0  # delays double up to this
STABLE_UPTIME_S: Final = 30.0  # a worker that lived this long resets the back-off
#: A worker reporting engine "high-capacity", or probing at least this many legs (the wheels hold ≤ 32),
#: runs an engine whose limit is the CPU: "auto" then means one worker per core.
HIGH_CAPACITY_MIN_LEGS: Final = 64
MAX_AUTO_WORKERS: Final = 64  # "auto" with the fallback wheel never starts more than this
MIN_RTP_PORTS_PER_WORKER: Final = 4  # RTP+RTCP for two legs: less is a configuration error
LEGS_PER_CALL: Final = 2  # a bridged call is two legs (ARCHITECTURE.md)
HEALTH_INTERVAL_S: Final = 2.0  # a ready worker is pinged this often ...
HEALTH_TIMEOUT_S: Final = 2.0  # ... must reply within this (its main loop answers; a poll is ≤ 10 ms) ...
HEALTH_MAX_MISSES: Final = 3  # ... and is killed (then restarted) after this many misses in a row
WORKER_DIED_CODE: Final = 500
WORKER_DIED_REASON: Final = "media worker died"

EventCallback = Callable[[str, Event], None]


class MediaPoolError(Exception):
    """The pool could not start its workers."""


@dataclass(eq=False)
class WorkerHandle:
    """One worker process as the pool sees it. ``id`` is new for every process; ``slot`` is stable."""

    id: str
    slot: int
    rtp_ports: tuple[int, int]
    restarts: int = 0  # processes this slot has had beyond its first
    sip_host: str = ""
    sip_port: int = 0
    capacity: int = 0  # legs, as probed by the worker
    engine: str = ""
    pjsip_version: str = ""
    pid: int = 0
    ready: bool = False
    legs: set[str] = field(default_factory=set)
    started_at: float = 0.0
    missed_pings: int = 0  # health checks in a row without a reply
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)
    _writer: asyncio.StreamWriter | None = field(default=None, repr=False)
    _pending: dict[int, asyncio.Future[Reply]] = field(default_factory=dict, repr=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _call_ids: dict[str, str] = field(default_factory=dict, repr=False)
    _dead: bool = False

    @property
    def free(self) -> int:
        """Legs this worker can still take (0 while it is not ready)."""
        return max(0, self.capacity - len(self.legs)) if self.ready else 0


def split_port_range(low: int, high: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` disjoint sub-ranges of [low, high], each starting on an even port (RTP even, RTCP odd,
    RFC 3550 §11) and holding an even number of ports."""
    start = low + (low % 2)
    size = (high - start + 1) // parts
    size -= size % 2
    if size < MIN_RTP_PORTS_PER_WORKER:
        raise ValueError(
            f"RTP port range {low}-{high} is too small for {parts} workers "
            f"(at least {MIN_RTP_PORTS_PER_WORKER} ports each)"
        )
    return [(start + i * size, start + (i + 1) * size - 1) for i in range(parts)]


class MediaPool:
    """Spawns, supervises and talks to the media workers (one asyncio loop, the controller's)."""

    def __init__(
        self,
        *,
        workers: int | Literal["auto"],
        rtp_ports: tuple[int, int],
        edge_host: str,
        edge_port: int,
        python: str = sys.executable,
        log_level: str = "info",
        max_calls_per_worker: int | None = None,
        max_calls: int | None = None,
    ) -> None:
        """``max_calls_per_worker`` caps each worker's legs; ``max_calls`` (two-leg calls the node must
        hold) sizes ``workers="auto"`` when the engine is the low-capacity fallback wheel."""
        if workers != "auto" and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f'workers must be "auto" or >= 1, got {workers!r}')
        low, high = rtp_ports
        if not 1024 <= low < high <= 65535:
            raise ValueError(f"bad RTP port range {low}-{high}")
        self.workers_setting = workers
        self.rtp_ports = rtp_ports
        self.edge_host = edge_host
        self.edge_port = edge_port
        self.python = python
        self.log_level = log_level
        self.max_calls_per_worker = max_calls_per_worker
        self.max_calls = max_calls
        self._slots: list[WorkerHandle] = []
        self._subscribers: list[EventCallback] = []
        self._death_callbacks: list[Callable[[WorkerHandle], None]] = []
        self._server: asyncio.Server | None = None
        self._control_port = 0
        self._ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._backoff: dict[int, float] = {}
        self._last_chosen = -1  # slot of the worker choose() returned last
        self._stopping = False

    # ------------------------------------------------------------------------------- public API

    @property
    def workers(self) -> list[WorkerHandle]:
        """The current process of every slot (ready or starting), by slot."""
        return list(self._slots)

    @property
    def control_port(self) -> int:
        return self._control_port

    async def start(self) -> None:
        """Listen, spawn the workers and wait (bounded) until each announced itself."""
        self._server = await asyncio.start_server(self._on_connect, CONTROL_HOST, 0, limit=MAX_FRAME)
        self._control_port = int(self._server.sockets[0].getsockname()[1])
        low, high = self.rtp_ports
        setting = self.workers_setting
        try:
            if setting == "auto":
                # The first worker tells which engine is installed; it gets one core's share of the ports
                # (at least half, so a fallback engine on one core still leaves ports for more workers).
                planned = max(2, os.cpu_count() or 1)
                first_slice = split_port_range(low, high, planned)[0]
                first = await self._spawn_and_wait(0, first_slice)
                total = self._auto_count(first)
                slices = [first_slice]
                if total > 1:
                    slices += split_port_range(first_slice[1] + 1, high, total - 1)
                await asyncio.gather(*(self._spawn_and_wait(i, slices[i]) for i in range(1, total)))
            else:
                slices = split_port_range(low, high, setting)
                await asyncio.gather(*(self._spawn_and_wait(i, s) for i, s in enumerate(slices)))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Shutdown to every worker, wait for it to exit, kill it if it does not; close the socket."""
        self._stopping = True
        await asyncio.gather(*(self._stop_worker(handle) for handle in self._slots), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def choose(self) -> WorkerHandle | None:
        """The ready worker with the most free slots, or None when every worker is full. Ties go round
        the slots (the one after the last chosen first), so light load spreads over every worker."""
        count = len(self._slots)
        best: WorkerHandle | None = None
        for step in range(1, count + 1):
            handle = self._slots[(self._last_chosen + step) % count]
            if handle.free > 0 and (best is None or handle.free > best.free):
                best = handle
        if best is not None:
            self._last_chosen = best.slot
        return best

    def on_worker_died(self, callback: Callable[[WorkerHandle], None]) -> None:
        """Call `callback(handle)` when a worker process dies, before its legs are reported ended."""
        self._death_callbacks.append(callback)

    def legs_in_use(self) -> int:
        """Legs held on every worker (the node-wide admission limit counts these)."""
        return sum(len(handle.legs) for handle in self._slots)

    def address(self, worker_id: str) -> tuple[str, int] | None:
        """The SIP address of worker ``worker_id`` while it is ready (a room's home, for links)."""
        for handle in self._slots:
            if handle.id == worker_id and handle.ready:
                return handle.sip_host, handle.sip_port
        return None

    def worker_for_address(self, host: str, port: int) -> WorkerHandle | None:
        """The ready worker whose SIP transport is ``host:port`` (the edge trusts these)."""
        for handle in self._slots:
            if handle.ready and handle.sip_port == port and handle.sip_host == host:
                return handle
        return None

    def is_worker_address(self, host: str, port: int) -> bool:
        return self.worker_for_address(host, port) is not None

    def subscribe(self, callback: EventCallback) -> None:
        """``callback(worker_id, event)`` for every event of every worker, and the synthetic ones."""
        self._subscribers.append(callback)

    async def command(self, worker_id: str, cmd: Command, timeout_s: float = 5.0) -> dict[str, Any]:
        """Send ``cmd`` to the worker and return its reply's result; raise CommandError when it failed."""
        handle = self._handle(worker_id)
        if handle is None:
            raise CommandError("invalid_argument", f"no worker {worker_id!r}")
        writer = handle._writer
        if not handle.ready or writer is None or handle._dead:
            raise CommandError("internal", f"worker {worker_id} is not connected")
        request_id = next(self._request_ids)
        try:
            frame = encode(dataclasses.replace(cmd, id=request_id))
        except ProtocolError as exc:
            raise CommandError("invalid_argument", str(exc)) from None
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        handle._pending[request_id] = future
        new_leg = cmd.leg if isinstance(cmd, Originate) else None
        if new_leg is not None:
            handle.legs.add(new_leg)  # its first leg.state may come before the reply
        succeeded = False
        try:
            writer.write(frame)
            await writer.drain()
            reply = await asyncio.wait_for(future, timeout_s)
            result = reply.raise_for_error()
            succeeded = True
        except (ConnectionError, OSError) as exc:
            raise CommandError("internal", f"worker {worker_id}: {exc}") from None
        except TimeoutError:
            raise CommandError(
                "internal", f"worker {worker_id} did not reply within {timeout_s:g} s"
            ) from None
        finally:
            handle._pending.pop(request_id, None)
            if new_leg is not None and not succeeded:
                handle.legs.discard(new_leg)
        if new_leg is not None and isinstance(result.get("sip_call_id"), str):
            handle._call_ids[new_leg] = result["sip_call_id"]
        return result

    # ------------------------------------------------------------------------------- workers

    def _auto_count(self, first: WorkerHandle) -> int:
        cores = max(1, os.cpu_count() or 1)
        high_capacity = first.engine == "high-capacity" or first.capacity >= HIGH_CAPACITY_MIN_LEGS
        if high_capacity or self.max_calls is None:
            return cores
        needed = math.ceil(LEGS_PER_CALL * self.max_calls / max(1, first.capacity))
        count = max(1, min(MAX_AUTO_WORKERS, needed))
        log.warning(
            "low-capacity media engine: starting enough workers for max_calls",
            engine=first.engine,
            capacity_legs=first.capacity,
            max_calls=self.max_calls,
            workers=count,
        )
        return count

    def _handle(self, worker_id: str) -> WorkerHandle | None:
        for handle in self._slots:
            if handle.id == worker_id:
                return handle
        return None

    async def _spawn_and_wait(self, slot: int, rtp_ports: tuple[int, int], restarts: int = 0) -> WorkerHandle:
        handle = await self._spawn(slot, rtp_ports, restarts)
        try:
            await asyncio.wait_for(handle._ready.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            await self._kill(handle)
            raise MediaPoolError(
                f"media worker {handle.id} sent no worker.ready within {READY_TIMEOUT_S:g} s"
            ) from None
        return handle

    async def _spawn(self, slot: int, rtp_ports: tuple[int, int], restarts: int) -> WorkerHandle:
        handle = WorkerHandle(id=f"w{next(self._ids)}", slot=slot, rtp_ports=rtp_ports, restarts=restarts)
        if slot < len(self._slots):
            self._slots[slot] = handle
        else:
            self._slots.append(handle)
        args = [
            "-m",
            "softswitch.media.worker",
            "--controller",
            f"{CONTROL_HOST}:{self._control_port}",
            "--worker-id",
            handle.id,
            "--sip-port",
            "0",
            "--rtp-ports",
            f"{rtp_ports[0]}-{rtp_ports[1]}",
            "--edge",
            f"{self.edge_host}:{self.edge_port}",
            "--log-level",
            self.log_level,
        ]
        if self.max_calls_per_worker is not None:
            args += ["--max-calls", str(self.max_calls_per_worker)]
        handle.process = await asyncio.create_subprocess_exec(
            self.python, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
        )
        handle.pid = handle.process.pid
        handle.started_at = time.monotonic()
        if self._stopping:  # stop() ran while this restart was spawning
            await self._kill(handle)
        self._track(asyncio.create_task(self._watch(handle), name=f"media-watch-{handle.id}"))
        log.info("media worker spawned", worker_id=handle.id, slot=slot, pid=handle.pid, rtp_ports=rtp_ports)
        return handle

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, handle: WorkerHandle) -> None:
        """Wait for the worker process to exit; then fail its legs and, unless stopping, restart it."""
        assert handle.process is not None
        code = await handle.process.wait()
        await self._worker_died(handle, code)

    async def _worker_died(self, handle: WorkerHandle, code: int) -> None:
        if handle._dead:
            return
        handle._dead = True
        handle.ready = False
        if handle._writer is not None:
            handle._writer.close()
            handle._writer = None
        for future in handle._pending.values():
            if not future.done():
                future.set_exception(CommandError("internal", f"media worker {handle.id} died"))
        handle._pending.clear()
        legs = sorted(handle.legs)
        handle.legs.clear()
        for callback in list(self._death_callbacks):
            try:
                callback(handle)
            except Exception:
                log.exception("worker death callback failed", worker_id=handle.id)
        if not self._stopping or legs:
            log_method = log.info if self._stopping else log.error
            log_method("media worker exited", worker_id=handle.id, pid=handle.pid, code=code, legs=len(legs))
        for leg in legs:  # nothing left dangling: the controller closes these legs' calls and CDRs
            self._publish(
                handle.id,
                LegState(
                    leg=leg,
                    state="disconnected",
                    sip_code=WORKER_DIED_CODE,
                    reason=WORKER_DIED_REASON,
                    sip_call_id=handle._call_ids.get(leg, ""),
                    released_by="system",
                ),
            )
        handle._call_ids.clear()
        if self._stopping:
            return
        uptime = time.monotonic() - handle.started_at
        delay = self._backoff.get(handle.slot, 0.0)
        delay = RESTART_BACKOFF_INITIAL_S if uptime >= STABLE_UPTIME_S or not delay else delay * 2
        delay = min(delay, RESTART_BACKOFF_MAX_S)
        self._backoff[handle.slot] = delay
        await asyncio.sleep(delay)
        if self._stopping:
            return
        try:
            await self._spawn_and_wait(handle.slot, handle.rtp_ports, handle.restarts + 1)
        except (MediaPoolError, OSError) as exc:
            log.error("media worker restart failed", slot=handle.slot, error=str(exc))
            # The failed process's own watcher schedules the next attempt when it exits.

    async def _stop_worker(self, handle: WorkerHandle) -> None:
        if handle.process is None or handle.process.returncode is not None:
            return
        if handle.ready:
            with contextlib.suppress(CommandError):
                await self.command(handle.id, Shutdown(), SHUTDOWN_REPLY_TIMEOUT_S)
        else:
            with contextlib.suppress(ProcessLookupError):
                handle.process.terminate()
        try:
            await asyncio.wait_for(handle.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("media worker did not exit: killing it", worker_id=handle.id, pid=handle.pid)
            await self._kill(handle)
        await self._worker_died(handle, handle.process.returncode or 0)

    async def _kill(self, handle: WorkerHandle) -> None:
        process = handle.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), KILL_TIMEOUT_S)

    # ------------------------------------------------------------------------------- connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handle: WorkerHandle | None = None
        try:
            first = decode(await asyncio.wait_for(self._read_frame(reader), FIRST_FRAME_TIMEOUT_S))
            handle = self._introduce(first, writer)
            if handle is None:
                return
            while True:
                self._dispatch(handle, decode(await self._read_frame(reader)))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except ProtocolError as exc:
            log.error(
                "protocol error from a media worker", worker_id=handle.id if handle else "", error=str(exc)
            )
        finally:
            writer.close()
            if handle is not None and not handle._dead:
                handle._writer = None
                handle.ready = False  # no new legs; the process watcher does the rest
                self._track(asyncio.create_task(self._reap_after_eof(handle)))

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        try:
            return await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise ProtocolError(f"frame longer than MAX_FRAME ({MAX_FRAME})") from None

    def _introduce(self, first: object, writer: asyncio.StreamWriter) -> WorkerHandle | None:
        if not isinstance(first, WorkerReady):
            raise ProtocolError(f"first frame must be worker.ready, got {type(first).__name__}")
        handle = self._handle(first.worker_id)
        if handle is None or handle.ready or handle._dead or handle.pid != first.pid:
            log.error("unexpected media worker connection", worker_id=first.worker_id, pid=first.pid)
            return None
        handle.sip_host = first.sip_host
        handle.sip_port = first.sip_port
        handle.capacity = first.capacity
        handle.engine = first.engine
        handle.pjsip_version = first.pjsip_version
        handle._writer = writer
        handle.ready = True
        handle._ready.set()
        report = log.info if first.engine == "high-capacity" else log.warning
        report(
            "media worker ready",
            worker_id=handle.id,
            slot=handle.slot,
            engine=first.engine,
            pjsip=first.pjsip_version,
            capacity_legs=first.capacity,
            sip=f"{first.sip_host}:{first.sip_port}",
            rtp_ports=first.rtp_ports,
            pid=first.pid,
        )
        self._publish(handle.id, first)
        self._track(asyncio.create_task(self._health(handle), name=f"media-health-{handle.id}"))
        return handle

    async def _health(self, handle: WorkerHandle) -> None:
        """Ping the worker's main loop; one that stops answering (a hung library call, a deadlock) is
        killed, and its watcher fails its legs and restarts it as for any other death."""
        while not self._stopping and not handle._dead:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            if self._stopping or handle._dead or not handle.ready:
                return
            try:
                await self.command(handle.id, Ping(), HEALTH_TIMEOUT_S)
                handle.missed_pings = 0
                continue
            except CommandError as exc:
                if handle._dead or not handle.ready:
                    return
                handle.missed_pings += 1
                log.warning(
                    "media worker missed a health check",
                    worker_id=handle.id,
                    missed=handle.missed_pings,
                    error=exc.message,
                )
            if handle.missed_pings >= HEALTH_MAX_MISSES:
                log.error(
                    "media worker unresponsive: killing it",
                    worker_id=handle.id,
                    pid=handle.pid,
                    legs=len(handle.legs),
                )
                await self._kill(handle)
                return

    async def _reap_after_eof(self, handle: WorkerHandle) -> None:
        """A worker exits when its control connection ends; one that does not is killed."""
        process = handle.process
        if process is None:
            return
        try:
            await asyncio.wait_for(process.wait(), EOF_EXIT_GRACE_S)
        except TimeoutError:
            log.error("media worker lost its connection but kept running: killing it", worker_id=handle.id)
            await self._kill(handle)

    def _dispatch(self, handle: WorkerHandle, message: object) -> None:
        if isinstance(message, Reply):
            future = handle._pending.get(message.id)
            if future is not None and not future.done():
                future.set_result(message)
            return
        if not isinstance(message, Event):
            raise ProtocolError(f"a worker sends replies and events only, got {type(message).__name__}")
        if isinstance(message, LegIncoming):
            handle.legs.add(message.leg)
            handle._call_ids[message.leg] = message.sip_call_id
        elif isinstance(message, LegState):
            if message.state == "disconnected":
                handle.legs.discard(message.leg)
                handle._call_ids.pop(message.leg, None)
            elif message.sip_call_id and message.leg in handle.legs:
                handle._call_ids[message.leg] = message.sip_call_id
        self._publish(handle.id, message)

    def _publish(self, worker_id: str, event: Event) -> None:
        for callback in list(self._subscribers):
            try:
                callback(worker_id, event)
            except Exception:
                log.exception("media event subscriber failed", worker_id=worker_id, event=event.type)
