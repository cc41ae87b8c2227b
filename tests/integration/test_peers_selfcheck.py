"""The test peers checked against themselves, without the softswitch.

If these fail, a failure of the edge tests says nothing about the edge: the tone analysis, the baresip
driver and the SIPp scenarios are proved here, including that each check is able to fail.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.audio import make_tone, measure_tone
from tests.integration.conftest import TONE_A_HZ, TONE_B_HZ, PhoneFactory, Tones
from tests.integration.peers import SIPP_PCAP_G711A, Sipp, free_port

pytestmark = pytest.mark.integration

FREQUENCY_TOLERANCE_HZ = 8.0  # two fine-scan bins: G.711 and the jitter buffer do not shift a tone more
CALL_SETUP_TIMEOUT_S = 10.0  # loopback set-up takes milliseconds; this only bounds a failure
AUDIO_SECONDS = 3.0  # tone exchanged per call before hanging up
MIN_VOICED_S = 2.0  # of AUDIO_SECONDS, what must have arrived as sound (set-up and buffering eat the rest)
SIPP_UAS_STARTUP_S = 0.3  # for the UAS to bind before the UAC's first request


def test_tone_analysis_tells_frequencies_apart(tmp_path: Path) -> None:
    """The measurement finds the tone that is there and not the other one (Goertzel scan)."""
    for frequency in (TONE_A_HZ, TONE_B_HZ, 1000.0):
        measured = measure_tone(make_tone(tmp_path / f"{frequency:.0f}.wav", frequency, seconds=2))
        assert abs(measured.dominant_hz - frequency) <= FREQUENCY_TOLERANCE_HZ, measured.describe()
        assert measured.dominance > 0.8, measured.describe()
        assert measured.voiced_s >= 1.5, measured.describe()
    a = measure_tone(tmp_path / f"{TONE_A_HZ:.0f}.wav")
    assert abs(a.dominant_hz - TONE_B_HZ) > FREQUENCY_TOLERANCE_HZ
    assert a.power_ratio(TONE_A_HZ, TONE_B_HZ) > 100
    assert a.power_ratio(TONE_B_HZ, TONE_A_HZ) < 0.01


def test_two_baresips_hear_each_other_directly(phones: PhoneFactory, tones: Tones) -> None:
    """Two phones call each other without a registrar; each records the other's tone."""
    alice = phones.start("alice", tones.a)
    bob = phones.start("bob", tones.b)
    alice.dial(bob.direct_uri)
    for phone in (alice, bob):
        phone.wait_event("CALL_ESTABLISHED", CALL_SETUP_TIMEOUT_S)
        phone.wait_event("CALL_RTPESTAB", CALL_SETUP_TIMEOUT_S)
    time.sleep(AUDIO_SECONDS)
    alice.hangup()
    for phone in (alice, bob):
        phone.wait_event("CALL_CLOSED", CALL_SETUP_TIMEOUT_S)

    heard_by_alice = measure_tone(alice.received_wav())
    heard_by_bob = measure_tone(bob.received_wav())
    sent_by_alice = measure_tone(alice.sent_wav())
    assert heard_by_alice.voiced_s >= MIN_VOICED_S, heard_by_alice.describe()
    assert heard_by_bob.voiced_s >= MIN_VOICED_S, heard_by_bob.describe()
    assert abs(heard_by_alice.dominant_hz - TONE_B_HZ) <= FREQUENCY_TOLERANCE_HZ, heard_by_alice.describe()
    assert abs(heard_by_bob.dominant_hz - TONE_A_HZ) <= FREQUENCY_TOLERANCE_HZ, heard_by_bob.describe()
    # The 440 Hz party's own audio does not pass for 660 Hz: the check can fail.
    assert abs(sent_by_alice.dominant_hz - TONE_A_HZ) <= FREQUENCY_TOLERANCE_HZ, sent_by_alice.describe()
    assert abs(sent_by_alice.dominant_hz - TONE_B_HZ) > FREQUENCY_TOLERANCE_HZ, sent_by_alice.describe()
    assert abs(heard_by_bob.dominant_hz - TONE_B_HZ) > FREQUENCY_TOLERANCE_HZ, heard_by_bob.describe()


