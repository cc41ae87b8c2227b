"""CDRs from real call control on a real EventBus into a real store (an SQLite file on disk).

Media workers are played by a script at the worker protocol boundary (as in test_call_control.py); call
control, the bus, the CDR builder and the store are the production code. The `store_url` fixture is the
only seam: tests/integration/test_cdr_store.py runs these same tests against PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
import structlog

from softswitch.calls.cdr import ByeType, CdrBuilder, derive_bye_type, recover_open_cdrs
from softswitch.calls.control import CallControl
from softswitch.dialplan import actions
from softswitch.events.bus import EventBus
from softswitch.events.types import CallEnded, CdrCreated, ConversationEnded, Event
from softswitch.media.protocol import Command, LegIncoming, LegState, Originate
from softswitch.media.protocol import Event as MediaEvent
from softswitch.store.cdr import (
    MAX_PAGE_SIZE,
    ConversationRecord,
    LegRecord,
    cdrs_by_sip_call_id,
    close_conversation,
    ensure_schema,
    get_cdr,
    list_cdrs,
    open_conversation,
    open_conversation_ids,
)
from softswitch.store.db import Store

pytestmark = pytest.mark.timeout(30)

#: How long a test waits for the writer to commit and publish: far above a local commit (~ms).
WAIT_S = 10.0
#: Backoff for the retry test: short, so a recovered store is used again quickly.
TEST_RETRY_S = 0.02
T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z: a fixed start for the clock


class Clock:
    """The time both call control and the builder read; tests step it."""

    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class ScriptedMedia:
    """Plays the media worker: accepts every command, lets the test emit the worker's leg events."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.callback: Callable[[str, MediaEvent], None] | None = None

    async def command(self, worker_id: str, cmd: Command, timeout_s: float = 5.0) -> dict[str, Any]:
        self.commands.append(cmd)
        return {}

    def subscribe(self, callback: Callable[[str, MediaEvent], None]) -> None:
        self.callback = callback

    def emit(self, event: MediaEvent) -> None:
        assert self.callback is not None
        self.callback("w1", event)


class Plan:
    def route(self, number: str, *, caller: str = "") -> actions.Action | None:
        if number.startswith("1"):
            return actions.Dial(target=number, timeout_s=20, max_duration_s=0.2 if number == "1004" else None)
        return None


CALLER = "w1-1"


class Switch:
    """Call control, bus and CDR builder wired as the node wires them."""

    def __init__(self, store: Store, *, retry_s: float = TEST_RETRY_S) -> None:
        self.clock = Clock()
        self.media = ScriptedMedia()
        self.bus = EventBus()
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.control = CallControl(
            self.media, Plan(), self.bus,
            users={"1001": "Alice", "1002": "Bob", "1003": "Carol", "1004": "Dave"},
            has_binding=lambda u: u in {"1002", "1004"}, domain="127.0.0.1", clock=self.clock,
        )  # fmt: skip
        self.control.start()
        self.builder = CdrBuilder(store, self.bus, self.clock, retry_initial_s=retry_s, retry_max_s=retry_s)
        self.builder.start()

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def incoming(self, number: str) -> str | None:
        """A call from 1001 to `number`; the callee leg's id when call control dialed one."""
        self.media.emit(
            LegIncoming(
                leg=CALLER, sip_call_id="sip-caller", from_uri="sip:1001@127.0.0.1", from_display="Alice",
                to_uri=f"sip:{number}@127.0.0.1", request_uri=f"sip:{number}@127.0.0.1", identity="1001",
                headers={},
            )
        )  # fmt: skip
        await self.settle()
        orig = [c for c in self.media.commands if isinstance(c, Originate)]
        return orig[-1].leg if orig else None

    async def state(self, leg: str, state: str, code: int = 0, by: str = "", after: float = 0.0) -> None:
        self.clock.advance(after)
        sip_call_id = "sip-caller" if leg == CALLER else "sip-callee"
        self.media.emit(
            LegState(leg=leg, state=state, sip_code=code, reason="", sip_call_id=sip_call_id, released_by=by)
        )
        await self.settle()

    async def cdr_created(self) -> CdrCreated:
        async def wait() -> CdrCreated:
            while True:
                found = [e for e in self.events if isinstance(e, CdrCreated)]
                if found:
                    return found[-1]
                await asyncio.sleep(0.005)

        return await asyncio.wait_for(wait(), WAIT_S)

    async def drained(self) -> None:
        async def wait() -> None:
            while self.builder.pending:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(wait(), WAIT_S)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/cdr.db"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    ensure_schema(s)
    yield s
    s.close()


