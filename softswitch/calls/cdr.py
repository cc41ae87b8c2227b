"""The CDR builder: a bus sink that turns call events into call detail records (docs/cdr.md).

It keeps each conversation's legs in memory as the events arrive (`call.initiated`, `call.ringing`,
`call.answered`, `call.ended`, EVENTS.md) and writes twice per conversation, never on the event loop:

1. at the first `call.initiated`, the conversation row with status `open` (crash safety);
2. at `conversation.ended`, every leg row and the final conversation row in one transaction, then
   `cdr.created` with the full record on the bus.

Writes go through one ordered writer task (`asyncio.to_thread` per write), so a conversation's open
write always precedes its close. A failed write is retried with exponential backoff until the store
takes it: a CDR is never dropped because the database was briefly away. At start-up,
`recover_open_cdrs` closes what a crash left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import sqlalchemy as sa
import structlog

from softswitch.events.bus import EventBus
from softswitch.events.types import (
    CallAnswered,
    CallEnded,
    CallEvent,
    CallInitiated,
    CallRinging,
    CdrCreated,
    ConversationEnded,
    Event,
)
from softswitch.store.cdr import (
    STATUS_CLOSED,
    Cdr,
    ConversationRecord,
    LegRecord,
    close_conversation,
    close_open_conversations,
    ensure_schema,
    open_conversation,
    record_open_leg,
)
from softswitch.store.db import Store

log = structlog.get_logger(__name__)

#: First pause after a failed write: an SQLite lock or a dropped PostgreSQL connection usually clears
#: within tens of milliseconds.
RETRY_INITIAL_S = 0.05
#: Longest pause between retries, so a store that comes back is used again within seconds.
RETRY_MAX_S = 5.0
#: How long `stop()` waits for pending writes. What is still pending stays `open` in the store (or was
#: never opened) and is closed by `recover_open_cdrs` at the next start.
FLUSH_TIMEOUT_S = 10.0
#: Pending writes above which a warning is logged. Nothing is dropped above it (a CDR is billing data);
#: a pending close holds about 2 KB, so this is ~20 MB of memory while the store is away.
BACKLOG_WARN = 10_000
#: Conversations remembered as ended, so that a stray late call event does not reopen one: at a few
#: hundred calls a second this covers far more than any reordering on the in-process bus.
RECENTLY_ENDED_MAX = 10_000


class ByeType(enum.IntEnum):
    """The seed's 挂机类型 (byeType) of a conversation; docs/cdr.md has the derivation table."""

    CALLER_UNANSWERED = 0  # 主叫未应答: the caller's call was never put through
    CALLER_HUNG_UP_WHILE_CALLING = 1  # 呼被叫时主叫挂机: the caller gave up while the callee rang
    CALLEE_UNANSWERED = 2  # 被叫未应答: the callee was busy, did not answer, rejected, failed
    CALLER_HUNG_UP = 3  # 主叫挂机: after answer, the caller's side ended it
    CALLEE_HUNG_UP = 4  # 被叫挂机: after answer, the callee's side ended it
    TIME_LIMIT = 5  # 通话时长达到上限结束: the conversation reached its maximum duration


def derive_bye_type(legs: Sequence[LegRecord], first_ended: LegRecord | None) -> ByeType:
    """The seed's byeType from the legs of an ended conversation and the leg that ended first.

    The first leg to end is the one whose release (by its phone, or by the system) ended the others.
    """
    if any(leg.final_status == "time_limit" for leg in legs):
        return ByeType.TIME_LIMIT
    callees = [leg for leg in legs if leg.role != "caller"]
    answered = any(leg.answered_at is not None for leg in legs)
    if answered:
        if first_ended is not None and first_ended.role == "caller":
            return ByeType.CALLER_HUNG_UP
        return ByeType.CALLEE_HUNG_UP
    if first_ended is not None and first_ended.role == "caller" and first_ended.released_by == "remote":
        if any(leg.ring_at is not None for leg in callees):
            return ByeType.CALLER_HUNG_UP_WHILE_CALLING
        return ByeType.CALLER_UNANSWERED
    return ByeType.CALLEE_UNANSWERED if callees else ByeType.CALLER_UNANSWERED


