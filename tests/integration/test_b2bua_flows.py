"""SIP call flows through the whole softswitch: SIPp phones, the edge, call control and a media worker.

Every call from a phone is two legs (a back-to-back user agent, RFC 7092 §3.1): the caller's INVITE goes
through the edge to a media worker (leg A), call control routes the dialed number with the dialplan and
the worker originates leg B through the edge to the callee's registered contact. These tests drive both
ends with SIPp and check what each end sees on the wire:

- a callee's final response is mapped back to the caller (RFC 3261 §16.7 for the choice, §21.4.24 486,
  §21.6.2 603), ring timeout → CANCEL of leg B (§9.1) and 480 to the caller (§21.4.18);
- a caller's CANCEL (§9.1-§9.2) ends leg A with 487 and cancels leg B;
- dialplan rejects: unknown number 404 (§21.4.5), user without binding 480;
- the per-route call time limit releases both legs with BYE (§15.1.1);
- admission control answers 503 with Retry-After (§21.5.4, §20.33) beyond the call capacity and the call
  rate, and the node keeps serving through an overload.

Every SIPp run is bounded by ``-timeout``; the only network address is 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.conftest import DEMO_PASSWORDS
from tests.integration.helpers import RunningSoftswitch, running_softswitch
from tests.integration.peers import Sipp, SippProcess, SippResult, free_port

pytestmark = pytest.mark.integration

CALLER = "1001"
CALLEE = "1002"
UNBOUND_USER = "1003"  # a demo user that never registers in these tests
UNKNOWN_NUMBER = "1999"  # matches the 1XXX route, but is no user
REGISTER_EXPIRES_S = 300  # the callee's binding outlives every test
SIPP_TIMEOUT_S = 20.0  # one SIPp run of a few calls; a flow here completes in a few seconds at most
SIPP_UAS_STARTUP_S = 0.3  # for a callee SIPp to bind the port its registration run released
CALL_RATE = 10.0  # calls/s for the runs of a few calls
HOLD_MS = 200  # talk time of a call the caller hangs up
HTTP_TIMEOUT_S = 5.0  # /healthz answers at once

RING_TIMEOUT_S = 2.0  # dialplan timeout_s of the no-answer test
RING_TIMEOUT_SLACK_S = 1.5  # the caller's 480 comes after RING_TIMEOUT_S, within this much more
MAX_DURATION_S = 2.0  # dialplan max_duration_s of the time-limit test
MAX_DURATION_SLACK_S = 1.5  # the BYEs come after MAX_DURATION_S, within this much more

CAPACITY_LEGS = 4  # [media] max_calls of the capacity test: two bridged calls
CAPACITY_HOLD_MS = 4000  # the calls filling the node last this long, so the third meets them
ANSWER_WAIT_S = 10.0  # for the calls filling the node to be answered

ADMISSION_CPS = 5  # [media] max_cps of the rate test
BURST_CALLS = 20  # attempts of the burst ...
BURST_RATE = 40.0  # ... started at this rate: all within about half a second
REFILL_WAIT_S = 1.0  # the token bucket is full again after one second

# The overload run: about twice the clean rate of full two-leg calls through one node and one worker on
# these 2 cores (40 calls/s with 0 retransmissions), bounded in calls and time. The node keeps its
# default admission settings: protecting itself at this rate is its own job.
OVERLOAD_RATE = 80.0
OVERLOAD_SECONDS = 15
OVERLOAD_CALLS = int(OVERLOAD_RATE * OVERLOAD_SECONDS)
OVERLOAD_HOLD_MS = 500
OVERLOAD_LIMIT = 400  # calls in flight at once on the SIPp side
OVERLOAD_TIMEOUT_S = 30.0  # SIPp's hard stop: the run itself takes OVERLOAD_SECONDS plus the last holds
CATCH_UP_TIMEOUT_S = 60.0  # for the node to publish the events the load produced
OVERLOAD_SETTLE_S = 1.0  # after the run, for retransmissions and releases to drain before the checks

WORKER_READY = "media worker ready"
WORKER_EXITED = "media worker exited"
POOL_LOGGER = "softswitch.media.pool"


# ---------------------------------------------------------------------------------------- helpers


def _dialplan_toml(tmp_path: Path, dial_options: str) -> str:
    """A dialplan whose 1XXX route has ``dial_options`` (YAML lines), as a top-level config key (it must
    come before any table of the extra TOML)."""
    path = tmp_path / "dialplan.yaml"
    path.write_text(
        "version: 1\n"
        "routes:\n"
        '  - match: "1XXX"\n'
        "    action: dial\n"
        '    target: "${number}"\n'
        f"{dial_options}"
        '  - match: "."\n'
        "    action: hangup\n"
        "    code: 404\n",
        encoding="utf-8",
    )
    return f"dialplan = {json.dumps(str(path))}\n"


def _register(sipp: Sipp, node: RunningSoftswitch, user: str = CALLEE) -> int:
    """Register ``user`` from a fresh port (RFC 3261 §10) and return that port for its UAS to bind."""
    port = free_port()
    result = sipp.run(
        "register_digest",
        node.sip_port,
        local_port=port,
        users=[(user, DEMO_PASSWORDS[user])],
        sets={"expires": str(REGISTER_EXPIRES_S)},
        timeout_s=SIPP_TIMEOUT_S,
    )
    assert result.ok, result.describe()
    return port


def _unregister(sipp: Sipp, node: RunningSoftswitch, port: int, user: str = CALLEE) -> None:
    """Remove ``user``'s binding at ``port`` (Expires: 0, RFC 3261 §10.2.2); another binding must remain,
    for the scenario checks that the 200 lists the current ones."""
    result = sipp.run(
        "register_digest",
        node.sip_port,
        local_port=port,
        users=[(user, DEMO_PASSWORDS[user])],
        sets={"expires": "0"},
        timeout_s=SIPP_TIMEOUT_S,
    )
    assert result.ok, result.describe()


def _callee(
    sipp: Sipp, scenario: str, port: int, *, calls: int = 1, timeout_s: float = SIPP_TIMEOUT_S
) -> SippProcess:
    """A callee UAS on its registered port, waiting for ``calls`` calls."""
    process = sipp.start(scenario, None, local_port=port, calls=calls, timeout_s=timeout_s)
    time.sleep(SIPP_UAS_STARTUP_S)
    return process


def _call(
    sipp: Sipp,
    node: RunningSoftswitch,
    number: str,
    expected: int,
    *,
    alternative: int | None = None,
    hangup: str = "local",
    calls: int = 1,
    rate: float = CALL_RATE,
    hold_ms: int = HOLD_MS,
    limit: int | None = None,
    timeout_s: float = SIPP_TIMEOUT_S,
    trace_msg: bool = True,
    extra_args: tuple[str, ...] = (),
) -> SippProcess:
    """Start uac_expect_status: ``calls`` calls from CALLER to ``number``, each expecting ``expected``
    (or ``alternative``) as the final response; ``hangup`` says who ends an answered call."""
    return sipp.start(
        "uac_expect_status",
        node.sip_port,
        users=[(CALLER, DEMO_PASSWORDS[CALLER])],
        calls=calls,
        rate=rate,
        limit=limit,
        timeout_s=timeout_s,
        trace_msg=trace_msg,
        sets={
            "expected": str(expected),
            "alternative": "none" if alternative is None else str(alternative),
            "hangup": hangup,
        },
        extra_args=["-s", number, "-d", str(hold_ms), *extra_args],
    )


def _run_call(
    sipp: Sipp,
    node: RunningSoftswitch,
    number: str,
    expected: int,
    *,
    alternative: int | None = None,
    hangup: str = "local",
    calls: int = 1,
    rate: float = CALL_RATE,
    hold_ms: int = HOLD_MS,
) -> SippResult:
    """:func:`_call`, waited for."""
    return _call(
        sipp, node, number, expected, alternative=alternative, hangup=hangup, calls=calls, rate=rate,
        hold_ms=hold_ms,
    ).wait()  # fmt: skip


def _finals(result: SippResult) -> list[int]:
    """Final statuses SIPp received for INVITEs (retransmissions of one final count once per call)."""
    finals: list[int] = []
    seen: set[tuple[str, str, int]] = set()
    for message in result.received_messages():
        status = re.match(r"SIP/2\.0 (\d{3}) ", message)
        cseq = re.search(r"^CSeq:\s*(\d+)\s+INVITE\s*$", message, re.M | re.I)
        call_id = re.search(r"^Call-ID:\s*(\S+)", message, re.M | re.I)
        if status is None or cseq is None or call_id is None:
            continue
        code = int(status.group(1))
        key = (call_id.group(1), cseq.group(1), code)
        if code >= 200 and code != 407 and key not in seen:
            seen.add(key)
            finals.append(code)
    return finals


def _received(result: SippResult, start: str) -> list[str]:
    return [m for m in result.received_messages() if m.startswith(start)]


def _message_times(result: SippResult, start: str, direction: str = "received") -> list[float]:
    return result.message_times(start, direction)


def _healthz(node: RunningSoftswitch) -> dict[str, object]:
    with urllib.request.urlopen(node.http_url("/healthz"), timeout=HTTP_TIMEOUT_S) as response:
        body: dict[str, object] = json.loads(response.read())
        assert response.status == 200
    return body


def _caught_up(node: RunningSoftswitch, timeout_s: float) -> float:
    """Wait until the node has published what the load produced (its event outbox is empty); the
    seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with urllib.request.urlopen(node.http_url("/metrics"), timeout=HTTP_TIMEOUT_S) as response:
            text = response.read().decode()
        queued = re.search(r"^softswitch_outbox_queued\s+(\S+)", text, re.M)
        if queued is not None and float(queued.group(1)) == 0:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"the node had not caught up {timeout_s} s after the load")


