"""The support queue end to end: SIPp customers call 8000, agents logged in over MQTT take the calls on
their SIPp phones (registered as 1001 and 1002), and the agent and queue events tell the story.

- answered: the customer waits with music on hold, agent 8001's phone rings and answers, the two are
  bridged, the customer hangs up, 8001 wraps up and is ready again after `wrap_up_s`;
- not answered: 8001's phone is busy (486), so 8001 goes not_ready with reason `no_answer` and
  `agent.offer_missed`, and 8002's phone rings and takes the call;
- abandoned: the customer hangs up while the agent's phone rings; the offer is withdrawn (CANCEL) and the
  agent is ready again, with no missed offer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DEMO_PASSWORDS
from tests.integration.helpers import RunningSoftswitch, running_softswitch
from tests.integration.peers import Sipp, SippProcess, free_port
from tests.integration.test_cti_mqtt import commander
from tests.integration.test_mqtt_sink import assert_valid_and_gap_free, collecting

pytestmark = pytest.mark.integration

PREFIX = "softswitch/v1/default"
CUSTOMER = "1003"
QUEUE_NUMBER = "8000"
WRAP_UP_S = 1
AGENTS_TOML = f"""
[[agents]]
id = "8001"
password = "demo8001"
extension = "1001"
queues = ["support"]
wrap_up_s = {WRAP_UP_S}

[[agents]]
id = "8002"
password = "demo8002"
extension = "1002"
queues = ["support"]
wrap_up_s = {WRAP_UP_S}
"""
SIPP_TIMEOUT_S = 40.0
UAS_STARTUP_S = 0.3
HOLD_MS = 3000  # the customer's whole call: waiting, then talking to the agent
IVR_LISTEN_MS = 1500  # the caller hears part of the menu prompt, then presses 1
TRANSFER_HOLD_MS = 5000  # long enough for the agent to answer and transfer, and the target to answer


def _phone(sipp: Sipp, node: RunningSoftswitch, user: str, scenario: str) -> SippProcess:
    """Register `user` from a fresh port and answer there with `scenario` (one call)."""
    port = free_port()
    registered = sipp.run(
        "register_digest", node.sip_port, local_port=port, users=[(user, DEMO_PASSWORDS[user])],
        sets={"expires": "300"}, timeout_s=SIPP_TIMEOUT_S,
    )  # fmt: skip
    assert registered.ok, registered.describe()
    phone = sipp.start(scenario, None, local_port=port, calls=1, timeout_s=SIPP_TIMEOUT_S)
    time.sleep(UAS_STARTUP_S)
    return phone


def _customer(
    sipp: Sipp,
    node: RunningSoftswitch,
    hold_ms: int = HOLD_MS,
    *,
    number: str = QUEUE_NUMBER,
    hangup: str = "local",
    key_1: bool = False,
) -> SippProcess:
    """The customer calls `number` (a queue answers at once, with music on hold). It hangs up after
    `hold_ms` (`hangup` "local") or waits for the far end's BYE ("remote"); with `key_1` it presses 1
    after `hold_ms` and waits for the far end's BYE (uac_ivr_key1)."""
    scenario, sets = (
        ("uac_ivr_key1", {})
        if key_1
        else ("uac_expect_status", {"expected": "200", "alternative": "none", "hangup": hangup})
    )
    return sipp.start(
        scenario, node.sip_port, users=[(CUSTOMER, DEMO_PASSWORDS[CUSTOMER])], calls=1,
        timeout_s=SIPP_TIMEOUT_S, sets=sets, extra_args=["-s", number, "-d", str(hold_ms)],
    )  # fmt: skip


def _states(events: list[dict[str, Any]], agent: str) -> list[tuple[str, str | None]]:
    return [
        (e["data"]["state"], e["data"]["reason"])
        for e in events
        if e["type"] == "agent.state_changed" and e["data"]["agent_id"] == agent
    ]


def _settled(agent: str, state: str, after: str) -> Callable[[list[dict[str, Any]]], bool]:
    """True once `agent` went through `after` and is now in `state`."""

    def done(events: list[dict[str, Any]]) -> bool:
        states = [s for s, _ in _states(events, agent)]
        return after in states and states[-1] == state and states.index(after) < len(states) - 1

    return done


