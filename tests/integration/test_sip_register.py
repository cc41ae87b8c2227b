"""Registration with digest authentication against the running edge, driven by SIPp over UDP and TCP.

RFC 3261 §10 (registrar: add, list, expire and remove bindings), §22 and RFC 7616 (digest challenge and
response), and the edge's temporary block after repeated failures.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.conftest import DEMO_PASSWORDS, EDGE_AUTH_MAX_FAILURES
from tests.integration.helpers import RunningSoftswitch
from tests.integration.peers import Sipp, SippResult

pytestmark = pytest.mark.integration

TRANSPORTS = [pytest.param("u1", id="udp"), pytest.param("t1", id="tcp")]
SIPP_TIMEOUT_S = 20.0  # one registration takes milliseconds on loopback; this bounds a hang
REQUESTED_EXPIRES_S = 300  # inside the edge's default [min_expires, max_expires]
SHORT_EXPIRES_S = 2  # for the expiry test: above the test config's min_expires = 1
EXPIRY_WAIT_MS = 4_000  # twice SHORT_EXPIRES_S: the binding must be gone by then
LOAD_REGISTRATIONS = 500  # bounded load: 500 digest registrations (1,000 transactions)
LOAD_RATE = 200  # REGISTERs started per second
LOAD_CONCURRENCY = 100  # registrations in flight at most
LOAD_TIMEOUT_S = 60.0  # 500 at 200/s need 2.5 s; the rest is margin for a slow CI machine


def _binding_contacts(message: str) -> list[str]:
    """Contact values of a 200 to REGISTER (one header per binding or a comma list)."""
    values: list[str] = []
    for line in message.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("contact", "m"):
            values.extend(v.strip() for v in re.split(r",(?=\s*<)", value))
    return values


def _register(sipp: Sipp, edge: RunningSoftswitch, transport: str, user: str, password: str) -> SippResult:
    return sipp.run(
        "register_digest",
        edge.sip_port,
        transport=transport,
        users=[(user, password)],
        sets={"expires": str(REQUESTED_EXPIRES_S)},
        timeout_s=SIPP_TIMEOUT_S,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_right_password_registers_and_lists_the_binding(
    edge: RunningSoftswitch, sipp: Sipp, transport: str
) -> None:
    result = _register(sipp, edge, transport, "1001", DEMO_PASSWORDS["1001"])
    assert result.ok, result.describe()
    assert result.received_statuses() == [401, 200], result.describe()

    challenge, ok = result.received_messages()
    assert re.search(r'^WWW-Authenticate:\s*Digest\s.*realm="127\.0\.0\.1"', challenge, re.M | re.I), (
        challenge
    )
    assert re.search(r"algorithm=MD5", challenge, re.I), challenge  # what SIPp (and many phones) can answer

    contacts = _binding_contacts(ok)
    ours = [c for c in contacts if f"sip:1001@127.0.0.1:{_local_port(result)}" in c]
    assert len(ours) == 1, f"our binding is not listed exactly once in:\n{ok}"
    expires = re.search(r";\s*expires=(\d+)", ours[0])
    assert expires is not None, ours[0]
    assert 0 < int(expires.group(1)) <= REQUESTED_EXPIRES_S, ours[0]


def _local_port(result: SippResult) -> int:
    return int(result.command[result.command.index("-p") + 1])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_password_is_challenged_then_blocked(
    edge: RunningSoftswitch, sipp: Sipp, transport: str
) -> None:
    result = sipp.run(
        "register_wrong_password",
        edge.sip_port,
        transport=transport,
        users=[("1001", "not-the-password")],
        sets={"expires": str(REQUESTED_EXPIRES_S)},
        timeout_s=SIPP_TIMEOUT_S,
    )
    assert result.ok, result.describe()
    statuses = result.received_statuses()
    assert 200 not in statuses, result.describe()
    assert statuses[-1] == 403, result.describe()
    # The first answer is the challenge, the first wrong attempt is challenged again, and the block comes
    # no later than the attempt after the configured number of failures.
    assert statuses[0] == 401 and statuses[1] == 401, statuses
    authenticated_attempts = len(statuses) - 1
    assert authenticated_attempts <= EDGE_AUTH_MAX_FAILURES + 1, statuses
    assert set(statuses[:-1]) == {401}, statuses

    # While the block lasts, even the right password does not register that user from this source ...
    blocked = _register(sipp, edge, transport, "1001", DEMO_PASSWORDS["1001"])
    assert 200 not in blocked.received_statuses(), blocked.describe()
    assert 403 in blocked.received_statuses(), blocked.describe()
    # ... while another user from the same source still can.
    other = _register(sipp, edge, transport, "1002", DEMO_PASSWORDS["1002"])
    assert other.ok, other.describe()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_user_never_registers(edge: RunningSoftswitch, sipp: Sipp, transport: str) -> None:
    result = sipp.run(
        "register_unknown_user",
        edge.sip_port,
        transport=transport,
        users=[("1999", "demo1999")],
        sets={"expires": str(REQUESTED_EXPIRES_S)},
        timeout_s=SIPP_TIMEOUT_S,
    )
    assert result.ok, result.describe()
    statuses = result.received_statuses()
    assert statuses, result.describe()
    assert 200 not in statuses, result.describe()
    assert statuses[-1] in (401, 403, 404), result.describe()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_binding_expires(edge: RunningSoftswitch, sipp: Sipp, transport: str) -> None:
    """Registered for SHORT_EXPIRES_S, listed at once, gone after EXPIRY_WAIT_MS (RFC 3261 §10.2.1)."""
    result = sipp.run(
        "register_expiry",
        edge.sip_port,
        transport=transport,
        users=[("1003", DEMO_PASSWORDS["1003"])],
        sets={"expires": str(SHORT_EXPIRES_S)},
        timeout_s=SIPP_TIMEOUT_S,
        extra_args=["-d", str(EXPIRY_WAIT_MS)],
    )
    assert result.ok, result.describe()
    assert result.received_statuses() == [401, 200, 401, 200, 401, 200], result.describe()
    granted = re.search(r";\s*expires=(\d+)", result.received_messages()[1])
    assert granted is not None and 0 < int(granted.group(1)) <= SHORT_EXPIRES_S, result.received_messages()[1]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_star_contact_removes_every_binding(edge: RunningSoftswitch, sipp: Sipp, transport: str) -> None:
    """Contact: * with Expires: 0 (RFC 3261 §10.2.2) leaves no binding, also for a second contact."""
    other_contact = _register(sipp, edge, transport, "1004", DEMO_PASSWORDS["1004"])
    assert other_contact.ok, other_contact.describe()
    result = sipp.run(
        "unregister_star",
        edge.sip_port,
        transport=transport,
        users=[("1004", DEMO_PASSWORDS["1004"])],
        sets={"expires": str(REQUESTED_EXPIRES_S)},
        timeout_s=SIPP_TIMEOUT_S,
    )
    assert result.ok, result.describe()
    assert result.received_statuses() == [401, 200, 401, 200, 401, 200], result.describe()
    # The first 200 listed both bindings of 1004 (the earlier run's and this one's).
    assert len(_binding_contacts(result.received_messages()[1])) == 2, result.received_messages()[1]


@pytest.mark.timeout(LOAD_TIMEOUT_S + 60)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bounded_registration_load(edge: RunningSoftswitch, sipp: Sipp, transport: str) -> None:
    """LOAD_REGISTRATIONS digest registrations of the four demo users at LOAD_RATE/s: none may fail."""
    users = sorted(DEMO_PASSWORDS.items())
    result = sipp.run(
        "register_digest",
        edge.sip_port,
        transport=transport,
        users=users,
        calls=LOAD_REGISTRATIONS,
        rate=LOAD_RATE,
        limit=LOAD_CONCURRENCY,
        sets={"expires": str(REQUESTED_EXPIRES_S)},
        timeout_s=LOAD_TIMEOUT_S,
        trace_msg=False,
    )
    assert result.ok, result.describe()
    assert result.successful == LOAD_REGISTRATIONS and result.failed == 0, result.describe()
    achieved = result.successful / result.elapsed_s
    print(
        f"\n{transport}: {result.successful} digest registrations, target {LOAD_RATE}/s, "
        f"achieved {achieved:.0f}/s over {result.elapsed_s:.2f} s (SIPp CallRate {result.call_rate:.0f}/s), "
        f"mean registration time {result.response_time_ms} ms, retransmissions {result.retransmissions}"
        + (" — SIPp watchdog fired: the numbers are invalid" if result.watchdog_fired else "")
    )
