"""What phones do to a live call with standard SIP, through the B2BUA:

- hold and resume with a re-INVITE (RFC 3264 §8.4: `sendonly`, then `sendrecv`): the other party hears
  music on hold meanwhile, then the caller again (checked by frequency); `call.held` / `call.retrieved`
  with `by` "remote";
- DTMF across the bridge: RFC 4733 keys from either phone reach the other one as RFC 4733;
- DTMF by SIP INFO (`application/dtmf-relay`, RFC 6086) from a SIPp caller reaches the callee's phone as
  RFC 4733, and is published as `call.dtmf` with method `info`.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.integration.audio import make_tone, read_wav, rms, tone_levels
from tests.integration.conftest import DEMO_PASSWORDS, TONE_A_HZ, TONE_B_HZ, PhoneFactory, Tones
from tests.integration.helpers import RunningSoftswitch, running_softswitch
from tests.integration.peers import Baresip, Sipp
from tests.integration.test_mqtt_sink import Collector, assert_valid_and_gap_free, collecting, event_with

pytestmark = pytest.mark.integration

PREFIX = "softswitch/v1/default"
EVENT_TIMEOUT_S = 10.0
SETTLE_S = 0.8  # after a re-INVITE: the bridge switches, the far end's jitter buffer refills
PHASE_S = 2.5  # audio analysed per phase
EDGE_S = 0.3  # trimmed from each end of a phase
MUSIC_ON_HOLD_HZ = (261.63, 329.63, 392.0, 523.25)  # the notes of the default music on hold (C E G C')
HEARD = 0.08
SILENT = 0.02
INFO_PAUSE_MS = 1500  # the SIPp caller's wait before its INFO, and again before its BYE
SIPP_TIMEOUT_S = 30.0
REPLACES_HOLD_MS = 6000  # the newcomer's call: long enough to hear it, within SIPp's 7 s sample
VOICE_RMS = 0.02  # speech is louder than this (-34 dBFS); silence is far below


async def _registered(*phones: Baresip) -> None:
    for phone in phones:
        await asyncio.to_thread(phone.wait_registered)


async def _in_a_call(node: RunningSoftswitch, caller: Baresip, callee: Baresip, collector: Collector) -> None:
    """`caller` dials `callee`'s user through the node; back once both talk and the legs are bridged."""
    await asyncio.to_thread(caller.dial, f"sip:{callee.user}@127.0.0.1:{node.sip_port}")
    for phone in (caller, callee):
        await asyncio.to_thread(phone.wait_event, "CALL_ESTABLISHED", EVENT_TIMEOUT_S)
    await collector.until(event_with("call.bridged"), EVENT_TIMEOUT_S)