async def _login(app: Any, *agents: str) -> None:
    for agent in agents:
        reply = await app.call("agent.login", {"agent_id": agent, "password": f"demo{agent}"})
        assert reply["ok"], reply
        await asyncio.sleep(0.05)  # logged in one after the other: 8001 has been idle longest


async def _8001_talks_to_a_customer(
    app: Any, collector: Any, sipp: Sipp, node: RunningSoftswitch, other_phone: str
) -> tuple[SippProcess, SippProcess, SippProcess]:
    """Agent 8001 (phone 1001) logged in and busy with a queue customer who stays TRANSFER_HOLD_MS;
    `other_phone` registered and answering. Returns the agent's phone, the other phone, the customer."""
    agent_phone = await asyncio.to_thread(_phone, sipp, node, "1001", "uas_answer_hold")
    other = await asyncio.to_thread(_phone, sipp, node, other_phone, "uas_answer_hold")
    await _login(app, "8001")
    await collector.until(lambda ev: _states(ev, "8001")[-1:] == [("ready", None)])
    customer = await asyncio.to_thread(_customer, sipp, node, TRANSFER_HOLD_MS)
    await collector.until(lambda ev: _states(ev, "8001")[-1:] == [("busy", "queue")])
    return agent_phone, other, customer


@pytest.mark.timeout(150)
async def test_a_queue_call_is_answered_by_an_agent(tmp_path: Path, sipp: Sipp) -> None:
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            phone = await asyncio.to_thread(_phone, sipp, node, "1001", "uas_answer_hold")
            await _login(app, "8001")
            await collector.until(lambda ev: _states(ev, "8001")[-1:] == [("ready", None)])
            customer = await asyncio.to_thread(_customer, sipp, node)
            called = await asyncio.to_thread(customer.wait)
            answered = await asyncio.to_thread(phone.wait)
            assert called.ok and called.successful == 1, called.describe()
            assert answered.ok and answered.successful == 1, answered.describe()
            events = await collector.until(_settled("8001", "ready", "wrap_up"))
            events = await collector.until(lambda ev: any(e["type"] == "cdr.created" for e in ev))

    assert_valid_and_gap_free(events)
    assert [s for s, _ in _states(events, "8001")] == [
        "offline", "ready", "reserved", "ringing", "busy", "wrap_up", "ready"
    ] or [s for s, _ in _states(events, "8001")] == [
        "ready", "reserved", "ringing", "busy", "wrap_up", "ready"
    ], _states(events, "8001")  # fmt: skip
    wrap_up, ready = [e for e in events if e["type"] == "agent.state_changed"][-2:]
    gap_s = _epoch(ready["time"]) - _epoch(wrap_up["time"])
    assert WRAP_UP_S - 0.2 <= gap_s <= WRAP_UP_S + 2, gap_s  # auto-ready when wrap-up ends
    types = [e["type"] for e in events]
    for expected in ("call.queued", "agent.offered", "call.dequeued", "call.bridged", "queue.stats"):
        assert expected in types, (expected, types)
    (dequeued,) = [e["data"] for e in events if e["type"] == "call.dequeued"]
    assert dequeued["reason"] == "answered", dequeued
    bridged = [e["data"] for e in events if e["type"] == "call.bridged"]
    assert {b["role"] for b in bridged} == {"caller", "agent"}, bridged
    (cdr,) = [e["data"]["cdr"] for e in events if e["type"] == "cdr.created"]
    assert {leg["role"] for leg in cdr["legs"]} == {"caller", "agent"}, cdr


@pytest.mark.timeout(150)
async def test_an_unanswered_offer_moves_to_the_next_agent(tmp_path: Path, sipp: Sipp) -> None:
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            busy_phone = await asyncio.to_thread(_phone, sipp, node, "1001", "uas_busy")
            phone = await asyncio.to_thread(_phone, sipp, node, "1002", "uas_answer_hold")
            await _login(app, "8001", "8002")
            await collector.until(lambda ev: _states(ev, "8002")[-1:] == [("ready", None)])
            customer = await asyncio.to_thread(_customer, sipp, node)
            called = await asyncio.to_thread(customer.wait)
            rejected = await asyncio.to_thread(busy_phone.wait)
            answered = await asyncio.to_thread(phone.wait)
            assert called.ok and rejected.ok and answered.ok, (
                called.describe() + rejected.describe() + answered.describe()
            )
            events = await collector.until(_settled("8002", "ready", "wrap_up"))

    assert_valid_and_gap_free(events)
    assert _states(events, "8001")[-1] == ("not_ready", "no_answer"), _states(events, "8001")
    missed = [e["data"] for e in events if e["type"] == "agent.offer_missed"]
    assert [m["agent_id"] for m in missed] == ["8001"], missed
    assert "busy" in [s for s, _ in _states(events, "8002")], _states(events, "8002")
    offered = [e["data"]["agent_id"] for e in events if e["type"] == "agent.offered"]
    assert offered == ["8001", "8002"], offered