def recover_open_cdrs(store: Store, now: float) -> list[CdrCreated]:
    """Close the CDRs a crash left open (`failed`, released by `system`); the events to publish.

    Call it at start-up before call control takes calls: every `open` row is then a leftover.
    """
    ensure_schema(store)
    closed = close_open_conversations(store, now)
    for cdr in closed:
        log.warning("closed a CDR left open by a crash", conversation_id=cdr.conversation.conversation_id)
    return [CdrCreated(conversation_id=c.conversation.conversation_id, cdr=c.to_dict()) for c in closed]


# -- in-memory state of conversations in progress ---------------------------------------------------


@dataclass(eq=False)
class _Leg:
    call_id: str
    seq: int
    sip_call_id: str
    from_party: str
    to_party: str
    direction: str
    role: str
    started_at: float
    user_name: str | None = None
    trunk: str | None = None
    ring_at: float | None = None
    answered_at: float | None = None
    ended: CallEnded | None = None
    ended_at: float | None = None
    end_order: int | None = None


@dataclass(eq=False)
class _Conversation:
    conversation_id: str
    started_at: float
    user_data: str | None = None
    legs: dict[str, _Leg] = field(default_factory=dict)
    ends: int = 0


@dataclass(frozen=True, slots=True)
class _OpenWrite:
    conversation: ConversationRecord
    first_leg: LegRecord


@dataclass(frozen=True, slots=True)
class _LegWrite:
    leg: LegRecord


@dataclass(frozen=True, slots=True)
class _CloseWrite:
    cdr: Cdr


_Write = _OpenWrite | _LegWrite | _CloseWrite