def _worker_pids(node: RunningSoftswitch) -> list[int]:
    """PIDs of the media workers the pool announced ready, in order (a restart adds one)."""
    return [
        int(record["pid"])
        for record in node.log_records()
        if record.get("event") == WORKER_READY and record.get("logger") == POOL_LOGGER
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_acks(callee: SippProcess, count: int, timeout_s: float) -> None:
    """Until the callee's trace shows ``count`` ACKs received (calls answered and confirmed)."""
    _wait_for_received(callee, "ACK", count, timeout_s)


def _wait_for_received(callee: SippProcess, method: str, count: int, timeout_s: float) -> None:
    """Until the callee's trace shows ``method`` requests of ``count`` distinct dialogs received."""
    log = callee.rundir / "messages.log"
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            text = ""
        blocks = re.split(r"-{20,}[^\n]*\n", text)
        requests = [b.split("\n", 2)[-1] for b in blocks if "message received" in b.split("\n", 1)[0]]
        seen = _call_ids([r for r in requests if r.startswith(method + " ")])
        if seen >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the callee saw {method} in {seen} of {count} dialogs within {timeout_s} s")


@contextmanager
def _node(tmp_path: Path, extra_toml: str = "") -> Iterator[RunningSoftswitch]:
    with running_softswitch(tmp_path / "node", extra_toml) as node:
        yield node


def _expect_one_call(result: SippResult, final: int) -> None:
    assert result.ok and result.successful == 1, result.describe()
    assert _finals(result) == [final], result.describe()


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("scenario", "status"), [("uas_busy", 486), ("uas_decline", 603)])
def test_callee_refusal_reaches_the_caller(tmp_path: Path, sipp: Sipp, scenario: str, status: int) -> None:
    """The callee answers 486 (busy) or 603 (decline, after ringing): leg B ends with that status and the
    caller's INVITE gets the same final response (RFC 3261 §16.7 step 6 in a B2BUA)."""
    with _node(tmp_path) as node:
        callee = _callee(sipp, scenario, _register(sipp, node))
        caller = _run_call(sipp, node, CALLEE, status)
        answered = callee.wait() if caller.ok else callee.stop()
        _expect_one_call(caller, status)
        assert answered.ok and answered.successful == 1, answered.describe()
        assert len(_received(answered, "INVITE ")) == 1, answered.describe()


