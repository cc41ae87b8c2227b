"""The MQTT sink: every bus event, through the durable outbox, to the broker with QoS 1 (EVENTS.md).

MQTT 3.1.1 (OASIS standard): PUBLISH with QoS 1 (§4.3.2) — a message leaves the outbox only when its
PUBACK arrives; retained messages (§3.3.1.3) carry the device registration snapshots, and a zero-byte
retained message clears one when the user's last binding goes. Agent state and queue statistics events
are also retained on their snapshot topics (`…/agents/{id}/state`, `…/queues/{id}/stats`).

The bus calls the sink synchronously; `__call__` never blocks and never raises. It stamps the envelope
(its `seq` from the per-subject counters), computes the topic and appends to an in-memory batch. A writer
task flushes the batch to the store every `WRITE_BATCH_DELAY_S` in one transaction on a worker thread
(`asyncio.to_thread`), keeping order; only written messages are published. A connection task publishes
them in outbox order with up to `MAX_IN_FLIGHT` unacknowledged at a time over one connection (MQTT
§4.6: a broker keeps the order of QoS 1 messages from one client on one topic), deletes acknowledged
ones (again in batches), and reconnects with exponential backoff when the broker goes away, resending
everything unacknowledged in order (delivery is at least once: consumers de-duplicate on `id`).

When the outbox is full (`outbox_limit` messages not yet acknowledged), new events are dropped, never
the old ones: what is already queued stays durable and in order, call processing is never blocked, and
the dropped event still consumes its `seq`, so consumers see the gap. A metric counts the drops; one log
line marks when the outbox fills and one when it has room again.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import aiomqtt
import structlog

from softswitch.config import Config
from softswitch.events.envelope import Sequencer, build_envelope, format_time, source_of, subject_key
from softswitch.events.schemas import REGISTRATION_SNAPSHOT
from softswitch.events.types import (
    AgentStateChanged,
    CdrCreated,
    ConversationEnded,
    DeviceRegistered,
    DeviceUnregistered,
    Event,
    QueueStats,
)
from softswitch.metrics import Metrics
from softswitch.store.db import Store
from softswitch.store.outbox import Outbox, OutboxMessage, SubjectState

log = structlog.get_logger(__name__)

#: Messages kept in the outbox awaiting a PUBACK. At ~1 KB a message this bounds the store and the
#: in-memory index to ~100 MB: about a minute of a busy node's events, or hours of a quiet one's.
OUTBOX_MAX_EVENTS = 100_000
#: The outbox reports "room again" below this fraction of its bound (no log flapping at the edge).
OUTBOX_RESUME_FRACTION = 0.9
#: How long the writer gathers events before one transaction: many events per fsync, little delay.
WRITE_BATCH_DELAY_S = 0.005
#: Deleting acknowledged rows waits for the next batch of new events, or this long when none comes: a
#: transaction per PUBACK burst would double the store's work. A crash in between re-publishes them at
#: the next start (QoS 1 is at least once: subscribers de-duplicate on the event `id`).
ACK_FLUSH_DELAY_S = 0.5
#: Most messages written in one transaction (bounds a transaction's size and the time it holds the lock).
MAX_WRITE_BATCH = 5_000
#: Wait before retrying a failed outbox write (the store is down or locked).
WRITE_RETRY_S = 1.0
#: Unacknowledged QoS 1 PUBLISHes in flight on the connection (pipelining; also paho's inflight window).
#: Loopback and LAN round trips are well under a millisecond, so 64 keeps the link busy; paho and aiomqtt
#: scan their in-flight lists per message, so a larger window costs CPU (measured: 256 was ~20 % slower).
MAX_IN_FLIGHT = 64
#: A PUBACK slower than this means the connection is broken: reconnect and resend.
PUBACK_TIMEOUT_S = 15.0
#: Reconnect backoff: first wait, doubling up to the cap, back to the first after a good connection.
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
#: CONNECT/CONNACK and DISCONNECT time limit.
CONNECT_TIMEOUT_S = 5.0
#: MQTT keep-alive (§3.1.2.10): a dead broker is noticed within 1.5 times this.
KEEPALIVE_S = 30
#: How long `stop()` waits for the outbox to drain into a connected broker.
STOP_DRAIN_TIMEOUT_S = 3.0
#: A conversation's counter is kept this long after `conversation.ended` if no `cdr.created` follows.
ENDED_SUBJECT_RETENTION_S = 3600.0
#: How often ended subjects are pruned.
PRUNE_INTERVAL_S = 60.0

#: Characters that cannot appear inside one topic level (MQTT §4.7.1: separator and wildcards; §1.5.3: NUL),
#: percent-encoded, together with "%" itself.
_TOPIC_ESCAPES = str.maketrans({c: f"%{ord(c):02X}" for c in "%/+#\0"})


def topic_level(value: str) -> str:
    """`value` as one topic level: `/`, `+`, `#`, NUL and `%` are percent-encoded (MQTT §4.7.1)."""
    return value.translate(_TOPIC_ESCAPES) or "%00"


def event_topic(prefix: str, tenant: str, event: Event) -> str:
    """The topic of an event (EVENTS.md "MQTT topics")."""
    base = f"{prefix}/{topic_level(tenant)}"
    if isinstance(event, CdrCreated):
        return f"{base}/cdr/{topic_level(event.conversation_id)}"
    kind = event.subject_kind
    roots = {"conversation": "calls", "device": "devices", "agent": "agents", "queue": "queues"}
    if kind not in roots:
        raise ValueError(f"no topic for subject kind {kind!r} of {event.type}")
    return f"{base}/{roots[kind]}/{topic_level(event.subject)}/{event.type}"


def registration_topic(prefix: str, tenant: str, user: str) -> str:
    """The retained registration snapshot topic of a user (EVENTS.md: `…/devices/{user}/registration`)."""
    return f"{prefix}/{topic_level(tenant)}/devices/{topic_level(user)}/registration"


def agent_state_topic(prefix: str, tenant: str, agent_id: str) -> str:
    """The retained current-state topic of an agent (EVENTS.md: `…/agents/{agent_id}/state`)."""
    return f"{prefix}/{topic_level(tenant)}/agents/{topic_level(agent_id)}/state"


def queue_stats_topic(prefix: str, tenant: str, queue_id: str) -> str:
    """The retained statistics topic of a queue (EVENTS.md: `…/queues/{queue_id}/stats`)."""
    return f"{prefix}/{topic_level(tenant)}/queues/{topic_level(queue_id)}/stats"


def snapshot_topic(prefix: str, tenant: str, event: Event) -> str | None:
    """Where a copy of `event` is retained as its subject's snapshot, if it is one.

    `agent.state_changed` is the agent's current state and `queue.stats` the queue's current figures:
    the same envelope is published once on its event topic and once, retained, on the snapshot topic,
    so a consumer that subscribes later learns the present at once.
    """
    if isinstance(event, AgentStateChanged):
        return agent_state_topic(prefix, tenant, event.agent_id)
    if isinstance(event, QueueStats):
        return queue_stats_topic(prefix, tenant, event.queue_id)
    return None


def _dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


class MqttSink:
    """Bus sink publishing every event to MQTT through the durable outbox.

    `broker_address` overrides the host and port of `config.mqtt` (the embedded broker's port is known
    only once it listens). Construction reads the outbox and counters from the store (start-up only);
    events may arrive before `start()` and are published once it runs.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        node_name: str,
        *,
        broker_address: tuple[str, int] | None = None,
        outbox_limit: int = OUTBOX_MAX_EVENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.node = node_name
        self.tenant = config.tenant
        self.prefix = config.mqtt.prefix
        self.host, self.port = broker_address or (config.mqtt.host, config.mqtt.port)
        self.outbox_limit = outbox_limit
        self.clock = clock
        self._outbox = Outbox(store, node_name)

        self._seq = Sequencer()
        self._contacts: dict[str, dict[str, dict[str, Any]]] = {}  # device key -> contact -> entry
        self._ended: dict[str, float] = {}  # subject key -> when its conversation ended
        for subject in self._outbox.load_subjects():
            self._seq.restore(subject.subject_key, subject.seq)
            if subject.state is not None:
                self._contacts[subject.subject_key] = json.loads(subject.state)
            if subject.ended_at is not None:
                self._ended[subject.subject_key] = subject.ended_at

        # Written, not yet acknowledged: outbox id -> message, in id order; `_unsent` is the send cursor.
        self._ready: dict[int, OutboxMessage] = dict(self._outbox.load_pending())
        self._unsent: deque[int] = deque(self._ready)
        self._pending: list[OutboxMessage] = []  # accepted, not yet written
        self._dirty: dict[str, SubjectState] = {}
        self._dropped_subjects: set[str] = set()
        self._acked: list[int] = []
        self._ack_flush: asyncio.TimerHandle | None = None
        #: Called with each event and the envelope it is published in (same `id` and `seq` as on MQTT).
        self.envelope_listeners: list[Callable[[Event, dict[str, Any]], None]] = []
        self._full = False
        self._connected = False
        self._stopping = False
        self._last_prune = clock()

        self._wake_writer = asyncio.Event()
        self._wake_sender = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._update_queued()
        if self._ready:
            log.info("outbox holds events from before the restart", count=len(self._ready))

    # -- the bus side: never blocks, never raises --------------------------------------------------

    def __call__(self, event: Event) -> None:
        try:
            self._accept(event)
        except Exception:
            log.exception("MQTT sink could not queue an event", event_type=event.type)

    @property
    def queued(self) -> int:
        """Messages not yet acknowledged by the broker (written or about to be)."""
        return len(self._pending) + len(self._ready)

    @property
    def connected(self) -> bool:
        return self._connected

    def _accept(self, event: Event) -> None:
        now = self.clock()
        key = subject_key(event)
        seq = self._seq.next(key)
        messages: list[OutboxMessage] = []
        state: str | None = None
        ended_at = self._ended.get(key)

        room = self.queued < self.outbox_limit
        if room:
            envelope = build_envelope(event, node=self.node, tenant=self.tenant, seq=seq, now=now)
            for listener in self.envelope_listeners:  # e.g. the WebSocket agent API: the same envelopes
                try:
                    listener(event, envelope)
                except Exception:
                    log.exception("envelope listener failed", event_type=event.type)
            topic = event_topic(self.prefix, self.tenant, event)
            payload = _dumps(envelope)
            messages.append(OutboxMessage(key, event.type, topic, payload, False, now))
            retained = snapshot_topic(self.prefix, self.tenant, event)
            if retained is not None:
                messages.append(OutboxMessage(key, event.type, retained, payload, True, now))
        else:
            self._outbox_full(event)

        if isinstance(event, DeviceRegistered | DeviceUnregistered):
            contacts = self._device_contacts(key, event, now)
            state = _dumps(contacts) if contacts else None
            if room:
                messages.append(self._registration_snapshot(key, event.user, contacts, seq, now))
        elif isinstance(event, ConversationEnded):
            ended_at = now
            self._ended[key] = now

        if isinstance(event, CdrCreated):
            # The last event of a conversation: its counter goes (conversation ids are never reused).
            self._seq.drop(key)
            self._ended.pop(key, None)
            self._dirty.pop(key, None)
            self._dropped_subjects.add(key)
        else:
            self._dirty[key] = SubjectState(key, seq, state, ended_at)
            self._dropped_subjects.discard(key)

        self._pending.extend(messages)
        self._update_queued()
        self._wake_writer.set()

    def _device_contacts(
        self, key: str, event: DeviceRegistered | DeviceUnregistered, now: float
    ) -> dict[str, dict[str, Any]]:
        contacts = self._contacts.setdefault(key, {})
        if isinstance(event, DeviceRegistered):
            contacts[event.contact] = {
                "contact": event.contact,
                "transport": event.transport,
                "expires": event.expires,
                "registered_at": format_time(now),
                "user_agent": event.user_agent,
                "source": event.source,
            }
        else:
            contacts.pop(event.contact, None)
        if not contacts:
            del self._contacts[key]
        return contacts

    def _registration_snapshot(
        self, key: str, user: str, contacts: dict[str, dict[str, Any]], seq: int, now: float
    ) -> OutboxMessage:
        topic = registration_topic(self.prefix, self.tenant, user)
        if not contacts:
            # A zero-byte retained message removes the retained snapshot (MQTT 3.1.1 §3.3.1.3).
            return OutboxMessage(key, REGISTRATION_SNAPSHOT, topic, "", True, now)
        snapshot = {
            "type": REGISTRATION_SNAPSHOT,
            "source": source_of(self.node),
            "tenant": self.tenant,
            "user": user,
            "time": format_time(now),
            "seq": seq,
            "contacts": sorted(contacts.values(), key=lambda c: str(c["contact"])),
        }
        return OutboxMessage(key, REGISTRATION_SNAPSHOT, topic, _dumps(snapshot), True, now)

    def _outbox_full(self, event: Event) -> None:
        self.metrics.outbox_dropped.labels(type=event.type).inc()
        if not self._full:
            self._full = True
            log.warning(
                "event outbox full: dropping new events until the broker catches up",
                limit=self.outbox_limit,
                event_type=event.type,
            )

    def _update_queued(self) -> None:
        queued = self.queued
        self.metrics.outbox_queued.set(queued)
        if self._full and queued < self.outbox_limit * OUTBOX_RESUME_FRACTION:
            self._full = False
            log.info("event outbox has room again", queued=queued, limit=self.outbox_limit)

    # -- life cycle ---------------------------------------------------------------------------------

    async def start(self, broker_address: tuple[str, int] | None = None) -> None:
        """Start the outbox writer and the broker connection (returns at once; connects in background).

        `broker_address` overrides the one given at construction: the sink can subscribe to the bus
        before the embedded broker is listening, and learn its port here.
        """
        if self._tasks:
            raise RuntimeError("MQTT sink already started")
        if broker_address is not None:
            self.host, self.port = broker_address
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="mqtt-outbox-writer"),
            asyncio.create_task(self._connection_loop(), name="mqtt-connection"),
        ]
        self._wake_writer.set()
        log.info("MQTT sink started", host=self.host, port=self.port, tls=self.config.mqtt.tls)

    async def stop(self) -> None:
        """Give a connected broker `STOP_DRAIN_TIMEOUT_S` to take the backlog, then stop; whatever is
        still unacknowledged stays in the outbox for the next start."""
        if not self._tasks:
            return
        deadline = time.monotonic() + STOP_DRAIN_TIMEOUT_S
        while self.queued and self._connected and time.monotonic() < deadline:
            await asyncio.sleep(WRITE_BATCH_DELAY_S)
        writer, connection = self._tasks
        self._tasks = []
        connection.cancel()
        # The writer is never cancelled inside a transaction: it finishes the batch at hand and returns.
        self._stopping = True
        self._wake_writer.set()
        await asyncio.gather(connection, writer, return_exceptions=True)
        # Make everything accepted durable and forget what was acknowledged.
        for _ in range(len(self._pending) // MAX_WRITE_BATCH + 2):
            if not (self._pending or self._acked or self._dirty or self._dropped_subjects):
                break
            if not await self._flush():
                break
        self._set_connected(False)
        log.info("MQTT sink stopped", queued=self.queued)

    # -- writer: the outbox in batches ----------------------------------------------------------------

    async def _write_loop(self) -> None:
        while not self._stopping:
            await self._wake_writer.wait()
            await asyncio.sleep(WRITE_BATCH_DELAY_S)
            self._wake_writer.clear()
            if not await self._flush():
                await asyncio.sleep(WRITE_RETRY_S)
            if self._pending:
                self._wake_writer.set()
            now = self.clock()
            if now - self._last_prune >= PRUNE_INTERVAL_S:
                self._last_prune = now
                self._prune_ended(now)

    def _flush_acks(self) -> None:
        self._ack_flush = None
        if self._acked:
            self._wake_writer.set()

    async def _flush(self) -> bool:
        """Write one batch (new messages, acknowledged ids, counters) in one transaction."""
        if self._ack_flush is not None:
            self._ack_flush.cancel()
            self._ack_flush = None
        batch = self._pending[:MAX_WRITE_BATCH]
        del self._pending[: len(batch)]
        acked, self._acked = self._acked, []
        dirty, self._dirty = self._dirty, {}
        dropped, self._dropped_subjects = self._dropped_subjects, set()
        try:
            ids = await asyncio.to_thread(self._outbox.apply, batch, acked, list(dirty.values()), dropped)
        except Exception:
            log.exception("event outbox write failed; retrying", messages=len(batch))
            self._pending[:0] = batch
            self._acked[:0] = acked
            for key, state in dirty.items():
                if key not in self._dropped_subjects:
                    self._dirty.setdefault(key, state)
            self._dropped_subjects |= {k for k in dropped if k not in self._dirty}
            return False
        for msg_id, message in zip(ids, batch, strict=True):
            self._ready[msg_id] = message
            self._unsent.append(msg_id)
        if batch:
            self._wake_sender.set()
        self._update_queued()
        return True

    def _prune_ended(self, now: float) -> None:
        for key, ended_at in list(self._ended.items()):
            if now - ended_at >= ENDED_SUBJECT_RETENTION_S:
                del self._ended[key]
                self._seq.drop(key)
                self._dirty.pop(key, None)
                self._dropped_subjects.add(key)
        if self._dropped_subjects:
            self._wake_writer.set()

    # -- connection: pipelined QoS 1 publishing -------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        mqtt = self.config.mqtt
        username = unquote(mqtt.username) if mqtt.username is not None else None
        password = unquote(mqtt.password) if mqtt.password is not None else None
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=username,
            password=password,
            identifier=f"softswitch-{self.node}",
            clean_session=True,
            keepalive=KEEPALIVE_S,
            timeout=CONNECT_TIMEOUT_S,
            max_inflight_messages=MAX_IN_FLIGHT,
            tls_context=ssl.create_default_context() if mqtt.tls else None,
        )
        # aiomqtt warns past this many unacknowledged calls; ours are bounded by the window instead.
        client.pending_calls_threshold = MAX_IN_FLIGHT
        return client

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        self.metrics.mqtt_connected.set(1 if connected else 0)

    async def _connection_loop(self) -> None:
        backoff = RECONNECT_MIN_S
        reported = False
        while True:
            try:
                async with self._client() as client:
                    self._set_connected(True)
                    backoff = RECONNECT_MIN_S
                    reported = False
                    log.info("MQTT broker connected", host=self.host, port=self.port, backlog=self.queued)
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                if not reported:  # one line per outage, not one per attempt
                    log.warning(
                        "MQTT broker unavailable; events queue in the outbox",
                        host=self.host,
                        port=self.port,
                        error=str(exc),
                        queued=self.queued,
                    )
                    reported = True
            finally:
                self._set_connected(False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish until the connection breaks (then raise MqttError)."""
        self._unsent = deque(self._ready)  # everything unacknowledged, again, in order
        failed = asyncio.Event()
        in_flight: dict[asyncio.Task[None], float] = {}  # publish task -> when it was sent (monotonic)
        tasks = [
            asyncio.create_task(self._send_loop(client, in_flight, failed)),
            asyncio.create_task(self._watch(client)),
            asyncio.create_task(self._watch_acks(in_flight, failed)),
            asyncio.create_task(failed.wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*tasks, *in_flight):
                task.cancel()
            await asyncio.gather(*tasks, *in_flight, return_exceptions=True)
        for task in tasks[:2]:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise aiomqtt.MqttError(f"connection lost: {task.exception()}")
        raise aiomqtt.MqttError("connection lost")

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Returns or raises when the connection goes (the message iterator ends on disconnection)."""
        async for _ in client.messages:
            pass

    async def _watch_acks(self, in_flight: dict[asyncio.Task[None], float], failed: asyncio.Event) -> None:
        """Declare the connection broken when the oldest PUBLISH waited `PUBACK_TIMEOUT_S` for its PUBACK
        (one timer for the whole window instead of one per message)."""
        while True:
            await asyncio.sleep(PUBACK_TIMEOUT_S / 10)
            oldest = next(iter(in_flight.values()), None)  # dicts keep insertion (= send) order
            if oldest is not None and time.monotonic() - oldest > PUBACK_TIMEOUT_S:
                log.warning("MQTT broker stopped acknowledging; reconnecting", in_flight=len(in_flight))
                failed.set()
                return

    async def _send_loop(
        self, client: aiomqtt.Client, in_flight: dict[asyncio.Task[None], float], failed: asyncio.Event
    ) -> None:
        window = asyncio.Semaphore(MAX_IN_FLIGHT)
        while True:
            if not self._unsent:
                self._wake_sender.clear()
                await self._wake_sender.wait()
                continue
            await window.acquire()
            if not self._unsent:
                window.release()
                continue
            msg_id = self._unsent.popleft()
            message = self._ready.get(msg_id)
            if message is None:  # acknowledged meanwhile (a resend after reconnecting)
                window.release()
                continue
            task = asyncio.create_task(self._publish(client, msg_id, message, window, failed))
            in_flight[task] = time.monotonic()
            task.add_done_callback(in_flight.pop)

    async def _publish(
        self,
        client: aiomqtt.Client,
        msg_id: int,
        message: OutboxMessage,
        window: asyncio.Semaphore,
        failed: asyncio.Event,
    ) -> None:
        try:
            await client.publish(
                message.topic,
                message.payload.encode(),
                qos=1,
                retain=message.retain,
                timeout=math.inf,  # _watch_acks bounds the wait
            )
        except aiomqtt.MqttError as exc:
            log.debug("MQTT publish failed", topic=message.topic, error=str(exc))
            failed.set()
        else:
            if self._ready.pop(msg_id, None) is not None:
                self._acked.append(msg_id)
                self.metrics.mqtt_published.labels(type=message.event_type).inc()
                self._update_queued()
                if self._ack_flush is None:
                    self._ack_flush = asyncio.get_running_loop().call_later(
                        ACK_FLUSH_DELAY_S, self._flush_acks
                    )
        finally:
            window.release()