class CdrBuilder:
    """Builds and stores a CDR per conversation from the bus; publishes `cdr.created` once it is stored.

    `start()` subscribes to the bus and starts the writer (inside a running event loop);
    `await stop()` unsubscribes and flushes the pending writes.
    """

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        clock: Callable[[], float] = time.time,
        *,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._conversations: dict[str, _Conversation] = {}
        self._recently_ended: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._backlog_warned = False
        self._current: _Write | None = None  # the write being committed
        ensure_schema(store)

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._run_writer())
        self._unsubscribe = self.bus.subscribe(self.on_event)

    async def stop(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._writer is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            # The store is down at shutdown. Keep each record in the log; a committed open row is closed
            # by recovery at the next start.
            unwritten = [self._current] if self._current is not None else []
            while not self._queue.empty():
                unwritten.append(self._queue.get_nowait())
                self._queue.task_done()
            for write in unwritten:
                log.error(
                    "CDR write not stored at stop",
                    conversation_id=_conversation_id(write),
                    record=_describe(write),
                )
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None

    @property
    def pending(self) -> int:
        """Writes accepted but not yet committed."""
        return self._queue.qsize() + (1 if self._current is not None else 0)

    @property
    def in_progress(self) -> int:
        """Conversations seen but not yet ended."""
        return len(self._conversations)

    # -- the sink ---------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Bus sink: update the in-memory record; never blocks on the store."""
        if isinstance(event, ConversationEnded):
            self._conversation_ended(event)
        elif isinstance(event, CallEvent):
            self._call_event(event)

    def _call_event(self, event: CallEvent) -> None:
        now = self.clock()
        if event.conversation_id in self._recently_ended:
            log.warning("call event after its conversation ended", conversation_id=event.conversation_id,
                        event_type=event.type)  # fmt: skip
            return
        conv = self._conversations.get(event.conversation_id)
        new_conversation = conv is None
        if conv is None:
            conv = self._conversations[event.conversation_id] = _Conversation(event.conversation_id, now)
        if conv.user_data is None and event.user_data is not None:
            conv.user_data = event.user_data
        leg = conv.legs.get(event.call_id)
        if leg is None:
            leg = conv.legs[event.call_id] = _Leg(
                call_id=event.call_id,
                seq=len(conv.legs),
                sip_call_id=event.sip_call_id,
                from_party=event.from_,
                to_party=event.to,
                direction=event.direction,
                role=event.role,
                started_at=now,
            )
        if event.sip_call_id and not leg.sip_call_id:
            leg.sip_call_id = event.sip_call_id  # an outbound leg learns its Call-ID after the INVITE
        if isinstance(event, CallInitiated):
            leg.user_name, leg.trunk = event.user, event.trunk
        elif isinstance(event, CallRinging):
            if leg.ring_at is None:
                leg.ring_at = now
        elif isinstance(event, CallAnswered):
            if leg.answered_at is None:
                leg.answered_at = now
        elif isinstance(event, CallEnded) and leg.ended is None:
            leg.ended, leg.ended_at, leg.end_order = event, now, conv.ends
            conv.ends += 1
        if new_conversation:
            record = ConversationRecord(
                conversation_id=conv.conversation_id,
                sip_call_id=leg.sip_call_id,
                from_party=leg.from_party,
                to_party=leg.to_party,
                direction=leg.direction,
                started_at=conv.started_at,
                user_data=conv.user_data,
                leg_count=1,
            )
            self._enqueue(_OpenWrite(record, _leg_record(conv, leg, now, final=False)))
        elif isinstance(event, CallInitiated | CallAnswered):
            # A leg added or answered: on record now, so a crash does not lose it (or its answer time).
            self._enqueue(_LegWrite(_leg_record(conv, leg, now, final=False)))

    def _conversation_ended(self, event: ConversationEnded) -> None:
        now = self.clock()
        if event.conversation_id in self._recently_ended:
            log.warning("conversation ended twice", conversation_id=event.conversation_id)
            return
        conv = self._conversations.pop(event.conversation_id, None)
        self._recently_ended[event.conversation_id] = None
        if len(self._recently_ended) > RECENTLY_ENDED_MAX:
            del self._recently_ended[next(iter(self._recently_ended))]
        if conv is None:
            log.warning("conversation ended without any call event", conversation_id=event.conversation_id)
            conv = _Conversation(event.conversation_id, now)
        self._enqueue(_CloseWrite(build_cdr(conv, event, now)))

    def _enqueue(self, write: _Write) -> None:
        self._queue.put_nowait(write)
        size = self._queue.qsize()
        if size > BACKLOG_WARN and not self._backlog_warned:
            self._backlog_warned = True
            log.warning("CDR writes are backing up: the store is slow or down", pending=size)
        elif size <= BACKLOG_WARN // 2:
            self._backlog_warned = False

    # -- the writer -------------------------------------------------------------------------------

    async def _run_writer(self) -> None:
        while True:
            write = self._current = await self._queue.get()
            try:
                stored = await self._write(write)
                if stored and isinstance(write, _CloseWrite):
                    conversation_id = write.cdr.conversation.conversation_id
                    self.bus.publish(CdrCreated(conversation_id=conversation_id, cdr=write.cdr.to_dict()))
            finally:
                self._current = None
                self._queue.task_done()

    async def _write(self, write: _Write) -> bool:
        """Commit one write, retrying with backoff; False only if the store rejects the record itself."""
        delay = self.retry_initial_s
        attempt = 0
        while True:
            attempt += 1
            try:
                if isinstance(write, _OpenWrite):
                    await asyncio.to_thread(
                        open_conversation, self.store, write.conversation, write.first_leg
                    )
                elif isinstance(write, _LegWrite):
                    await asyncio.to_thread(record_open_leg, self.store, write.leg)
                else:
                    cdr = write.cdr
                    await asyncio.to_thread(close_conversation, self.store, cdr.conversation, cdr.legs)
                return True
            except (sa.exc.IntegrityError, sa.exc.DataError):
                # Retrying cannot fix a record the schema refuses; keep it in the log. The row stays
                # open and recovery closes it at the next start.
                log.exception("CDR write rejected by the store", record=_describe(write))
                return False
            except Exception as exc:
                log.warning(
                    "CDR write failed; retrying",
                    conversation_id=_conversation_id(write),
                    attempt=attempt,
                    retry_in_s=delay,
                    error=repr(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)


def build_cdr(conv: _Conversation, event: ConversationEnded, now: float) -> Cdr:
    """The final records of a conversation from what the builder saw of it."""
    leg_records = tuple(
        _leg_record(conv, leg, now, final=True) for leg in sorted(conv.legs.values(), key=lambda x: x.seq)
    )
    by_id = {record.call_id: record for record in leg_records}
    ended = [leg for leg in conv.legs.values() if leg.end_order is not None]
    first_ended = by_id[min(ended, key=lambda leg: leg.end_order or 0).call_id] if ended else None
    first = leg_records[0] if leg_records else None
    rings = [leg.ring_at for leg in leg_records if leg.ring_at is not None]
    answers = [leg.answered_at for leg in leg_records if leg.answered_at is not None]
    ring_at = min(rings) if rings else None
    answered_at = min(answers) if answers else None
    # The leg whose SIP code the conversation reports: the first other party to answer (the caller is
    # answered by us once the callee did), else the caller, who was told how the call failed.
    main = min(
        (leg for leg in leg_records if leg.answered_at is not None),
        key=lambda leg: (leg.answered_at or 0.0, leg.role == "caller"),
        default=next((leg for leg in leg_records if leg.role == "caller"), first),
    )
    conversation = ConversationRecord(
        conversation_id=conv.conversation_id,
        status=STATUS_CLOSED,
        sip_call_id=first.sip_call_id if first else "",
        from_party=first.from_party if first else "",
        to_party=first.to_party if first else "",
        direction=first.direction if first else "",
        started_at=conv.started_at,
        ring_at=ring_at,
        answered_at=answered_at,
        ended_at=now,
        ring_s=_span(ring_at, answered_at if answered_at is not None else now),
        talk_s=_span(answered_at, now),
        hold_s=max((leg.hold_s for leg in leg_records), default=0.0),
        duration_s=_span(conv.started_at, now),
        final_status=event.final_status,
        sip_code=main.sip_code if main else 0,
        released_by=first_ended.released_by if first_ended else "system",
        released_by_role=first_ended.role if first_ended else "",
        bye_type=int(derive_bye_type(leg_records, first_ended)),
        user_data=conv.user_data,
        leg_count=len(leg_records),
    )
    return Cdr(conversation, leg_records)


def _leg_record(conv: _Conversation, leg: _Leg, now: float, *, final: bool) -> LegRecord:
    base = LegRecord(
        conversation_id=conv.conversation_id,
        call_id=leg.call_id,
        seq=leg.seq,
        sip_call_id=leg.sip_call_id,
        from_party=leg.from_party,
        to_party=leg.to_party,
        direction=leg.direction,
        role=leg.role,
        started_at=leg.started_at,
        user_name=leg.user_name,
        trunk=leg.trunk,
        ring_at=leg.ring_at,
        answered_at=leg.answered_at,
    )
    ended = leg.ended
    if ended is None and not final:
        return base
    if ended is None:
        # A leg with no call.ended by the end of its conversation: the system lost track of it.
        return replace(
            base,
            ended_at=now,
            ring_s=_span(leg.ring_at, leg.answered_at if leg.answered_at is not None else now),
            talk_s=_span(leg.answered_at, now),
            final_status="failed",
            released_by="system",
            cause="no call.ended before conversation.ended",
        )
    return replace(
        base,
        ended_at=leg.ended_at,
        ring_s=ended.ring_s,
        talk_s=ended.talk_s,
        hold_s=ended.hold_s,
        final_status=ended.final_status,
        released_by=ended.released_by,
        sip_code=ended.sip_code,
        cause=ended.cause,
    )


def _span(start: float | None, end: float) -> float:
    return 0.0 if start is None else round(max(0.0, end - start), 3)


def _conversation_id(write: _Write) -> str:
    if isinstance(write, _OpenWrite):
        return write.conversation.conversation_id
    if isinstance(write, _LegWrite):
        return write.leg.conversation_id
    return write.cdr.conversation.conversation_id


def _describe(write: _Write) -> dict[str, object]:
    if isinstance(write, _OpenWrite):
        return {"open": asdict(write.conversation), "first_leg": asdict(write.first_leg)}
    if isinstance(write, _LegWrite):
        return {"open_leg": asdict(write.leg)}
    return write.cdr.to_dict()