@pytest.mark.timeout(60)
def test_no_answer_cancels_the_callee_and_gives_the_caller_480(tmp_path: Path, sipp: Sipp) -> None:
    """The route rings for RING_TIMEOUT_S: then leg B is cancelled (RFC 3261 §9.1: the callee gets CANCEL
    and answers 487) and the caller gets 480 Temporarily Unavailable (§21.4.18)."""
    dialplan = _dialplan_toml(tmp_path, f"    timeout_s: {RING_TIMEOUT_S:g}\n")
    with _node(tmp_path, dialplan) as node:
        callee = _callee(sipp, "uas_no_answer", _register(sipp, node))
        caller = _run_call(sipp, node, CALLEE, 480)
        ringing = callee.wait() if caller.ok else callee.stop()
        _expect_one_call(caller, 480)
        assert ringing.ok and ringing.successful == 1, ringing.describe()
        assert len(_received(ringing, "CANCEL ")) == 1, ringing.describe()

        invite_sent = _message_times(caller, "INVITE ", "sent")[-1]  # the authenticated one
        final_at = _message_times(caller, "SIP/2.0 480 ")[0]
        waited = final_at - invite_sent
        assert RING_TIMEOUT_S <= waited <= RING_TIMEOUT_S + RING_TIMEOUT_SLACK_S, waited