@pytest.mark.timeout(150)
async def test_a_caller_who_hangs_up_while_the_agent_rings_abandons(tmp_path: Path, sipp: Sipp) -> None:
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            ringing = await asyncio.to_thread(_phone, sipp, node, "1001", "uas_no_answer")
            await _login(app, "8001")
            await collector.until(lambda ev: _states(ev, "8001")[-1:] == [("ready", None)])
            customer = await asyncio.to_thread(_customer, sipp, node, 1500)
            called = await asyncio.to_thread(customer.wait)
            assert called.ok, called.describe()
            events = await collector.until(_settled("8001", "ready", "ringing"))
            ringing.stop()

    states = [s for s, _ in _states(events, "8001")]
    assert states[-3:] == ["reserved", "ringing", "ready"], states
    assert not [e for e in events if e["type"] == "agent.offer_missed"]
    (dequeued,) = [e["data"] for e in events if e["type"] == "call.dequeued"]
    assert dequeued["reason"] == "abandoned", dequeued


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(150)
async def test_the_agent_holds_retrieves_keys_and_hangs_up_by_command(tmp_path: Path, sipp: Sipp) -> None:
    """call.hold / call.retrieve / call.send_dtmf / call.hangup on the agent's queue call, over MQTT."""
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            phone = await asyncio.to_thread(_phone, sipp, node, "1001", "uas_answer_hold")
            await _login(app, "8001")
            await collector.until(lambda ev: _states(ev, "8001")[-1:] == [("ready", None)])
            customer = await asyncio.to_thread(lambda: _customer(sipp, node, hangup="remote"))
            try:
                await collector.until(lambda ev: _states(ev, "8001")[-1:] == [("busy", "queue")])
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{customer.stop().describe()}\n{node.log_tail()}") from None

            agent = {"agent_id": "8001"}
            assert (await app.call("call.hold", agent))["ok"]
            again = await app.call("call.hold", agent)
            assert (again["ok"], again["code"]) == (False, "invalid_state"), again
            assert (await app.call("call.retrieve", agent))["ok"]
            keyed = await app.call("call.send_dtmf", {**agent, "digits": "12#"})
            assert keyed["ok"], keyed
            hung_up = await app.call("call.hangup", agent)
            assert hung_up["ok"], hung_up
            called = await asyncio.to_thread(customer.wait)  # the customer got the BYE and answered it
            answered = await asyncio.to_thread(phone.wait)
            assert called.ok and answered.ok, called.describe() + answered.describe()
            events = await collector.until(_settled("8001", "ready", "wrap_up"))
            none_left = await app.call("call.hangup", agent)

    assert (none_left["ok"], none_left["code"]) == (False, "no_active_call"), none_left
    assert_valid_and_gap_free(events)
    customer_leg = next(e["data"]["call_id"] for e in events if e["type"] == "call.queued")
    holds = [(e["type"], e["data"]["call_id"], e["data"]["by"]) for e in events if e["type"] in (
        "call.held", "call.retrieved"
    )]  # fmt: skip
    assert holds == [("call.held", customer_leg, "api"), ("call.retrieved", customer_leg, "api")], holds
    ended = [e["data"] for e in events if e["type"] == "call.ended"]
    agent_leg = next(d for d in ended if d["role"] == "agent")
    assert (agent_leg["released_by"], agent_leg["final_status"]) == ("local", "completed"), agent_leg