@pytest.mark.timeout(120)
async def test_hold_and_resume_from_a_phone_and_dtmf_across_the_bridge(
    tmp_path: Path, phones: PhoneFactory, tones: Tones
) -> None:
    with running_softswitch(tmp_path / "node") as node:
        assert node.mqtt_port is not None
        caller = phones.start("1001", tones.a, registrar_port=node.sip_port)
        callee = phones.start("1002", tones.b, registrar_port=node.sip_port)
        await _registered(caller, callee)
        async with collecting(node.mqtt_port, f"{PREFIX}/#") as collector:
            await _in_a_call(node, caller, callee, collector)

            # RFC 4733 both ways: each phone's key reaches the other phone.
            await asyncio.to_thread(caller.command, "sndcode", "5")
            heard = await asyncio.to_thread(callee.wait_event, "CALL_DTMF_START", EVENT_TIMEOUT_S)
            assert heard.param == "5", heard.raw
            await asyncio.to_thread(callee.command, "sndcode", "8")
            heard = await asyncio.to_thread(caller.wait_event, "CALL_DTMF_START", EVENT_TIMEOUT_S)
            assert heard.param == "8", heard.raw

            marks: dict[str, tuple[float, float]] = {}

            async def phase(name: str) -> None:
                await asyncio.sleep(SETTLE_S)
                start = callee.heard_s()
                await asyncio.sleep(PHASE_S)
                marks[name] = (start, callee.heard_s())

            await phase("talk")
            await asyncio.to_thread(caller.command, "hold")
            await collector.until(event_with("call.held", by="remote", role="caller"), EVENT_TIMEOUT_S)
            await phase("held")
            await asyncio.to_thread(caller.command, "resume")
            await collector.until(event_with("call.retrieved", by="remote", role="caller"), EVENT_TIMEOUT_S)
            await phase("resumed")
            await asyncio.to_thread(caller.hangup)
            events = await collector.until(event_with("conversation.ended"), EVENT_TIMEOUT_S)

    recording = callee.received_wav()
    frequencies = (TONE_A_HZ, TONE_B_HZ, *MUSIC_ON_HOLD_HZ)
    levels = {
        name: tone_levels(recording, frequencies, start + EDGE_S, end - EDGE_S)
        for name, (start, end) in marks.items()
    }
    music = {name: sum(level[f] for f in MUSIC_ON_HOLD_HZ) for name, level in levels.items()}
    assert levels["talk"][TONE_A_HZ] > HEARD and music["talk"] < SILENT * 2, levels["talk"]
    assert levels["held"][TONE_A_HZ] < SILENT and music["held"] > HEARD, levels["held"]
    assert levels["resumed"][TONE_A_HZ] > HEARD and music["resumed"] < SILENT * 2, levels["resumed"]
    assert_valid_and_gap_free(events)
    dtmf = [
        (e["data"]["digit"], e["data"]["method"], e["data"]["role"])
        for e in events
        if e["type"] == "call.dtmf"
    ]
    assert dtmf == [("5", "rfc4733", "caller"), ("8", "rfc4733", "callee")], dtmf


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "info",
    [
        {"info_type": "application/dtmf-relay", "info_body": "Signal=7", "info_more": "Duration=160"},
        {"info_type": "application/dtmf", "info_body": "7", "info_more": " "},
    ],
    ids=["dtmf-relay", "dtmf"],
)
async def test_a_key_sent_by_sip_info_reaches_the_far_phone_as_rfc4733(
    tmp_path: Path, phones: PhoneFactory, tones: Tones, sipp: Sipp, info: dict[str, str]
) -> None:
    with running_softswitch(tmp_path / "node") as node:
        assert node.mqtt_port is not None
        callee = phones.start("1002", tones.b, registrar_port=node.sip_port)
        await _registered(callee)
        async with collecting(node.mqtt_port, f"{PREFIX}/#") as collector:
            caller = sipp.start(
                "uac_info_dtmf", node.sip_port, users=[("1001", DEMO_PASSWORDS["1001"])], calls=1,
                timeout_s=SIPP_TIMEOUT_S, sets=info, extra_args=["-s", "1002", "-d", str(INFO_PAUSE_MS)],
            )  # fmt: skip
            heard = await asyncio.to_thread(callee.wait_event, "CALL_DTMF_START", EVENT_TIMEOUT_S)
            assert heard.param == "7", heard.raw
            result = await asyncio.to_thread(caller.wait)
            assert result.ok and result.successful == 1, result.describe()
            events = await collector.until(event_with("conversation.ended"), EVENT_TIMEOUT_S)
    dtmf = [(e["data"]["digit"], e["data"]["method"]) for e in events if e["type"] == "call.dtmf"]
    assert dtmf == [("7", "info")], dtmf


TARGET_HZ = 1100.0  # the transfer target's tone


@pytest.mark.timeout(150)
@pytest.mark.parametrize("target", ["1004", "*97"])
async def test_a_phone_transfers_its_call_with_refer(
    tmp_path: Path, phones: PhoneFactory, tones: Tones, target: str
) -> None:
    """1001 calls 1002; 1002 sends REFER (RFC 3515) to transfer 1001 to `target`: a registered user,
    whose phone then talks with 1001, or a dialplan number (*97, the echo test, so 1001 hears itself).
    The REFER is accepted (202) and its NOTIFYs tell 1002 the transfer worked; 1002's call ends."""
    target_tone = make_tone(tmp_path / "target.wav", TARGET_HZ)
    with running_softswitch(tmp_path / "node") as node:
        assert node.mqtt_port is not None
        caller = phones.start("1001", tones.a, registrar_port=node.sip_port)
        transferor = phones.start("1002", tones.b, registrar_port=node.sip_port)
        receiver = phones.start("1004", target_tone, registrar_port=node.sip_port)
        await _registered(caller, transferor, receiver)
        async with collecting(node.mqtt_port, f"{PREFIX}/#") as collector:
            await _in_a_call(node, caller, transferor, collector)
            await asyncio.to_thread(transferor.command, "transfer", f"sip:{target}@127.0.0.1:{node.sip_port}")
            events = await collector.until(event_with("transfer.completed", flow="blind"), EVENT_TIMEOUT_S)
            await asyncio.to_thread(transferor.wait_event, "CALL_CLOSED", EVENT_TIMEOUT_S)
            if target == "1004":
                await asyncio.to_thread(receiver.wait_event, "CALL_ESTABLISHED", EVENT_TIMEOUT_S)
            await asyncio.sleep(SETTLE_S)
            start = caller.heard_s()
            await asyncio.sleep(PHASE_S)
            end = caller.heard_s()
            await asyncio.to_thread(caller.hangup)
            events = await collector.until(
                lambda evs: (
                    sum(e["type"] == "conversation.ended" for e in evs) >= (1 if target == "1004" else 2)
                ),
                EVENT_TIMEOUT_S,
            )
    levels = tone_levels(
        caller.received_wav(), (TONE_A_HZ, TONE_B_HZ, TARGET_HZ), start + EDGE_S, end - EDGE_S
    )
    heard = TARGET_HZ if target == "1004" else TONE_A_HZ  # the target's phone, or the caller's own echo
    assert levels[heard] > HEARD, levels
    assert all(level < SILENT for hz, level in levels.items() if hz != heard), levels
    if target == "1004":
        back = tone_levels(
            receiver.received_wav(), (TONE_A_HZ, TONE_B_HZ), EDGE_S, receiver.heard_s() - EDGE_S
        )
        assert back[TONE_A_HZ] > HEARD and back[TONE_B_HZ] < SILENT, back
    assert_valid_and_gap_free(events)
    transfer = [e["type"] for e in events if e["type"].startswith("transfer.")]
    assert transfer == ["transfer.initiated", "transfer.completed"], transfer
    refer = transferor.sip_trace()
    assert any(m.method == "REFER" for m in refer), transferor.log_tail()
    notify = [m.text for m in refer if m.method == "NOTIFY"]
    assert any("SIP/2.0 200" in text for text in notify), notify  # sipfrag: the target answered