@pytest.mark.timeout(60)
def test_caller_cancel_while_ringing(tmp_path: Path, sipp: Sipp) -> None:
    """The caller cancels after the provisional response: its CANCEL gets 200 and its INVITE 487
    (RFC 3261 §9.2); the callee's INVITE is cancelled in turn and it sees the CANCEL."""
    with _node(tmp_path) as node:
        callee = _callee(sipp, "uas_no_answer", _register(sipp, node))
        caller = sipp.run(
            "uac_cancel",
            node.sip_port,
            users=[(CALLER, DEMO_PASSWORDS[CALLER])],
            timeout_s=SIPP_TIMEOUT_S,
            extra_args=["-s", CALLEE],
        )
        ringing = callee.wait() if caller.ok else callee.stop()
        assert caller.ok and caller.successful == 1, caller.describe()
        statuses = caller.received_statuses()
        assert 200 in statuses and statuses[-1] == 487, caller.describe()
        cancel_ok = [m for m in _received(caller, "SIP/2.0 200 ") if re.search(r"^CSeq:.*CANCEL", m, re.M)]
        assert cancel_ok, caller.describe()
        assert ringing.ok and ringing.successful == 1, ringing.describe()
        assert len(_received(ringing, "CANCEL ")) == 1, ringing.describe()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("number", "status"), [(UNKNOWN_NUMBER, 404), (UNBOUND_USER, 480)])
def test_dialplan_rejects(tmp_path: Path, sipp: Sipp, number: str, status: int) -> None:
    """1999 matches the 1XXX route but is no user: 404 Not Found (RFC 3261 §21.4.5); 1003 is a user
    without a binding: 480 Temporarily Unavailable (§21.4.18). No leg B is attempted."""
    with _node(tmp_path) as node:
        caller = _run_call(sipp, node, number, status)
        _expect_one_call(caller, status)
        assert not _received(caller, "BYE "), caller.describe()


@pytest.mark.timeout(60)
def test_max_duration_releases_both_legs(tmp_path: Path, sipp: Sipp) -> None:
    """An answered call on a route with max_duration_s is released by the softswitch: both ends receive
    a BYE (RFC 3261 §15.1.1) about MAX_DURATION_S after the answer, and neither hangs up itself."""
    dialplan = _dialplan_toml(tmp_path, f"    timeout_s: 10\n    max_duration_s: {MAX_DURATION_S:g}\n")
    with _node(tmp_path, dialplan) as node:
        callee = _callee(sipp, "uas_answer_hold", _register(sipp, node))
        caller = _run_call(sipp, node, CALLEE, 200, hangup="remote")
        held = callee.wait() if caller.ok else callee.stop()
        _expect_one_call(caller, 200)
        assert held.ok and held.successful == 1, held.describe()
        assert not [m for m in caller.sent_messages() if m.startswith("BYE ")], caller.describe()
        for side in (caller, held):
            assert len(_received(side, "BYE ")) == 1, side.describe()
        answered_at = _message_times(caller, "SIP/2.0 200 ")[0]
        for side in (caller, held):
            released = _message_times(side, "BYE ")[0] - answered_at
            assert MAX_DURATION_S - 0.2 <= released <= MAX_DURATION_S + MAX_DURATION_SLACK_S, released