@pytest.mark.timeout(150)
async def test_an_agent_originates_a_call_to_a_customer(tmp_path: Path, sipp: Sipp) -> None:
    """call.originate: the agent's phone rings first; once it answers, the customer's phone is called and
    the two are bridged; call.hangup ends it and the agent wraps up, then is ready again."""
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            agent_phone = await asyncio.to_thread(_phone, sipp, node, "1001", "uas_answer_hold")
            customer_phone = await asyncio.to_thread(_phone, sipp, node, "1002", "uas_answer_hold")
            await _login(app, "8001")
            await collector.until(lambda ev: _states(ev, "8001")[-1:] == [("ready", None)])
            started = await app.call("call.originate", {"agent_id": "8001", "to": "1002"})
            assert started["ok"], started
            conversation = started["data"]["conversation_id"]
            await collector.until(
                lambda ev: sum(e["type"] == "call.bridged" and e["subject"] == conversation for e in ev) == 2,
            )
            unknown = await app.call("call.originate", {"agent_id": "8001", "to": "1002"})
            assert (unknown["ok"], unknown["code"]) == (False, "invalid_state"), unknown  # busy now
            assert (await app.call("call.hangup", {"agent_id": "8001"}))["ok"]
            answered = [await asyncio.to_thread(p.wait) for p in (agent_phone, customer_phone)]
            assert all(r.ok and r.successful == 1 for r in answered), [r.describe() for r in answered]
            events = await collector.until(_settled("8001", "ready", "wrap_up"))

    assert_valid_and_gap_free(events)
    call_events = [e for e in events if e["subject"] == conversation and e["type"].startswith("call.")]
    legs = {e["data"]["call_id"]: e["data"]["role"] for e in call_events if e["type"] == "call.initiated"}
    assert sorted(legs.values()) == ["agent", "customer"], legs
    first = call_events[0]["data"]
    assert (first["role"], first["to"]) == ("agent", "1001"), first  # the agent's phone is called first
    assert [s for s, _ in _states(events, "8001")][-3:] == ["busy", "wrap_up", "ready"], _states(
        events, "8001"
    )


@pytest.mark.timeout(150)
async def test_an_agent_blind_transfers_the_customer_to_a_user(tmp_path: Path, sipp: Sipp) -> None:
    """call.transfer (blind): the agent leaves and wraps up; the customer is bridged with user 1004."""
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            agent_phone, target_phone, customer = await _8001_talks_to_a_customer(
                app, collector, sipp, node, "1004"
            )
            to_1003 = {"agent_id": "8001", "target": {"kind": "user", "id": "1003"}}
            nowhere = await app.call("call.transfer", to_1003)
            assert (nowhere["ok"], nowhere["code"]) == (False, "device_unavailable"), (
                nowhere
            )  # not registered
            to_1004 = {"agent_id": "8001", "target": {"kind": "user", "id": "1004"}}
            moved = await app.call("call.transfer", to_1004)
            assert moved["ok"], moved
            called = await asyncio.to_thread(customer.wait)
            answered = [await asyncio.to_thread(p.wait) for p in (agent_phone, target_phone)]
            assert called.ok, called.describe()
            assert all(r.ok and r.successful == 1 for r in answered), [r.describe() for r in answered]
            events = await collector.until(lambda ev: any(e["type"] == "cdr.created" for e in ev))
            events = await collector.until(_settled("8001", "ready", "wrap_up"))

    assert_valid_and_gap_free(events)
    types = [e["type"] for e in events]
    assert "transfer.initiated" in types and "transfer.completed" in types, types
    (done,) = [e["data"] for e in events if e["type"] == "transfer.completed"]
    assert done["flow"] == "blind" and done["target"] == {"kind": "user", "id": "1004"}, done
    bridged = [
        (e["data"]["call_id"], e["data"]["peer_call_id"]) for e in events if e["type"] == "call.bridged"
    ]
    assert (done["transferred_call"], done["recipient_call"]) in bridged, bridged  # customer ↔ 1004
    (cdr,) = [e["data"]["cdr"] for e in events if e["type"] == "cdr.created"]
    assert sorted(leg["role"] for leg in cdr["legs"]) == ["agent", "callee", "caller"], cdr


