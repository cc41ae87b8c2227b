"""Mid-call control, proven by what each party hears.

Four baresip phones registered to a running softswitch, each sending its own tone: the customer (1003,
440 Hz) calls the support queue, agent 8001 answers on 1001 (660 Hz), supervisor 8002 uses 1002 (880 Hz),
and 1004 (1100 Hz) is the party the agent consults. Every operation is an MQTT command. Between two
commands each phone's recording is marked; afterwards each stretch is analysed by frequency (Goertzel),
so each phase states exactly who hears whom:

talk → monitor listen → whisper → barge → supervisor hangs up → mute → unmute (recorded) → consult →
three-way conference → the agent leaves the conference.
"""

from __future__ import annotations

import asyncio
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.audio import make_tone, tone_levels
from tests.integration.conftest import PhoneFactory
from tests.integration.helpers import running_softswitch
from tests.integration.peers import Baresip
from tests.integration.test_cti_mqtt import commander
from tests.integration.test_mqtt_sink import Collector, assert_valid_and_gap_free, collecting, event_with

pytestmark = pytest.mark.integration

PREFIX = "softswitch/v1/default"
CUSTOMER_HZ, AGENT_HZ, SUPERVISOR_HZ, TARGET_HZ = 440.0, 660.0, 880.0, 1100.0
TONES = (CUSTOMER_HZ, AGENT_HZ, SUPERVISOR_HZ, TARGET_HZ)
NAMES = {CUSTOMER_HZ: "customer", AGENT_HZ: "agent", SUPERVISOR_HZ: "supervisor", TARGET_HZ: "target"}
AGENTS_TOML = """
[[agents]]
id = "8001"
password = "demo8001"
extension = "1001"
queues = ["support"]
wrap_up_s = 1

[[agents]]
id = "8002"
password = "demo8002"
extension = "1002"
role = "supervisor"
team = ["8001"]
"""
PHASE_S = 2.5  # audio per phase: ten 0.25 s analysis blocks
SETTLE_S = 0.6  # after a command took effect, before a phase starts: media paths switch, jitter buffers fill
EDGE_S = 0.3  # trimmed from each end of a phase's stretch of recording
HEARD = 0.08  # amplitude (full scale 1.0) above which a party hears a tone; the phones send 0.5
SILENT = 0.02  # amplitude below which it does not (leakage and noise sit well under this)
EVENT_TIMEOUT_S = 15.0
WAIT_FOR_ANNOUNCEMENTS_S = 5.0  # two announcements at announce_position_s = 2
PEAK_WINDOW_S = 0.5  # the loudest stretch this long of each tone: inside one 0.6 s prompt


@dataclass
class Phase:
    name: str
    marks: dict[str, tuple[float, float]]  # phone name -> (start, end) second in its recording
    expected: dict[str, set[float]]  # phone name -> the tones it must hear (all others: silent)


class Parties:
    def __init__(self, phones: dict[str, Baresip]) -> None:
        self.phones = phones
        self.phases: list[Phase] = []

    async def phase(self, name: str, expected: dict[str, set[float]]) -> None:
        """Let PHASE_S of audio pass and remember where it sits in each listed phone's recording."""
        await asyncio.sleep(SETTLE_S)
        start = {p: self.phones[p].heard_s() for p in expected}
        await asyncio.sleep(PHASE_S)
        end = {p: self.phones[p].heard_s() for p in expected}
        self.phases.append(Phase(name, {p: (start[p], end[p]) for p in expected}, expected))

    def check(self) -> None:
        recordings = {name: phone.received_wav() for name, phone in self.phones.items()}
        problems: list[str] = []
        table: list[str] = []  # every measurement, for the failure message
        for phase in self.phases:
            for party, (start, end) in phase.marks.items():
                if end - start < PHASE_S / 2:
                    # No audio came (a silent stream sends no RTP: voice activity detection); right only
                    # where the party is to hear nobody.
                    if phase.expected[party]:
                        problems.append(f"{phase.name}: {party} received only {end - start:.2f} s of audio")
                    continue
                levels = tone_levels(recordings[party], TONES, start + EDGE_S, end - EDGE_S)
                heard = ", ".join(f"{NAMES[t]} {v:.3f}" for t, v in levels.items())
                table.append(f"{phase.name:>22} {party:>10} hears: {heard}")
                for tone, level in levels.items():
                    if tone in phase.expected[party] and level < HEARD:
                        problems.append(
                            f"{phase.name}: {party} does not hear the {NAMES[tone]} ({level:.3f})"
                        )
                    if tone not in phase.expected[party] and level > SILENT:
                        problems.append(f"{phase.name}: {party} hears the {NAMES[tone]} ({level:.3f})")
        assert not problems, "\n".join([*problems, "", *table])


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


