"""A call through the running softswitch is seen by an MQTT subscriber as EVENTS.md documents it:
the call events of both legs, then conversation.ended and cdr.created, on the documented topics,
schema-valid and gap-free per subject; the registration snapshot is retained; the CDR matches the call."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import DEMO_PASSWORDS
from tests.integration.helpers import running_softswitch
from tests.integration.peers import Sipp, free_port
from tests.integration.test_mqtt_sink import (
    assert_valid_and_gap_free,
    collecting,
    contacts,
    retained_eventually,
)

pytestmark = pytest.mark.integration

HOLD_MS = 1000  # the call's talk time
SIPP_TIMEOUT_S = 30.0
UAS_STARTUP_S = 0.3
EVENTS_TIMEOUT_S = 20.0
CALL_SEQUENCE = [
    "call.initiated", "call.initiated", "call.ringing", "call.ringing", "call.answered", "call.answered",
    "call.bridged", "call.bridged", "call.ended", "call.ended", "conversation.ended", "cdr.created",
]  # fmt: skip


@pytest.mark.timeout(120)
async def test_a_call_is_published_as_documented(tmp_path: Path, sipp: Sipp) -> None:
    with running_softswitch(tmp_path / "node") as node:
        assert node.mqtt_port is not None
        async with collecting(node.mqtt_port) as collector:
            callee_port = free_port()
            registered = await asyncio.to_thread(
                sipp.run, "register_digest", node.sip_port, local_port=callee_port,
                users=[("1002", DEMO_PASSWORDS["1002"])], sets={"expires": "300"}, timeout_s=SIPP_TIMEOUT_S,
            )  # fmt: skip
            assert registered.ok, registered.describe()
            callee = sipp.start(
                "uas_record_route", None, local_port=callee_port, calls=1, timeout_s=SIPP_TIMEOUT_S,
                sets={"media": "no"},
            )  # fmt: skip
            await asyncio.sleep(UAS_STARTUP_S)
            started = time.time()
            caller = await asyncio.to_thread(
                sipp.run, "uac_record_route", node.sip_port, calls=1, timeout_s=SIPP_TIMEOUT_S,
                users=[("1001", DEMO_PASSWORDS["1001"])], sets={"media": "no"},
                extra_args=["-s", "1002", "-d", str(HOLD_MS)],
            )  # fmt: skip
            ended = time.time()
            answered = await asyncio.to_thread(callee.wait)
            assert caller.ok and answered.ok, caller.describe() + answered.describe()

            deadline = time.monotonic() + EVENTS_TIMEOUT_S
            while not any(e["type"] == "cdr.created" for e in collector.events()):
                assert time.monotonic() < deadline, [e["type"] for e in collector.events()]
                await asyncio.sleep(0.05)
            events = collector.events()
            with urllib.request.urlopen(node.http_url("/metrics"), timeout=10) as response:
                metrics = response.read().decode()
            # A subscriber that comes later still learns where 1002 is: the retained snapshot.
            snapshot = await retained_eventually(
                node.mqtt_port, "softswitch/v1/default/devices/1002/registration", lambda m: m is not None
            )

    assert_valid_and_gap_free(events)
    # The call counters in /metrics tell the same story.
    for line in (
        'softswitch_calls_started_total{direction="inbound"} 1.0',
        'softswitch_calls_started_total{direction="outbound"} 1.0',
        'softswitch_calls_answered_total{direction="inbound"} 1.0',
        'softswitch_calls_ended_total{final_status="completed"} 2.0',
        'softswitch_conversations_ended_total{final_status="completed"} 1.0',
        "softswitch_conversations_active 0.0",
        "softswitch_legs_active 0.0",
    ):
        assert line in metrics.splitlines(), (line, metrics)
    assert any(e["type"] == "device.registered" and e["data"]["user"] == "1002" for e in events)
    assert snapshot is not None and snapshot.retain
    assert contacts(snapshot) == [f"sip:1002@127.0.0.1:{callee_port};transport=UDP"], snapshot.json()
    call_events = [e for e in events if e["type"].startswith(("call.", "conversation.", "cdr."))]
    assert [e["type"] for e in call_events] == CALL_SEQUENCE
    conversation = call_events[0]["subject"]
    assert {e["subject"] for e in call_events} == {conversation}
    messages = {
        m.json()["id"]: m.topic for m in collector.messages if m.payload and "registration" not in m.topic
    }
    for e in call_events:
        expected = (
            f"softswitch/v1/default/cdr/{conversation}"
            if e["type"] == "cdr.created"
            else f"softswitch/v1/default/calls/{conversation}/{e['type']}"
        )
        assert messages[e["id"]] == expected
    legs = {e["data"]["role"]: e["data"] for e in call_events if e["type"] == "call.ended"}
    assert legs["caller"]["final_status"] == legs["callee"]["final_status"] == "completed"
    assert {legs["caller"]["released_by"], legs["callee"]["released_by"]} == {"remote", "local"}
    # The CDR matches what SIPp saw: talk time about the hold time, inside the run's wall clock.
    assert abs(legs["callee"]["talk_s"] - HOLD_MS / 1000) < 0.5, legs["callee"]
    cdr = call_events[-1]["data"]["cdr"]
    assert cdr["conversation"]["final_status"] == "completed"
    assert str(cdr["byeType"]) == "3"  # the caller hung up (seed: 主叫挂机)
    assert len(cdr["legs"]) == 2
    for row in cdr["legs"]:
        assert started - 1 <= _epoch(row["start_time"]) <= ended + 1, row


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
