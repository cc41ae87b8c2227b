"""`playback` through the running softswitch: *98 answers, plays its prompt on a real media worker, takes
the keys a SIPp caller sends as RFC 4733 telephone-events, reads them back and hangs up; every key is a
`call.dtmf` event on MQTT."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import pytest

from softswitch.prompts import PromptSet
from tests.integration.conftest import DEMO_PASSWORDS
from tests.integration.helpers import running_softswitch
from tests.integration.peers import Sipp
from tests.integration.test_mqtt_sink import assert_valid_and_gap_free, collecting

pytestmark = pytest.mark.integration

SIPP_TIMEOUT_S = 40.0
PROMPT_LISTEN_MS = 1000  # the caller listens to "please enter some digits" this long, then keys 4
KEY_GAP_S = 0.4  # the scenario's pause between keys (2, 4, *, #)
# SIPp's dtmf_2833 captures come from one recording: their RTP sequence numbers rise in this order only
# (a key sent out of that order is an old packet to the receiver, RFC 3550 A.1, and is dropped).
KEYS = "24*#"
# Read-back: "you entered" + "four two star" + "goodbye"; allow for set-up and scheduling on top.
READBACK = ["you_entered", "digit_2", "digit_4", "digit_star", "goodbye"]
SLACK_S = 4.0
EVENTS_TIMEOUT_S = 20.0


def _seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


@pytest.mark.timeout(120)
async def test_star98_reads_back_the_keys(tmp_path: Path, sipp: Sipp) -> None:
    readback_s = sum(_seconds(PromptSet().path(name)) for name in READBACK)
    with running_softswitch(tmp_path / "node") as node:
        assert node.mqtt_port is not None
        async with collecting(node.mqtt_port) as collector:
            caller = await asyncio.to_thread(
                sipp.run, "uac_dtmf_readback", node.sip_port, calls=1, timeout_s=SIPP_TIMEOUT_S,
                users=[("1001", DEMO_PASSWORDS["1001"])],
                extra_args=["-s", "*98", "-d", str(PROMPT_LISTEN_MS)],
            )  # fmt: skip
            assert caller.ok and caller.successful == 1, caller.describe()
            deadline = asyncio.get_running_loop().time() + EVENTS_TIMEOUT_S
            while not any(e["type"] == "cdr.created" for e in collector.events()):
                assert asyncio.get_running_loop().time() < deadline, [e["type"] for e in collector.events()]
                await asyncio.sleep(0.05)
            events = collector.events()

    # The node hung up only after reading the keys back: not before the read-back had time to play.
    (answered,) = caller.message_times("SIP/2.0 200 ")
    (bye,) = caller.message_times("BYE ")
    keyed = PROMPT_LISTEN_MS / 1000 + KEY_GAP_S * (len(KEYS) - 1)
    assert keyed + readback_s - 0.3 <= bye - answered <= keyed + readback_s + SLACK_S, (
        bye - answered,
        keyed,
        readback_s,
    )

    assert_valid_and_gap_free(events)
    call_events = [e for e in events if e["type"].startswith(("call.", "conversation."))]
    dtmf = [e["data"] for e in call_events if e["type"] == "call.dtmf"]
    assert [(d["digit"], d["method"], d["to"]) for d in dtmf] == [(k, "rfc4733", "*98") for k in KEYS], dtmf
    types = [e["type"] for e in call_events]
    assert types == ["call.initiated", "call.answered", *["call.dtmf"] * len(KEYS), "call.ended",
                     "conversation.ended"], types  # fmt: skip
    ended = next(e["data"] for e in call_events if e["type"] == "call.ended")
    assert (ended["final_status"], ended["released_by"]) == ("completed", "local"), ended