def _header(text: str, name: str) -> str:
    match = re.search(rf"^{name}:\s*(.+?)\s*$", text, re.M | re.I)
    assert match is not None, (name, text)
    return match.group(1)


def _tag(value: str) -> str:
    match = re.search(r";\s*tag=([^;>\s]+)", value)
    assert match is not None, value
    return match.group(1)


@pytest.mark.timeout(120)
async def test_an_invite_with_replaces_takes_over_a_call(
    tmp_path: Path, phones: PhoneFactory, tones: Tones, sipp: Sipp
) -> None:
    """1001 calls 1002; a third phone (1003, SIPp) sends INVITE with `Replaces` naming 1001's dialog with
    the node (RFC 3891, how an attended transfer ends). The edge steers it to the worker that holds that
    dialog, which answers it and ends 1001's leg: 1002 now hears the new phone's audio, not 1001."""
    with running_softswitch(tmp_path / "node") as node:
        assert node.mqtt_port is not None
        caller = phones.start("1001", tones.a, registrar_port=node.sip_port)
        callee = phones.start("1002", tones.b, registrar_port=node.sip_port)
        await _registered(caller, callee)
        async with collecting(node.mqtt_port, f"{PREFIX}/#") as collector:
            await _in_a_call(node, caller, callee, collector)
            ok = next(
                m.text for m in caller.sip_trace()
                if m.status == 200 and re.search(r"^CSeq:\s*\d+\s+INVITE", m.text, re.M | re.I)
            )  # fmt: skip
            # Seen from the node (the UA receiving the Replaces), its own tag is the to-tag.
            tags = f"to-tag={_tag(_header(ok, 'To'))};from-tag={_tag(_header(ok, 'From'))}"
            replaces = f"{_header(ok, 'Call-ID')};{tags}"
            await asyncio.sleep(SETTLE_S)
            talk = (callee.heard_s(), 0.0)
            await asyncio.sleep(PHASE_S)
            talk = (talk[0], callee.heard_s())
            newcomer = sipp.start(
                "uac_replaces", node.sip_port, users=[("1003", DEMO_PASSWORDS["1003"])], calls=1,
                timeout_s=SIPP_TIMEOUT_S, sets={"replaces": replaces},
                extra_args=["-s", "1001", "-d", str(REPLACES_HOLD_MS)],
            )  # fmt: skip
            events = await collector.until(event_with("transfer.completed", flow="attended"), EVENT_TIMEOUT_S)
            await asyncio.to_thread(caller.wait_event, "CALL_CLOSED", EVENT_TIMEOUT_S)
            await asyncio.sleep(SETTLE_S)
            start = callee.heard_s()
            await asyncio.sleep(PHASE_S)
            replaced = (start, callee.heard_s())
            result = await asyncio.to_thread(newcomer.wait)
            assert result.ok and result.successful == 1, result.describe()
            events = await collector.until(event_with("conversation.ended"), EVENT_TIMEOUT_S)
    recording = callee.received_wav()
    before = tone_levels(recording, (TONE_A_HZ,), talk[0] + EDGE_S, talk[1] - EDGE_S)
    after = tone_levels(recording, (TONE_A_HZ,), replaced[0] + EDGE_S, replaced[1] - EDGE_S)
    samples = read_wav(recording)
    rate = samples.rate_hz
    voice = rms(samples.samples[int((replaced[0] + EDGE_S) * rate) : int((replaced[1] - EDGE_S) * rate)])
    assert before[TONE_A_HZ] > HEARD and after[TONE_A_HZ] < SILENT, (before, after)
    assert voice > VOICE_RMS, voice  # SIPp's A-law speech sample
    assert_valid_and_gap_free(events)
    (done,) = [e["data"] for e in events if e["type"] == "transfer.completed"]
    assert done["target"] == {"kind": "user", "id": "1003"}, done
