"""Two real phones (baresip) register with the edge and call each other through it.

RFC 3261 §10 (registration), §22.3 (the INVITE answers a 407 challenge), §16 (the edge proxies the call
to the callee's registered flow, with Record-Route so the ACK and BYE come back through it) and
RFC 3550 media flowing both ways, proved by each party hearing the other's tone.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.integration.audio import measure_tone
from tests.integration.conftest import DEMO_PASSWORDS, TONE_A_HZ, TONE_B_HZ, PhoneFactory, Tones
from tests.integration.helpers import RunningSoftswitch
from tests.integration.peers import Sipp, free_port

pytestmark = pytest.mark.integration

TRANSPORTS = ["udp", "tcp"]
REGISTER_TIMEOUT_S = 10.0  # a digest registration on loopback takes milliseconds
CALL_SETUP_TIMEOUT_S = 15.0  # INVITE, 407, INVITE, 180, 200, ACK on loopback: milliseconds
AUDIO_SECONDS = 3.0  # tone exchanged before hanging up
MIN_VOICED_S = 2.0  # of AUDIO_SECONDS, what must arrive as sound (set-up and jitter buffer eat the rest)
FREQUENCY_TOLERANCE_HZ = 8.0  # two fine-scan bins (tests/integration/audio.py)
REJECT_TIMEOUT_S = 15.0  # a 404/480 comes straight from the edge
SIPP_CALLS = 10  # calls of the SIPp pair through the edge
SIPP_CALL_RATE = 10  # per second
SIPP_HOLD_MS = 200  # each call's duration once answered
SIPP_TIMEOUT_S = 30.0
SIPP_UAS_STARTUP_S = 0.3  # for the callee SIPp to bind its port after the registration run released it


def _close_to(measured: float, expected: float) -> bool:
    return abs(measured - expected) <= FREQUENCY_TOLERANCE_HZ


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_call_through_the_edge_carries_audio_both_ways(
    edge: RunningSoftswitch, phones: PhoneFactory, tones: Tones, transport: str
) -> None:
    caller = phones.start("1001", tones.a, registrar_port=edge.sip_port, transport=transport)
    callee = phones.start("1002", tones.b, registrar_port=edge.sip_port, transport=transport)
    caller.wait_registered(REGISTER_TIMEOUT_S)
    callee.wait_registered(REGISTER_TIMEOUT_S)

    caller.dial(f"sip:1002@127.0.0.1:{edge.sip_port}")
    for phone in (caller, callee):
        phone.wait_event("CALL_ESTABLISHED", CALL_SETUP_TIMEOUT_S)
        phone.wait_event("CALL_RTPESTAB", CALL_SETUP_TIMEOUT_S)
    time.sleep(AUDIO_SECONDS)
    caller.hangup()
    for phone in (caller, callee):
        phone.wait_event("CALL_CLOSED", CALL_SETUP_TIMEOUT_S)

    heard_by_caller = measure_tone(caller.received_wav())
    heard_by_callee = measure_tone(callee.received_wav())
    assert heard_by_caller.voiced_s >= MIN_VOICED_S, heard_by_caller.describe()
    assert heard_by_callee.voiced_s >= MIN_VOICED_S, heard_by_callee.describe()
    assert _close_to(heard_by_caller.dominant_hz, TONE_B_HZ), heard_by_caller.describe()
    assert _close_to(heard_by_callee.dominant_hz, TONE_A_HZ), heard_by_callee.describe()
    # Nobody hears themselves: the caller's recording is not its own tone.
    assert not _close_to(heard_by_caller.dominant_hz, TONE_A_HZ), heard_by_caller.describe()

    # Record-Route kept the edge in the dialog (RFC 3261 §16.6 step 4): the caller sent its ACK and BYE
    # to the edge, and they reached the callee from the edge's address, on the flow it registered.
    edge_address = f"127.0.0.1:{edge.sip_port}"
    for method in ("ACK", "BYE"):
        sent = [m for m in caller.sip_trace() if m.method == method]
        received = [m for m in callee.sip_trace() if m.method == method]
        assert sent and all(m.destination == edge_address for m in sent), [m.start_line for m in sent]
        assert received, f"the callee received no {method}"
        assert all(m.source == edge_address for m in received), [(m.source, m.destination) for m in received]


@pytest.mark.timeout(60)
def test_call_to_a_user_without_binding_gets_480(
    edge: RunningSoftswitch, phones: PhoneFactory, tones: Tones
) -> None:
    """1003 exists but has not registered: 480 Temporarily Unavailable (RFC 3261 §21.4.18)."""
    caller = phones.start("1001", tones.a, registrar_port=edge.sip_port)
    caller.wait_registered(REGISTER_TIMEOUT_S)
    caller.dial(f"sip:1003@127.0.0.1:{edge.sip_port}")
    closed = caller.wait_event("CALL_CLOSED", REJECT_TIMEOUT_S)
    assert closed.param.startswith("480"), closed.raw
    assert not caller.has_event("CALL_ESTABLISHED")


@pytest.mark.timeout(60)
def test_call_to_an_unknown_user_gets_404(
    edge: RunningSoftswitch, phones: PhoneFactory, tones: Tones
) -> None:
    """1999 is no user of the domain: 404 Not Found (RFC 3261 §21.4.5)."""
    caller = phones.start("1001", tones.a, registrar_port=edge.sip_port)
    caller.wait_registered(REGISTER_TIMEOUT_S)
    caller.dial(f"sip:1999@127.0.0.1:{edge.sip_port}")
    closed = caller.wait_event("CALL_CLOSED", REJECT_TIMEOUT_S)
    assert closed.param.startswith("404"), closed.raw
    assert not caller.has_event("CALL_ESTABLISHED")


@pytest.mark.timeout(90)
def test_sipp_pair_calls_through_the_edge_along_the_route_set(edge: RunningSoftswitch, sipp: Sipp) -> None:
    """uac_record_route (1001) calls uas_record_route (registered as 1002) through the edge: the INVITE
    answers a 407 (RFC 3261 §22.3), the callee echoes Record-Route (§12.1.1) and the caller sends ACK and
    BYE to the edge with a Route header (§12.2.1.1). UDP only: over TCP the callee would have to answer
    on the connection it registered over, and one SIPp cannot both register and play a UAS scenario."""
    callee_port = free_port()
    registered = sipp.run(
        "register_digest",
        edge.sip_port,
        local_port=callee_port,
        users=[("1002", DEMO_PASSWORDS["1002"])],
        sets={"expires": "300"},
        timeout_s=SIPP_TIMEOUT_S,
    )
    assert registered.ok, registered.describe()
    callee = sipp.start(
        "uas_record_route",
        None,
        local_port=callee_port,
        calls=SIPP_CALLS,
        timeout_s=SIPP_TIMEOUT_S,
        sets={"media": "no"},
    )
    time.sleep(SIPP_UAS_STARTUP_S)
    caller = sipp.run(
        "uac_record_route",
        edge.sip_port,
        calls=SIPP_CALLS,
        rate=SIPP_CALL_RATE,
        timeout_s=SIPP_TIMEOUT_S,
        users=[("1001", DEMO_PASSWORDS["1001"])],
        sets={"media": "no"},
        extra_args=["-s", "1002", "-d", str(SIPP_HOLD_MS)],
    )
    answered = callee.wait() if caller.ok else callee.stop()
    assert caller.ok and caller.successful == SIPP_CALLS, caller.describe()
    assert answered.ok and answered.successful == SIPP_CALLS, answered.describe()

    edge_uri = f"sip:127.0.0.1:{edge.sip_port}"
    in_dialog = [
        m for m in caller.sent_messages() if m.startswith(("BYE ", "ACK ")) and "CSeq: 1 ACK" not in m
    ]
    assert len(in_dialog) >= 2 * SIPP_CALLS, caller.describe()
    for message in in_dialog:
        route = re.search(r"^Route:\s*(.*)$", message, re.M)
        assert route is not None and edge_uri in route.group(1), message
    for message in answered.received_messages():
        if message.startswith(("ACK ", "BYE ")):
            top_via = re.search(r"^Via:\s*([^,\r\n]*)", message, re.M)
            assert top_via is not None and f"127.0.0.1:{edge.sip_port}" in top_via.group(1), message