def test_baresip_reports_a_rejected_call(phones: PhoneFactory, tones: Tones, sipp: Sipp) -> None:
    """A refused call closes with the status line in CALL_CLOSED's param (how the edge tests read
    404 and 480), and is never established."""
    port = free_port()
    callee = sipp.start("uas_reject_480", None, local_port=port, timeout_s=15)
    alice = phones.start("alice", tones.a)
    alice.dial(f"sip:1003@127.0.0.1:{port}")
    closed = alice.wait_event("CALL_CLOSED", CALL_SETUP_TIMEOUT_S)
    result = callee.wait()
    assert result.ok, result.describe()
    assert closed.param == "480 Temporarily Unavailable", closed.raw
    assert not alice.has_event("CALL_ESTABLISHED")


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_record_route_scenarios_call_each_other(sipp: Sipp, transport: str) -> None:
    """uac_record_route and uas_record_route complete calls SIPp to SIPp (no proxy, empty route set)."""
    calls = 5
    port = free_port()
    uas = sipp.start(
        "uas_record_route",
        None,
        local_port=port,
        transport=transport,
        calls=calls,
        timeout_s=30,
        sets={"media": "no"},
    )
    time.sleep(SIPP_UAS_STARTUP_S)
    uac = sipp.run(
        "uac_record_route",
        port,
        transport=transport,
        calls=calls,
        rate=20,
        timeout_s=20,
        users=[("1001", "demo1001")],
        sets={"media": "no"},
        extra_args=["-s", "1002", "-d", "100"],
    )
    callee = uas.wait() if uac.ok else uas.stop()
    assert uac.ok and uac.successful == calls, uac.describe()
    assert callee.ok and callee.successful == calls, callee.describe()
    statuses = uac.received_statuses()
    assert statuses.count(200) == 2 * calls  # the INVITE's and the BYE's


def test_record_route_scenarios_with_pcap_media(sipp: Sipp) -> None:
    """With -set media yes both sides play the G.711 pcap; the call still completes."""
    assert SIPP_PCAP_G711A.is_file(), f"{SIPP_PCAP_G711A} is missing: run `make test` (sip-tester)"
    port = free_port()
    uas = sipp.start("uas_record_route", None, local_port=port, calls=1, timeout_s=30, sets={"media": "yes"})
    time.sleep(SIPP_UAS_STARTUP_S)
    uac = sipp.run(
        "uac_record_route",
        port,
        calls=1,
        timeout_s=20,
        users=[("1001", "demo1001")],
        sets={"media": "yes"},
        extra_args=["-s", "1002", "-d", "1500"],
    )
    callee = uas.wait() if uac.ok else uas.stop()
    assert uac.ok, uac.describe()
    assert callee.ok, callee.describe()
    # The caller held the call for its -d pause while the pcaps played: the call length shows it.
    assert uac.stats.get("CallLength(C)", "").startswith("00:00:01"), uac.describe()


@pytest.mark.parametrize(
    ("binding_params", "should_pass"), [(";expires=60", True), ("", False)], ids=["listed", "unlisted"]
)
def test_register_scenario_checks_the_binding(sipp: Sipp, binding_params: str, should_pass: bool) -> None:
    """register_digest answers the 401 with digest credentials and fails when the 200 does not list the
    binding with an expires parameter."""
    port = free_port()
    registrar = sipp.start(
        "registrar_stub_uas", None, local_port=port, timeout_s=15, keys={"binding_params": binding_params}
    )
    time.sleep(SIPP_UAS_STARTUP_S)
    result = sipp.run(
        "register_digest", port, users=[("1001", "demo1001")], sets={"expires": "60"}, timeout_s=10
    )
    registrar.wait() if result.ok else registrar.stop()
    assert result.received_statuses() == [401, 200], result.describe()
    authorization = [m for m in result.messages.split("-----") if "Authorization: Digest" in m]
    assert authorization and 'username="1001"' in authorization[0], result.describe()
    assert result.ok is should_pass, result.describe()
    if not should_pass:
        assert result.stat("FailedRegexpHdrNotFound(C)") + result.stat("FailedRegexpDoesntMatch(C)") == 1


@pytest.mark.parametrize(("transport", "sipp_transport"), [("udp", "u1"), ("tcp", "t1")])
def test_baresip_registers_with_digest(
    phones: PhoneFactory, tones: Tones, sipp: Sipp, transport: str, sipp_transport: str
) -> None:
    """The phone answers a 401 with digest credentials (RFC 3261 §22.2) and the driver sees it
    registered; over TCP everything stays on the one connection it opened."""
    port = free_port()
    registrar = sipp.start(
        "registrar_stub_uas",
        None,
        local_port=port,
        transport=sipp_transport,
        timeout_s=15,
        keys={"binding_params": ";expires=300"},
    )
    time.sleep(SIPP_UAS_STARTUP_S)
    phone = phones.start("1001", tones.a, registrar_port=port, transport=transport)
    assert "OK" in phone.wait_registered(CALL_SETUP_TIMEOUT_S)
    result = registrar.wait()
    assert result.ok, result.describe()
    registers = [m for m in phone.sip_trace() if m.method == "REGISTER"]
    assert len(registers) == 2, [m.start_line for m in registers]
    assert 'username="1001"' in registers[1].text and "Authorization: Digest" in registers[1].text
    assert {m.transport for m in registers} == {transport.upper()}
    assert {m.destination for m in registers} == {f"127.0.0.1:{port}"}
    phone.stop(graceful=False)  # the stand-in registrar is gone: nobody would answer the un-REGISTER