@pytest.fixture
async def switch(store: Store) -> Any:
    sw = Switch(store)
    yield sw
    await sw.builder.stop()


def as_cdr(event: CdrCreated) -> dict[str, Any]:
    """The CDR of a `cdr.created` event, for indexing into."""
    return cast(dict[str, Any], event.cdr)


def legs_by_role(cdr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {leg["role"]: leg for leg in cdr["legs"]}


# -- the documented sequences -----------------------------------------------------------------------


async def test_answered_call_released_by_the_callee(switch: Switch, store: Store) -> None:
    b = await switch.incoming("1002")
    assert b is not None
    await switch.state(b, "ringing", 180, after=0.5)
    await switch.state(b, "confirmed", 200, after=3.0)
    await switch.state(CALLER, "confirmed", 200)
    await switch.state(b, "disconnected", 200, by="remote", after=14.0)
    await switch.state(CALLER, "disconnected", 200, by="local", after=0.1)
    event = await switch.cdr_created()
    cdr = as_cdr(event)
    conv = cdr["conversation"]
    assert event.conversation_id == conv["conversation_id"] == cdr["conversationSid"]
    assert conv["status"] == "closed" and conv["final_status"] == "completed"
    assert conv["bye_type"] == ByeType.CALLEE_HUNG_UP and cdr["byeType"] == "4"
    assert conv["released_by"] == "remote" and conv["released_by_role"] == "callee"
    assert (conv["from"], conv["to"], conv["direction"]) == ("1001", "1002", "inbound")
    assert conv["sip_call_id"] == "sip-caller" and conv["sip_code"] == 200
    assert conv["start_time"] == "2026-11-18T11:06:40.000Z"
    assert conv["ring_time"] == "2026-11-18T11:06:40.500Z"
    assert conv["answer_time"] == "2026-11-18T11:06:43.500Z"
    assert conv["end_time"] == "2026-11-18T11:06:57.600Z"
    assert (conv["ring_s"], conv["talk_s"], conv["duration_s"]) == (3.0, 14.1, 17.6)
    assert conv["leg_count"] == 2 and conv["recording_url"] is None
    legs = legs_by_role(cdr)
    assert legs["caller"]["seq"] == 0 and legs["callee"]["seq"] == 1
    assert legs["callee"]["call_id"] == b and legs["callee"]["sip_call_id"] == "sip-callee"
    assert legs["callee"]["direction"] == "outbound" and legs["callee"]["user"] == "1002"
    assert (legs["callee"]["final_status"], legs["callee"]["released_by"]) == ("completed", "remote")
    assert (legs["caller"]["final_status"], legs["caller"]["released_by"]) == ("completed", "local")
    assert legs["callee"]["talk_s"] == 14.0 and legs["callee"]["ring_s"] == 3.0
    # The seed's push shape.
    seed_callee = cdr["cdrs"][1]
    assert seed_callee == {
        "callSeq": "1", "callSid": b, "from": "1001", "to": "1002",
        "startTime": "20261118110640", "ringTime": "20261118110640", "answerTime": "20261118110643",
        "stopTime": "20261118110657", "duration": "14", "cause": "completed",
    }  # fmt: skip
    assert json.loads(json.dumps(cdr)) == cdr  # plain JSON values only, ready for MQTT and HTTP
    # What was pushed is what the store returns.
    assert get_cdr(store, conv["conversation_id"]) == cdr
    assert [c["conversationSid"] for c in cdrs_by_sip_call_id(store, "sip-callee")] == [
        cdr["conversationSid"]
    ]
    assert open_conversation_ids(store) == []
    assert switch.builder.in_progress == 0


async def test_answered_call_released_by_the_caller(switch: Switch) -> None:
    b = await switch.incoming("1002")
    assert b is not None
    await switch.state(b, "confirmed", 200, after=1.0)
    await switch.state(CALLER, "confirmed", 200)
    await switch.state(CALLER, "disconnected", 200, by="remote", after=5.0)
    await switch.state(b, "disconnected", 200, by="local")
    conv = as_cdr(await switch.cdr_created())["conversation"]
    assert conv["bye_type"] == ByeType.CALLER_HUNG_UP
    assert (conv["released_by"], conv["released_by_role"]) == ("remote", "caller")
    assert conv["talk_s"] == 5.0 and conv["ring_s"] == 0.0 and conv["ring_time"] is None


@pytest.mark.parametrize(
    ("code", "status", "caller_code"),
    [(486, "busy", 486), (408, "no_answer", 480), (603, "rejected", 603)],
)
async def test_callee_busy_or_no_answer(switch: Switch, code: int, status: str, caller_code: int) -> None:
    b = await switch.incoming("1002")
    assert b is not None
    await switch.state(b, "ringing", 180, after=0.2)
    await switch.state(b, "disconnected", code, by="remote", after=20.0)
    await switch.state(CALLER, "disconnected", caller_code, by="local")
    cdr = as_cdr(await switch.cdr_created())
    conv = cdr["conversation"]
    assert conv["bye_type"] == ByeType.CALLEE_UNANSWERED and cdr["byeType"] == "2"
    assert conv["final_status"] == status and conv["sip_code"] == caller_code
    assert conv["answer_time"] is None and conv["talk_s"] == 0.0 and conv["ring_s"] == 20.0
    legs = legs_by_role(cdr)
    assert legs["callee"]["final_status"] == status and legs["callee"]["sip_code"] == code
    assert cdr["cdrs"][1]["answerTime"] == "" and cdr["cdrs"][1]["duration"] == "0"
    if status == "no_answer":
        assert cdr["cdrs"][1]["cause"] == "no-answer"


@pytest.mark.parametrize(("callee_rang", "bye_type"), [(True, 1), (False, 0)])
async def test_caller_cancel(switch: Switch, callee_rang: bool, bye_type: int) -> None:
    b = await switch.incoming("1002")
    assert b is not None
    if callee_rang:
        await switch.state(b, "ringing", 180, after=0.3)
    await switch.state(CALLER, "disconnected", 487, by="remote", after=4.0)
    await switch.state(b, "disconnected", 487, by="local")
    cdr = as_cdr(await switch.cdr_created())
    conv = cdr["conversation"]
    assert conv["bye_type"] == bye_type and cdr["byeType"] == str(bye_type)
    assert conv["final_status"] == "canceled"
    assert (conv["released_by"], conv["released_by_role"]) == ("remote", "caller")
    assert {leg["final_status"] for leg in cdr["legs"]} == {"canceled"}


async def test_number_not_found_is_a_caller_unanswered_single_leg(switch: Switch) -> None:
    assert await switch.incoming("5555") is None
    await switch.state(CALLER, "disconnected", 404, by="local")
    cdr = as_cdr(await switch.cdr_created())
    assert cdr["conversation"]["bye_type"] == ByeType.CALLER_UNANSWERED
    assert cdr["conversation"]["final_status"] == "rejected" and cdr["conversation"]["sip_code"] == 404
    assert [leg["role"] for leg in cdr["legs"]] == ["caller"]


async def test_time_limit(switch: Switch) -> None:
    b = await switch.incoming("1004")
    assert b is not None
    await switch.state(b, "confirmed", 200)
    await switch.state(CALLER, "confirmed", 200)
    await asyncio.sleep(0.3)  # the plan's 0.2 s limit fires; call control hangs up both legs
    await switch.settle()
    await switch.state(b, "disconnected", 200, by="local", after=0.2)
    await switch.state(CALLER, "disconnected", 200, by="local")
    cdr = as_cdr(await switch.cdr_created())
    assert cdr["conversation"]["bye_type"] == ByeType.TIME_LIMIT and cdr["byeType"] == "5"
    assert {(leg["final_status"], leg["released_by"]) for leg in cdr["legs"]} == {("time_limit", "system")}
    assert cdr["cdrs"][0]["cause"] == "time-limit"


async def test_worker_failure_after_answer(switch: Switch) -> None:
    b = await switch.incoming("1002")
    assert b is not None
    await switch.state(b, "confirmed", 200)
    await switch.state(CALLER, "confirmed", 200)
    await switch.state(b, "disconnected", 500, by="system", after=2.0)
    await switch.state(CALLER, "disconnected", 500, by="system")
    cdr = as_cdr(await switch.cdr_created())
    conv = cdr["conversation"]
    assert conv["final_status"] == "failed" and conv["released_by"] == "system"
    assert conv["bye_type"] == ByeType.CALLEE_HUNG_UP  # the callee's side (its leg) went first
    assert {(leg["final_status"], leg["released_by"]) for leg in cdr["legs"]} == {("failed", "system")}


async def test_worker_failure_before_answer_is_callee_unanswered(switch: Switch) -> None:
    b = await switch.incoming("1002")
    assert b is not None
    await switch.state(b, "ringing", 180)
    await switch.state(b, "disconnected", 500, by="system", after=1.0)
    await switch.state(CALLER, "disconnected", 500, by="system")
    conv = as_cdr(await switch.cdr_created())["conversation"]
    assert conv["bye_type"] == ByeType.CALLEE_UNANSWERED and conv["final_status"] == "failed"


async def test_events_after_the_end_change_nothing(switch: Switch, store: Store) -> None:
    b = await switch.incoming("1002")
    assert b is not None
    await switch.state(b, "disconnected", 486, by="remote")
    await switch.state(CALLER, "disconnected", 486, by="local")
    first = await switch.cdr_created()
    late = [e for e in switch.events if isinstance(e, (CallEnded, ConversationEnded))]
    for event in late:  # replayed: a stray leg end and a second conversation.ended
        switch.bus.publish(event)
    await switch.drained()
    assert [e for e in switch.events if isinstance(e, CdrCreated)] == [first]
    assert get_cdr(store, first.conversation_id) == as_cdr(first)
    assert switch.builder.in_progress == 0


def test_bye_type_table_without_legs_or_ends() -> None:
    leg = LegRecord("CV1", "L1", 0, "s", "1001", "1002", "inbound", "caller", T0)
    assert derive_bye_type([], None) == ByeType.CALLER_UNANSWERED
    assert derive_bye_type([leg], None) == ByeType.CALLER_UNANSWERED
    callee = LegRecord("CV1", "L2", 1, "s2", "1001", "1002", "outbound", "callee", T0)
    assert derive_bye_type([leg, callee], None) == ByeType.CALLEE_UNANSWERED


# -- crash safety -----------------------------------------------------------------------------------


async def test_conversation_is_open_in_the_store_while_the_call_lasts(switch: Switch, store: Store) -> None:
    b = await switch.incoming("1002")
    assert b is not None
    await switch.drained()
    [open_id] = open_conversation_ids(store)
    cdr = get_cdr(store, open_id)
    assert cdr is not None and cdr["conversation"]["status"] == "open"
    # Every leg as soon as it exists: the caller's, and the callee's being originated.
    assert [leg["call_id"] for leg in cdr["legs"]] == [CALLER, b]
    assert all(leg["end_time"] is None and leg["answer_time"] is None for leg in cdr["legs"])
    await switch.state(b, "confirmed", 200)
    await switch.drained()
    cdr = get_cdr(store, open_id)
    assert cdr is not None and cdr["legs"][1]["answer_time"] is not None  # answered: on record at once
    assert list_cdrs(store, start=0, end=T0 + 60)["total"] == 0  # open records are not listed…
    assert list_cdrs(store, start=0, end=T0 + 60, include_open=True)["total"] == 1  # …unless asked


def test_a_failed_close_leaves_the_conversation_open_not_half_written(store: Store) -> None:
    conv = ConversationRecord("CVx", "sip-x", "1001", "1002", "inbound", T0)
    first = LegRecord("CVx", CALLER, 0, "sip-x", "1001", "1002", "inbound", "caller", T0)
    open_conversation(store, conv, first)
    final = ConversationRecord(
        "CVx", "sip-x", "1001", "1002", "inbound", T0, status="closed", ended_at=T0 + 9,
        final_status="completed", bye_type=3, leg_count=2,
    )  # fmt: skip
    callee = LegRecord("CVx", "L2", 1, "sip-y", "1001", "1002", "outbound", "callee", T0)
    # The same leg twice violates the key on the second insert, after the conversation row was updated.
    with pytest.raises(sa.exc.IntegrityError):
        close_conversation(store, final, [first, callee, callee])
    cdr = get_cdr(store, "CVx")
    assert cdr is not None
    assert cdr["conversation"]["status"] == "open" and cdr["conversation"]["final_status"] == ""
    assert [leg["call_id"] for leg in cdr["legs"]] == [CALLER]
    close_conversation(store, final, [first, callee])  # and the write can be made again
    cdr = get_cdr(store, "CVx")
    assert cdr is not None and cdr["conversation"]["status"] == "closed" and len(cdr["legs"]) == 2


async def test_a_failed_write_is_retried_until_the_store_takes_it(switch: Switch, store: Store) -> None:
    with store.transaction() as conn:
        conn.execute(sa.text("ALTER TABLE cdr_legs RENAME TO cdr_legs_away"))
    b = await switch.incoming("1002")
    assert b is not None
    await switch.state(b, "confirmed", 200)
    await switch.state(CALLER, "confirmed", 200)
    await switch.state(b, "disconnected", 200, by="remote", after=3.0)
    await switch.state(CALLER, "disconnected", 200, by="local")
    await asyncio.sleep(0.2)  # several retries fail meanwhile
    assert not [e for e in switch.events if isinstance(e, CdrCreated)]
    # The open, the callee's leg, both answers and the close, in order.
    assert switch.builder.pending == 5
    with store.transaction() as conn:
        conn.execute(sa.text("ALTER TABLE cdr_legs_away RENAME TO cdr_legs"))
    cdr = as_cdr(await switch.cdr_created())
    stored = get_cdr(store, cdr["conversationSid"])
    assert stored == cdr and stored["conversation"]["bye_type"] == ByeType.CALLEE_HUNG_UP


async def test_stop_flushes_pending_writes(store: Store) -> None:
    sw = Switch(store)
    b = await sw.incoming("1002")
    assert b is not None
    await sw.state(b, "disconnected", 486, by="remote")
    await sw.state(CALLER, "disconnected", 486, by="local")
    await sw.builder.stop()  # straight away: the writer may not have run yet
    [cdr] = list_cdrs(store, start=0, end=T0 + 60)["items"]
    assert cdr["conversation"]["final_status"] == "busy"


async def test_stop_is_bounded_and_logs_what_the_store_did_not_take(store: Store) -> None:
    sw = Switch(store)
    with store.transaction() as conn:
        conn.execute(sa.text("ALTER TABLE cdr_legs RENAME TO cdr_legs_away"))
    b = await sw.incoming("1002")
    assert b is not None
    await sw.state(b, "disconnected", 486, by="remote")
    await sw.state(CALLER, "disconnected", 486, by="local")
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(sw.builder.stop(timeout_s=0.2), WAIT_S)
    lost = [e for e in logs if e["event"] == "CDR write not stored at stop"]
    assert len(lost) == 3 and {e["log_level"] for e in lost} == {"error"}  # open, callee leg, close
    assert lost[-1]["record"]["conversation"]["final_status"] == "busy"  # the full record is in the log
    assert not [e for e in sw.events if isinstance(e, CdrCreated)]


async def test_recovery_closes_what_a_crash_left_open(store_url: str) -> None:
    before = Store(store_url)
    sw = Switch(before)
    b = await sw.incoming("1002")
    assert b is not None
    await sw.state(b, "confirmed", 200)
    await sw.state(CALLER, "confirmed", 200)
    await sw.drained()
    finished = closed(before, 7, T0 - 50)  # a finished conversation, which recovery leaves alone
    await sw.builder.stop()  # the process dies: the live call's record stays open
    before.close()

    after = Store(store_url)
    try:
        events = recover_open_cdrs(after, now=T0 + 100)
        [event] = events
        conv = as_cdr(event)["conversation"]
        assert conv["status"] == "closed" and conv["final_status"] == "failed"
        assert (
            conv["released_by"] == "system" and conv["bye_type"] is None and as_cdr(event)["byeType"] is None
        )
        assert conv["end_time"] == "2026-11-18T11:08:20.000Z" and conv["duration_s"] == 100.0
        caller, callee = as_cdr(event)["legs"]
        assert (caller["call_id"], callee["call_id"]) == (CALLER, b)
        for leg in (caller, callee):
            assert (leg["final_status"], leg["released_by"]) == ("failed", "system"), leg
            # Answered before the crash: the talk time runs to the recovery (an upper bound).
            assert leg["answer_time"] is not None and leg["talk_s"] > 0, leg
        assert get_cdr(after, event.conversation_id) == as_cdr(event)
        assert recover_open_cdrs(after, now=T0 + 200) == []  # nothing left open
        untouched = get_cdr(after, finished)
        assert untouched is not None and untouched["conversation"]["end_time"] == "2026-11-18T11:05:55.000Z"
    finally:
        after.close()


# -- queries ----------------------------------------------------------------------------------------


def closed(store: Store, n: int, started_at: float, sip: str = "") -> str:
    cid = f"CV{n:04d}"
    sip_call_id = sip or f"sip-{n}"
    conv = ConversationRecord(
        cid, sip_call_id, "1001", "1002", "inbound", started_at, status="closed", ended_at=started_at + 5,
        final_status="completed", bye_type=3, leg_count=2, duration_s=5.0,
    )  # fmt: skip
    close_conversation(
        store,
        conv,
        [
            LegRecord(cid, f"L{n}a", 0, sip_call_id, "1001", "1002", "inbound", "caller", started_at),
            LegRecord(cid, f"L{n}b", 1, f"{sip_call_id}-b", "1001", "1002", "outbound", "callee", started_at),
        ],
    )
    return cid


def test_pages_walk_a_time_range_once_in_a_stable_order(store: Store) -> None:
    # 25 conversations in range, several sharing a start second (the id breaks the tie), 2 outside it.
    ids = [closed(store, n, T0 + (n // 3)) for n in range(25)]
    closed(store, 900, T0 - 1)
    closed(store, 901, T0 + 100)
    pages = [list_cdrs(store, start=T0, end=T0 + 100, page=p, page_size=10) for p in (1, 2, 3, 4)]
    assert [len(p["items"]) for p in pages] == [10, 10, 5, 0]
    assert {p["total"] for p in pages} == {25}
    walked = [c["conversationSid"] for p in pages for c in p["items"]]
    assert walked == ids
    again = list_cdrs(store, start=T0, end=T0 + 100, page=2, page_size=10)
    assert again == pages[1]
    assert all(len(c["legs"]) == 2 for c in pages[0]["items"])


def test_query_arguments_are_checked(store: Store) -> None:
    with pytest.raises(ValueError, match="page"):
        list_cdrs(store, start=0, end=1, page=0)
    with pytest.raises(ValueError, match="page_size"):
        list_cdrs(store, start=0, end=1, page_size=MAX_PAGE_SIZE + 1)


def test_lookup_by_conversation_and_sip_call_id(store: Store) -> None:
    cid = closed(store, 1, T0, sip="dup@127.0.0.1")
    other = closed(store, 2, T0 + 1, sip="dup@127.0.0.1")  # a Call-ID seen twice
    assert get_cdr(store, "CVnone") is None
    cdr = get_cdr(store, cid)
    assert cdr is not None and [leg["call_id"] for leg in cdr["legs"]] == ["L1a", "L1b"]
    assert [c["conversationSid"] for c in cdrs_by_sip_call_id(store, "dup@127.0.0.1")] == [cid, other]
    assert [c["conversationSid"] for c in cdrs_by_sip_call_id(store, "dup@127.0.0.1-b")] == [cid, other]
    assert cdrs_by_sip_call_id(store, "unknown") == []