@pytest.mark.timeout(90)
def test_calls_beyond_capacity_get_503(tmp_path: Path, sipp: Sipp) -> None:
    """With room for two bridged calls, a third gets 503 Service Unavailable with Retry-After (RFC 3261
    §21.5.4, §20.33) while the first two go on and complete; afterwards a new call works."""
    with _node(tmp_path, f"[media]\nmax_calls = {CAPACITY_LEGS}\n") as node:
        callee = _callee(
            sipp, "uas_answer_hold", _register(sipp, node), calls=3, timeout_s=2 * SIPP_TIMEOUT_S
        )
        holding = _call(sipp, node, CALLEE, 200, calls=2, hold_ms=CAPACITY_HOLD_MS)
        _wait_for_acks(callee, 2, ANSWER_WAIT_S)
        refused = _run_call(sipp, node, CALLEE, 503)
        held = holding.wait()
        _expect_one_call(refused, 503)
        assert held.ok and held.successful == 2, held.describe()
        (rejection,) = _received(refused, "SIP/2.0 503 ")
        assert re.search(r"^Retry-After:\s*\d+", rejection, re.M), rejection

        again = _run_call(sipp, node, CALLEE, 200)
        answered = callee.wait() if again.ok else callee.stop()
        _expect_one_call(again, 200)
        assert answered.ok and answered.successful == 3, answered.describe()


@pytest.mark.timeout(90)
def test_call_rate_admission(tmp_path: Path, sipp: Sipp) -> None:
    """A burst of BURST_CALLS attempts well above max_cps: the excess gets 503 with Retry-After from the
    edge, the admitted calls complete, and afterwards calls are admitted again."""
    with _node(tmp_path, f"[media]\nmax_cps = {ADMISSION_CPS}\n") as node:
        callee_port = _register(sipp, node)
        callee = _callee(sipp, "uas_answer_hold", callee_port, calls=BURST_CALLS)
        burst = _run_call(
            sipp, node, CALLEE, 200, alternative=503, calls=BURST_CALLS, rate=BURST_RATE, hold_ms=HOLD_MS
        )
        assert burst.ok and burst.successful == BURST_CALLS, burst.describe()
        finals = _finals(burst)
        # The caller's BYE is answered by its own leg; the B2BUA's BYE to the callee may still be on its
        # way: wait for it before stopping the callee.
        _wait_for_received(callee, "BYE", finals.count(200), SIPP_TIMEOUT_S)
        answered = callee.stop()
        assert sorted(set(finals)) == [200, 503] and len(finals) == BURST_CALLS, finals
        # The bucket holds one second of calls: at most that many plus what refilled during the burst.
        sent = _message_times(burst, "INVITE ", "sent")
        burst_s = max(sent) - min(sent)
        assert finals.count(200) <= ADMISSION_CPS * (1 + burst_s) + 1, (finals, burst_s)
        for rejection in _received(burst, "SIP/2.0 503 "):
            assert re.search(r"^Retry-After:\s*\d+", rejection, re.M), rejection

        # The callee saw exactly the admitted calls, each through to the BYE.
        # (distinct Call-IDs: on a loaded machine a request may be retransmitted once)
        assert _call_ids(_received(answered, "INVITE ")) == finals.count(200), answered.describe()
        assert _call_ids(_received(answered, "BYE ")) == finals.count(200), answered.describe()

        time.sleep(REFILL_WAIT_S)
        callee = _callee(sipp, "uas_answer_hold", callee_port)
        again = _run_call(sipp, node, CALLEE, 200)
        answered = callee.wait() if again.ok else callee.stop()
        _expect_one_call(again, 200)
        assert answered.ok and answered.successful == 1, answered.describe()