@pytest.mark.timeout(150)
async def test_the_ivr_sends_key_1_to_the_support_queue(tmp_path: Path, sipp: Sipp) -> None:
    """7000, the demo IVR: the menu prompt plays, the caller presses 1 (RFC 4733), the call goes to the
    support queue and an agent's phone takes it."""
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            phone = await asyncio.to_thread(_phone, sipp, node, "1001", "uas_answer_hold")
            await _login(app, "8001")
            await collector.until(lambda ev: _states(ev, "8001")[-1:] == [("ready", None)])
            caller = await asyncio.to_thread(
                lambda: _customer(sipp, node, IVR_LISTEN_MS, number="7000", key_1=True)
            )
            await collector.until(lambda ev: _states(ev, "8001")[-1:] == [("busy", "queue")])
            assert (await app.call("call.hangup", {"agent_id": "8001"}))["ok"]
            called = await asyncio.to_thread(caller.wait)
            answered = await asyncio.to_thread(phone.wait)
            assert called.ok and answered.ok, called.describe() + answered.describe()
            events = await collector.until(lambda ev: any(e["type"] == "cdr.created" for e in ev))

    assert_valid_and_gap_free(events)
    (queued,) = [e for e in events if e["type"] == "call.queued"]
    conversation = queued["subject"]
    mine = [e for e in events if e["subject"] == conversation]
    keys = [e["data"]["digit"] for e in mine if e["type"] == "call.dtmf"]
    assert keys == ["1"], keys
    types = [e["type"] for e in mine]
    assert types.index("call.dtmf") < types.index("call.queued") < types.index("call.bridged"), types


@pytest.mark.timeout(120)
async def test_a_waiting_caller_leaves_the_queue_by_key(tmp_path: Path, sipp: Sipp) -> None:
    """The queue's exit key: the caller presses 1 while waiting (no agent logged in) and leaves the queue;
    with no `exit_to` the node ends the call."""
    extra = AGENTS_TOML + '\n[[queues]]\nid = "support"\nexit_key = "1"\n'
    with running_softswitch(tmp_path / "node", extra) as node:
        assert node.mqtt_port is not None
        async with collecting(node.mqtt_port, f"{PREFIX}/#") as collector:
            caller = await asyncio.to_thread(lambda: _customer(sipp, node, IVR_LISTEN_MS, key_1=True))
            called = await asyncio.to_thread(caller.wait)  # the node's BYE ends the scenario
            assert called.ok and called.successful == 1, called.describe()
            events = await collector.until(lambda ev: any(e["type"] == "cdr.created" for e in ev))

    assert_valid_and_gap_free(events)
    (dequeued,) = [e["data"] for e in events if e["type"] == "call.dequeued"]
    assert dequeued["reason"] == "left", dequeued
    (ended,) = [e["data"] for e in events if e["type"] == "call.ended"]
    assert (ended["final_status"], ended["released_by"]) == ("completed", "local"), ended


@pytest.mark.timeout(150)
async def test_an_agent_blind_transfers_the_customer_to_another_agent(tmp_path: Path, sipp: Sipp) -> None:
    """call.transfer to an agent: refused while that agent is not logged in; once it is ready, its phone
    rings, it is busy with the customer (who it may act on by command), and wraps up afterwards."""
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            first, second, customer = await _8001_talks_to_a_customer(app, collector, sipp, node, "1002")
            to_8002 = {"agent_id": "8001", "target": {"kind": "agent", "id": "8002"}}
            refused = await app.call("call.transfer", to_8002)
            assert (refused["ok"], refused["code"]) == (False, "agent_not_logged_in"), refused
            await _login(app, "8002")
            await collector.until(lambda ev: _states(ev, "8002")[-1:] == [("ready", None)])
            moved = await app.call("call.transfer", to_8002)
            assert moved["ok"], moved
            await collector.until(lambda ev: [s for s, _ in _states(ev, "8002")][-1:] == ["busy"])
            holding = await app.call("call.hold", {"agent_id": "8002"})  # the new agent acts on the call
            assert holding["ok"], holding
            called = await asyncio.to_thread(customer.wait)
            answered = [await asyncio.to_thread(p.wait) for p in (first, second)]
            assert called.ok, called.describe()
            assert all(r.ok and r.successful == 1 for r in answered), [r.describe() for r in answered]
            events = await collector.until(_settled("8002", "ready", "wrap_up"))
            events = await collector.until(_settled("8001", "ready", "wrap_up"))

    assert_valid_and_gap_free(events)
    (done,) = [e["data"] for e in events if e["type"] == "transfer.completed"]
    assert done["target"] == {"kind": "agent", "id": "8002"}, done
    assert [s for s, _ in _states(events, "8002")][-3:] == ["busy", "wrap_up", "ready"], _states(
        events, "8002"
    )
