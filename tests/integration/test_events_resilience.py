"""Events and CDRs survive failures of the whole node and of its surroundings:

- the external broker (Mosquitto) stops mid-call and comes back: the subscriber still receives every
  event of the call, in order, gap-free;
- the softswitch is killed (SIGKILL) mid-call and started again: the conversation's CDR, left open by the
  crash, is closed as failed by the system and published, after what the node had published before;
- a registration expires while the node is stopped: the next start reports it and clears the snapshot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DEMO_PASSWORDS
from tests.integration.helpers import RunningSoftswitch, running_softswitch
from tests.integration.peers import Sipp, SippProcess, free_port
from tests.integration.test_events_e2e import CALL_SEQUENCE
from tests.integration.test_mqtt_sink import (
    Mosquitto,
    assert_valid_and_gap_free,
    collecting,
    contacts,
    mosquitto,
    retained_eventually,
)

pytestmark = pytest.mark.integration

__all__ = ["mosquitto"]  # the fixture, re-used

SIPP_TIMEOUT_S = 40.0
UAS_STARTUP_S = 0.3
HOLD_MS = 4000  # long enough to stop the broker (or kill the node) while the call is up
SHORT_EXPIRES_S = 6  # a registration that runs out while the node is stopped


def _register_callee(sipp: Sipp, node: RunningSoftswitch) -> int:
    port = free_port()
    registered = sipp.run(
        "register_digest", node.sip_port, local_port=port, users=[("1002", DEMO_PASSWORDS["1002"])],
        sets={"expires": "300"}, timeout_s=SIPP_TIMEOUT_S,
    )  # fmt: skip
    assert registered.ok, registered.describe()
    return port


def _start_call(sipp: Sipp, node: RunningSoftswitch, callee_port: int) -> tuple[SippProcess, SippProcess]:
    callee = sipp.start(
        "uas_record_route", None, local_port=callee_port, calls=1, timeout_s=SIPP_TIMEOUT_S,
        sets={"media": "no"},
    )  # fmt: skip
    time.sleep(UAS_STARTUP_S)
    caller = sipp.start(
        "uac_record_route", node.sip_port, calls=1, timeout_s=SIPP_TIMEOUT_S,
        users=[("1001", DEMO_PASSWORDS["1001"])], sets={"media": "no"},
        extra_args=["-s", "1002", "-d", str(HOLD_MS)],
    )  # fmt: skip
    return caller, callee


def _count(kind: str, n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: sum(e["type"] == kind for e in events) >= n


@pytest.mark.timeout(150)
async def test_broker_restart_mid_call_loses_no_event(
    tmp_path: Path, sipp: Sipp, mosquitto: Mosquitto
) -> None:
    extra = f'[mqtt]\nurl = "mqtt://127.0.0.1:{mosquitto.port}"\n'
    with running_softswitch(tmp_path / "node", extra) as node:
        async with collecting(mosquitto.port) as collector:
            callee_port = await asyncio.to_thread(_register_callee, sipp, node)
            caller, callee = await asyncio.to_thread(_start_call, sipp, node, callee_port)
            # Mosquitto may drop what it still holds for a connected subscriber when it stops: the outage
            # starts once the events so far have arrived.
            await collector.until(_count("call.bridged", 2))
            mosquitto.stop()
            called = await asyncio.to_thread(caller.wait)
            answered = await asyncio.to_thread(callee.wait)
            assert called.ok and answered.ok, called.describe() + answered.describe()
            await asyncio.sleep(0.5)  # the call's last events are in the node's outbox now
            mosquitto.start()
            events = await collector.until(_count("cdr.created", 1))

    assert_valid_and_gap_free(events)
    call_events = [e for e in events if e["type"].startswith(("call.", "conversation.", "cdr."))]
    assert [e["type"] for e in call_events] == CALL_SEQUENCE
    assert len({e["subject"] for e in call_events}) == 1


@pytest.mark.timeout(180)
async def test_killed_node_closes_and_publishes_the_open_cdr_at_restart(
    tmp_path: Path, sipp: Sipp, mosquitto: Mosquitto
) -> None:
    # An external broker: the subscriber stays connected while the node is down. (The embedded broker dies
    # with its node and keeps no sessions: what a restarted node publishes before a subscriber is back
    # reaches only the subscribers connected then.)
    extra = f'[mqtt]\nurl = "mqtt://127.0.0.1:{mosquitto.port}"\n'
    async with collecting(mosquitto.port) as collector:
        with running_softswitch(tmp_path / "node", extra) as node:
            callee_port = await asyncio.to_thread(_register_callee, sipp, node)
            caller, callee = await asyncio.to_thread(_start_call, sipp, node, callee_port)
            before = await collector.until(_count("call.bridged", 2))
            killed_at = time.time()
            node.kill()
        caller.stop()
        callee.stop()
        conversation = next(e["subject"] for e in before if e["type"] == "call.initiated")

        with running_softswitch(tmp_path / "node", extra) as restarted:
            events = await collector.until(_count("cdr.created", 1))
            recovered = [
                r for r in restarted.log_records() if r.get("event") == "closed a CDR left open by a crash"
            ]

    assert_valid_and_gap_free(events)
    mine = [e for e in events if e["subject"] == conversation]
    types = [e["type"] for e in mine]
    # What the node published before the kill, then the CDR it closed at start-up; nothing in between
    # (the crash ended the call without call.ended or conversation.ended).
    assert types == [*CALL_SEQUENCE[: CALL_SEQUENCE.index("call.bridged") + 2], "cdr.created"], types
    cdr = mine[-1]["data"]["cdr"]
    assert cdr["conversation"]["final_status"] == "failed", cdr
    assert cdr["conversation"]["released_by"] == "system", cdr
    assert cdr["conversation"]["conversation_id"] == conversation
    assert len(cdr["legs"]) == 2, cdr
    for row in cdr["legs"]:
        assert row["final_status"] == "failed" and row["released_by"] == "system", row
        assert row["answer_time"] is not None, row  # both legs were answered before the crash
    assert [r.get("conversation_id") for r in recovered] == [conversation], recovered
    ended = datetime.fromisoformat(cdr["conversation"]["end_time"].replace("Z", "+00:00")).timestamp()
    assert ended >= killed_at, cdr  # the crash time is not known: the restart bounds it


@pytest.mark.timeout(120)
async def test_a_registration_that_expired_while_the_node_was_down_is_unregistered_at_start(
    tmp_path: Path, sipp: Sipp, mosquitto: Mosquitto
) -> None:
    """The registrar was not running when 1002's binding expired: at the next start the node says
    `device.unregistered` (reason `expired`) and clears the retained registration snapshot."""
    extra = f'[mqtt]\nurl = "mqtt://127.0.0.1:{mosquitto.port}"\n[sip]\nmin_expires = 1\n'
    topic = "softswitch/v1/default/devices/1002/registration"
    with running_softswitch(tmp_path / "node", extra) as node:
        registered_at = time.monotonic()
        registered = await asyncio.to_thread(
            sipp.run, "register_digest", node.sip_port, local_port=free_port(),
            users=[("1002", DEMO_PASSWORDS["1002"])], sets={"expires": str(SHORT_EXPIRES_S)},
            timeout_s=SIPP_TIMEOUT_S,
        )  # fmt: skip
        assert registered.ok, registered.describe()
        snapshot = await retained_eventually(mosquitto.port, topic, lambda m: m is not None)
        assert snapshot is not None and contacts(snapshot), snapshot
    assert time.monotonic() - registered_at < SHORT_EXPIRES_S, "the node was not stopped in time"
    await asyncio.sleep(SHORT_EXPIRES_S)  # the binding expires while no node runs

    async with collecting(mosquitto.port, identifier="after-restart") as collector:
        with running_softswitch(tmp_path / "node", extra):
            events = await collector.until(_count("device.unregistered", 1))
            cleared = await retained_eventually(mosquitto.port, topic, lambda m: m is None)
    (gone,) = [e["data"] for e in events if e["type"] == "device.unregistered"]
    assert (gone["user"], gone["reason"]) == ("1002", "expired"), gone
    assert cleared is None  # no retained snapshot: the device has no binding