@pytest.mark.timeout(120)
def test_overload_ends_in_completed_calls_or_503(tmp_path: Path, sipp: Sipp) -> None:
    """OVERLOAD_RATE calls/s for OVERLOAD_SECONDS: every call completes or gets 503 (admission by rate
    and by free slots); the node, its HTTP side and its media workers survive without a restart, and a
    call right after the run completes."""
    with _node(tmp_path) as node:
        workers_before = _worker_pids(node)
        assert workers_before, node.log_tail()
        callee = sipp.start(
            "uas_answer_hold",
            None,
            local_port=_register(sipp, node),
            calls=OVERLOAD_CALLS + 1,
            timeout_s=OVERLOAD_TIMEOUT_S + SIPP_TIMEOUT_S,
            trace_msg=False,
        )
        time.sleep(SIPP_UAS_STARTUP_S)
        running = _call(
            sipp,
            node,
            CALLEE,
            200,
            alternative=503,
            calls=OVERLOAD_CALLS,
            rate=OVERLOAD_RATE,
            hold_ms=OVERLOAD_HOLD_MS,
            limit=OVERLOAD_LIMIT,
            timeout_s=OVERLOAD_TIMEOUT_S,
            trace_msg=False,
            extra_args=("-trace_counts",),
        )
        load = running.wait()
        time.sleep(OVERLOAD_SETTLE_S)
        counts = _outcome_counts(running.rundir)
        print(
            f"overload: {OVERLOAD_CALLS} calls at {OVERLOAD_RATE:g}/s: {counts['completed']} completed, "
            f"{counts['refused']} got 503, {load.failed} failed, {load.retransmissions} retransmissions, "
            f"SIPp rate {load.call_rate:.1f}/s"
        )
        assert not load.watchdog_fired, "SIPp itself fell behind: the run is invalid\n" + load.describe()
        # Saturated, the node does not finish every offered call within SIPp's hard stop (some are still
        # being retransmitted then); what must hold is that no call ended any other way than answered or
        # refused with 503 (the scenario fails a call on any other final response).
        assert load.failed == 0, load.describe()
        assert counts["completed"] > 0 and counts["refused"] > 0, counts

        assert node.process.poll() is None, node.log_tail()
        assert _healthz(node)["status"] == "ok"
        # The load leaves events to publish (each call is a dozen); calls are served normally once
        # those are out.
        print(f"overload: event backlog published in {_caught_up(node, CATCH_UP_TIMEOUT_S):.1f} s")
        assert _worker_pids(node) == workers_before, node.log_tail()
        assert all(_alive(pid) for pid in workers_before), workers_before

        # A fresh callee, on a fresh port, for the call after the load: the load's callee may have reached
        # its own time limit while the backlog was published, and BYEs it left unanswered when it stopped
        # are still retransmitted to its port (RFC 3261 §17.1.2.2: for up to 64*T1).
        callee.stop()
        fresh_port = _register(sipp, node)
        _unregister(sipp, node, callee.local_port)
        callee = _callee(sipp, "uas_answer_hold", fresh_port)
        after = _run_call(sipp, node, CALLEE, 200)
        answered = callee.wait() if after.ok else callee.stop()
        assert after.ok and after.successful == 1, (
            after.describe() + "\ncallee:\n" + answered.describe() + "\nnode:\n" + node.log_tail()
        )
        assert _finals(after) == [200], after.describe()
        assert answered.ok and answered.successful == 1, answered.describe()
    # The workers also survived their shutdown after the load (a failed library assertion aborts them).
    exits = [r for r in node.log_records() if r.get("event") == WORKER_EXITED]
    assert all(r.get("code") == 0 for r in exits), exits
    assert "Assertion" not in node.log_text(), node.log_tail()


def _call_ids(messages: list[str]) -> int:
    """How many distinct dialogs (Call-IDs) these messages belong to."""
    return len({m.group(1) for text in messages if (m := re.search(r"^Call-ID:\s*(\S+)", text, re.M | re.I))})


def _outcome_counts(rundir: Path) -> dict[str, int]:
    """Calls answered and calls refused with 503, from SIPp's per-message counts (``-trace_counts``):
    the first ``N_200_Recv`` column of uac_expect_status is the INVITE's 200, ``N_503_Recv`` its 503."""
    files = sorted(rundir.glob("uac_expect_status_*_counts.csv"))
    assert files, f"no -trace_counts file in {rundir}"
    lines = [line for line in files[-1].read_text(errors="replace").splitlines() if line.strip()]
    assert len(lines) >= 2, lines
    row = dict(zip(lines[0].split(";"), lines[-1].split(";"), strict=False))

    def first(suffix: str) -> int:
        columns = sorted((int(name.split("_", 1)[0]), name) for name in row if name.endswith(suffix))
        assert columns, f"no {suffix} column in {files[-1]}"
        return int(row[columns[0][1]])

    def total(suffix: str) -> int:
        return sum(int(value) for name, value in row.items() if name.endswith(suffix) and value.isdigit())

    # 503 may come at the first INVITE (shed before the challenge) or at the authenticated one.
    return {"completed": first("_200_Recv"), "refused": total("_503_Recv")}