class Cti:
    """Commands over MQTT that must succeed, and waits for events, for one test."""

    def __init__(self, app: Any, collector: Collector) -> None:
        self.app, self.collector = app, collector

    async def ok(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.app.call(command, body)
        assert reply["ok"], (command, reply)
        data: dict[str, Any] = reply["data"]
        return data

    async def until(self, event_type: str, **data: Any) -> list[dict[str, Any]]:
        return await self.collector.until(event_with(event_type, **data), EVENT_TIMEOUT_S)


def _count(event_type: str, count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: sum(e["type"] == event_type for e in events) >= count


@pytest.mark.timeout(240)
async def test_who_hears_whom_through_supervision_mute_consult_and_conference(
    tmp_path: Path, phones: PhoneFactory
) -> None:
    tones = {hz: make_tone(tmp_path / f"tone-{int(hz)}.wav", hz) for hz in TONES}
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        port = node.sip_port
        parties = Parties(
            {
                "agent": phones.start("1001", tones[AGENT_HZ], registrar_port=port),
                "supervisor": phones.start("1002", tones[SUPERVISOR_HZ], registrar_port=port),
                "customer": phones.start("1003", tones[CUSTOMER_HZ], registrar_port=port),
                "target": phones.start("1004", tones[TARGET_HZ], registrar_port=port),
            }
        )
        for phone in parties.phones.values():
            await asyncio.to_thread(phone.wait_registered)
        customer, supervisor = parties.phones["customer"], parties.phones["supervisor"]
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            cti = Cti(app, collector)

            await cti.ok("agent.login", {"agent_id": "8002", "password": "demo8002", "state": "not_ready"})
            await cti.ok("agent.login", {"agent_id": "8001", "password": "demo8001"})
            await cti.until("agent.state_changed", agent_id="8001", state="ready")
            await asyncio.to_thread(customer.dial, f"sip:8000@127.0.0.1:{port}")
            await cti.until("agent.state_changed", agent_id="8001", state="busy")
            await cti.until("call.bridged", role="caller")

            agent_only = {"customer": {AGENT_HZ}, "agent": {CUSTOMER_HZ}}
            await parties.phase("talk", agent_only)

            monitor = {"supervisor_id": "8002", "agent_id": "8001"}
            started = await cti.ok("call.monitor", {**monitor, "mode": "listen"})
            await cti.until("supervision.started", mode="listen")
            both = {CUSTOMER_HZ, AGENT_HZ}
            await parties.phase("listen", {**agent_only, "supervisor": both})
            await cti.ok("call.monitor", {**monitor, "mode": "whisper"})
            await cti.until("supervision.mode_changed", mode="whisper")
            await parties.phase(
                "whisper",
                {"customer": {AGENT_HZ}, "agent": {CUSTOMER_HZ, SUPERVISOR_HZ}, "supervisor": both},
            )
            await cti.ok("call.monitor", {**monitor, "mode": "barge"})
            await cti.until("supervision.mode_changed", mode="barge")
            await parties.phase(
                "barge",
                {
                    "customer": {AGENT_HZ, SUPERVISOR_HZ},
                    "agent": {CUSTOMER_HZ, SUPERVISOR_HZ},
                    "supervisor": both,
                },
            )
            await asyncio.to_thread(supervisor.hangup)
            await cti.until("supervision.ended", supervisor_call=started["supervisor_call"])

            await cti.ok("call.mute", {"agent_id": "8001"})
            await cti.until("call.muted", role="agent")
            await parties.phase("muted", {"customer": set(), "agent": {CUSTOMER_HZ}})
            await cti.ok("call.unmute", {"agent_id": "8001"})
            recording = await cti.ok("call.record", {"agent_id": "8001", "action": "start"})
            await parties.phase("unmuted", agent_only)
            await cti.ok("call.record", {"agent_id": "8001", "action": "stop"})
            available = await cti.until("recording.available", recording_id=recording["recording_id"])

            consult = await cti.ok(
                "call.consult", {"agent_id": "8001", "target": {"kind": "user", "id": "1004"}}
            )
            await cti.until("transfer.answered", transfer_id=consult["transfer_id"])
            # The customer hears music on hold (its own notes, none of the parties' tones).
            await parties.phase("consult", {"customer": set(), "agent": {TARGET_HZ}, "target": {AGENT_HZ}})
            await cti.ok("call.conference", {"agent_id": "8001"})
            await cti.until("participant.joined", role="consult")
            await parties.phase(
                "conference",
                {
                    "customer": {AGENT_HZ, TARGET_HZ},
                    "agent": {CUSTOMER_HZ, TARGET_HZ},
                    "target": {CUSTOMER_HZ, AGENT_HZ},
                },
            )
            await cti.ok("call.conference_leave", {"agent_id": "8001"})
            await cti.until("participant.left", role="agent", reason="left")
            await parties.phase("after the agent left", {"customer": {TARGET_HZ}, "target": {CUSTOMER_HZ}})
            await cti.until("agent.state_changed", agent_id="8001", state="wrap_up")

            await asyncio.to_thread(customer.hangup)
            events = await cti.until("conversation.ended")

    parties.check()
    assert_valid_and_gap_free(events)
    call_events = _types(events)
    for expected in (
        "supervision.started", "supervision.mode_changed", "supervision.ended", "call.muted", "call.unmuted",
        "recording.started", "recording.stopped", "recording.available", "transfer.initiated",
        "transfer.answered", "call.held", "call.retrieved", "participant.joined", "participant.left",
    ):  # fmt: skip
        assert expected in call_events, (expected, call_events)
    # The recording: a WAV under the data directory with the customer and the agent in it.
    record = next(
        e["data"] for e in available if e["type"] == "recording.available"
        and e["data"]["recording_id"] == recording["recording_id"]
    )  # fmt: skip
    assert record["url"] == recording["url"] and record["size_bytes"] > 0, record
    path = node.data_dir / record["url"]
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (8000, 2, 1)
        seconds = wav.getnframes() / wav.getframerate()
    assert abs(seconds - record["duration_s"]) < 1.0, (seconds, record)
    levels = tone_levels(path, TONES, EDGE_S, seconds - EDGE_S)
    assert levels[CUSTOMER_HZ] > HEARD and levels[AGENT_HZ] > HEARD, levels
    assert levels[SUPERVISOR_HZ] < SILENT and levels[TARGET_HZ] < SILENT, levels


@pytest.mark.timeout(150)
async def test_a_conference_room_across_two_workers(tmp_path: Path, phones: PhoneFactory) -> None:
    """Three phones dial room 9000 on a node with two media workers, so one of them reaches the room's
    worker over a link: each hears the other two; when one leaves, the other two still hear each other;
    the room ends with its last member."""
    tones = {hz: make_tone(tmp_path / f"tone-{int(hz)}.wav", hz) for hz in TONES[:3]}
    with running_softswitch(tmp_path / "node", "[media]\nworkers = 2\n") as node:
        assert node.mqtt_port is not None
        port = node.sip_port
        names = {"1001": CUSTOMER_HZ, "1002": AGENT_HZ, "1003": SUPERVISOR_HZ}
        members = {user: phones.start(user, tones[hz], registrar_port=port) for user, hz in names.items()}
        parties = Parties(members)
        for phone in members.values():
            await asyncio.to_thread(phone.wait_registered)
        async with collecting(node.mqtt_port, f"{PREFIX}/#") as collector:
            for count, phone in enumerate(members.values(), start=1):
                await asyncio.to_thread(phone.dial, f"sip:9000@127.0.0.1:{port}")
                await collector.until(_count("participant.joined", count), EVENT_TIMEOUT_S)
            everyone = {user: {hz for other, hz in names.items() if other != user} for user in names}
            await parties.phase("three in the room", everyone)
            await asyncio.to_thread(members["1003"].hangup)
            await collector.until(_count("participant.left", 1), EVENT_TIMEOUT_S)
            await parties.phase("two left", {"1001": {AGENT_HZ}, "1002": {CUSTOMER_HZ}})
            for user in ("1001", "1002"):
                await asyncio.to_thread(members[user].hangup)
            events = await collector.until(
                lambda evs: sum(e["type"] == "conversation.ended" for e in evs) == 3, EVENT_TIMEOUT_S
            )
        linked = [r for r in node.log_records() if r.get("event") == "linking to the room's worker"]
    parties.check()
    assert_valid_and_gap_free(events)
    assert len(linked) == 1, linked  # the middle caller was dispatched to the other worker
    assert sum(e["type"] == "participant.left" for e in events) == 3


@pytest.mark.timeout(180)
async def test_a_consult_cancelled_then_completed_as_an_attended_transfer(
    tmp_path: Path, phones: PhoneFactory
) -> None:
    """The agent consults 1004 and cancels: it talks to the customer again; it consults again and
    completes the transfer: the customer and 1004 hear each other, and the agent's call ends."""
    tones = {hz: make_tone(tmp_path / f"tone-{int(hz)}.wav", hz) for hz in (CUSTOMER_HZ, AGENT_HZ, TARGET_HZ)}
    with running_softswitch(tmp_path / "node", AGENTS_TOML) as node:
        assert node.mqtt_port is not None
        port = node.sip_port
        parties = Parties(
            {
                "agent": phones.start("1001", tones[AGENT_HZ], registrar_port=port),
                "customer": phones.start("1003", tones[CUSTOMER_HZ], registrar_port=port),
                "target": phones.start("1004", tones[TARGET_HZ], registrar_port=port),
            }
        )
        for phone in parties.phones.values():
            await asyncio.to_thread(phone.wait_registered)
        async with (
            collecting(node.mqtt_port, f"{PREFIX}/#") as collector,
            commander(node.mqtt_port, v5=False) as app,
        ):
            cti = Cti(app, collector)

            await cti.ok("agent.login", {"agent_id": "8001", "password": "demo8001"})
            await cti.until("agent.state_changed", agent_id="8001", state="ready")
            await asyncio.to_thread(parties.phones["customer"].dial, f"sip:8000@127.0.0.1:{port}")
            await cti.until("call.bridged", role="caller")
            consult = {"agent_id": "8001", "target": {"kind": "user", "id": "1004"}}

            first = await cti.ok("call.consult", consult)
            await cti.until("transfer.answered", transfer_id=first["transfer_id"])
            await cti.ok("call.consult_cancel", {"agent_id": "8001"})
            await cti.until("transfer.cancelled", transfer_id=first["transfer_id"])
            await parties.phase(
                "after the cancelled consult", {"customer": {AGENT_HZ}, "agent": {CUSTOMER_HZ}}
            )

            second = await cti.ok("call.consult", consult)
            await cti.until("transfer.answered", transfer_id=second["transfer_id"])
            await parties.phase(
                "second consult", {"customer": set(), "agent": {TARGET_HZ}, "target": {AGENT_HZ}}
            )
            await cti.ok("call.transfer_complete", {"agent_id": "8001"})
            await cti.until("transfer.completed", transfer_id=second["transfer_id"])
            await asyncio.to_thread(parties.phones["agent"].wait_event, "CALL_CLOSED", EVENT_TIMEOUT_S)
            await parties.phase("transferred", {"customer": {TARGET_HZ}, "target": {CUSTOMER_HZ}})
            await cti.until("agent.state_changed", agent_id="8001", state="wrap_up")
            await asyncio.to_thread(parties.phones["customer"].hangup)
            events = await cti.until("conversation.ended")

    parties.check()
    assert_valid_and_gap_free(events)
    transfers = [(e["type"], e["data"]["transfer_id"]) for e in events if e["type"].startswith("transfer.")]
    assert transfers == [
        ("transfer.initiated", first["transfer_id"]), ("transfer.answered", first["transfer_id"]),
        ("transfer.cancelled", first["transfer_id"]), ("transfer.initiated", second["transfer_id"]),
        ("transfer.answered", second["transfer_id"]), ("transfer.completed", second["transfer_id"]),
    ], transfers  # fmt: skip


def _peak_levels(phone: Baresip, frequencies: tuple[float, ...]) -> dict[float, float]:
    """Each tone's amplitude in the stretch of PEAK_WINDOW_S where it is loudest, over the whole call."""
    path, end = phone.received_wav(), phone.heard_s()
    peaks = dict.fromkeys(frequencies, 0.0)
    start = EDGE_S
    while start + PEAK_WINDOW_S <= end:
        for hz, level in tone_levels(path, frequencies, start, start + PEAK_WINDOW_S).items():
            peaks[hz] = max(peaks[hz], level)
        start += PEAK_WINDOW_S / 2
    return peaks


ANNOUNCE_HZ, FIRST_HZ, SECOND_HZ = 1000.0, 1500.0, 1800.0  # the test's prompts: "caller number", 1, 2


@pytest.mark.timeout(120)
async def test_waiting_callers_hear_their_place_in_the_queue(tmp_path: Path, phones: PhoneFactory) -> None:
    """With `announce_position_s`, two callers waiting in the support queue (no agent logged in) hear
    `queue_position` and then their own place: the operator's prompt folder replaces the prompts with
    tones (1000 Hz, and 1500 / 1800 Hz for "1" / "2"), so what each heard tells the announcements apart."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    make_tone(prompts / "queue_position.wav", ANNOUNCE_HZ, seconds=0.6)
    make_tone(prompts / "digit_1.wav", FIRST_HZ, seconds=0.6)
    make_tone(prompts / "digit_2.wav", SECOND_HZ, seconds=0.6)
    caller_tones = {
        user: make_tone(tmp_path / f"{user}.wav", hz) for user, hz in (("1001", 440.0), ("1002", 660.0))
    }
    extra = f'[prompts]\ndir = "{prompts}"\n\n[[queues]]\nid = "support"\nannounce_position_s = 2\n'
    with running_softswitch(tmp_path / "node", extra) as node:
        assert node.mqtt_port is not None
        callers = {
            user: phones.start(user, tone, registrar_port=node.sip_port)
            for user, tone in caller_tones.items()
        }
        for phone in callers.values():
            await asyncio.to_thread(phone.wait_registered)
        async with collecting(node.mqtt_port, f"{PREFIX}/#") as collector:
            for count, phone in enumerate(callers.values(), start=1):
                await asyncio.to_thread(phone.dial, f"sip:8000@127.0.0.1:{node.sip_port}")
                await collector.until(_count("call.queued", count), EVENT_TIMEOUT_S)
            await asyncio.sleep(WAIT_FOR_ANNOUNCEMENTS_S)
            for phone in callers.values():
                await asyncio.to_thread(phone.hangup)
            await collector.until(_count("conversation.ended", 2), EVENT_TIMEOUT_S)
        announced = [r for r in node.log_records() if r.get("event") == "queue position announced"]
    heard = {user: _peak_levels(phone, (ANNOUNCE_HZ, FIRST_HZ, SECOND_HZ)) for user, phone in callers.items()}
    assert heard["1001"][ANNOUNCE_HZ] > HEARD and heard["1001"][FIRST_HZ] > HEARD, heard
    assert heard["1001"][SECOND_HZ] < SILENT, heard
    assert heard["1002"][ANNOUNCE_HZ] > HEARD and heard["1002"][SECOND_HZ] > HEARD, heard
    assert heard["1002"][FIRST_HZ] < SILENT, heard
    assert {r["position"] for r in announced} == {1, 2}, announced
