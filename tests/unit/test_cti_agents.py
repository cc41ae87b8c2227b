"""The agent state machine: every transition the table allows, every one it refuses, persistence."""

from __future__ import annotations

import itertools

import pytest

from softswitch.cti.agents import (
    AGENT_TRANSITIONS,
    Agent,
    AgentState,
    Device,
    IllegalTransition,
)

S = AgentState

#: The transitions issue 6 and EVENTS.md call for, written out independently of the table.
EXPECTED = {
    (S.LOGGED_OUT, S.READY),  # login
    (S.LOGGED_OUT, S.NOT_READY),  # login not ready
    (S.LOGGED_OUT, S.OFFLINE),  # login while the device is not registered
    (S.READY, S.NOT_READY),
    (S.READY, S.RESERVED),  # chosen for a queue caller
    (S.READY, S.BUSY),  # outbound call
    (S.NOT_READY, S.READY),
    (S.NOT_READY, S.NOT_READY),  # another reason
    (S.NOT_READY, S.BUSY),  # outbound calls are allowed while not ready
    (S.RESERVED, S.RINGING),
    (S.RESERVED, S.BUSY),  # auto-answer, or an outbound call raced the offer
    (S.RESERVED, S.READY),  # the caller went away
    (S.RESERVED, S.NOT_READY),  # missed, or the agent declined
    (S.RINGING, S.BUSY),  # answered
    (S.RINGING, S.READY),
    (S.RINGING, S.NOT_READY),  # no_answer
    (S.BUSY, S.WRAP_UP),
    (S.BUSY, S.READY),  # no wrap-up time
    (S.BUSY, S.NOT_READY),  # no wrap-up, not_ready requested during the call
    (S.WRAP_UP, S.READY),  # deadline or ended early
    (S.WRAP_UP, S.NOT_READY),
    (S.WRAP_UP, S.BUSY),  # outbound during wrap-up
    (S.OFFLINE, S.READY),  # device back
    (S.OFFLINE, S.NOT_READY),
}
# The device can go away from every logged-in state but logged out and offline; supervisors can force a
# logout from every logged-in state.
EXPECTED |= {(s, S.OFFLINE) for s in S if s not in (S.LOGGED_OUT, S.OFFLINE)}
EXPECTED |= {(s, S.LOGGED_OUT) for s in S if s is not S.LOGGED_OUT}

ALL_PAIRS = list(itertools.product(S, S))


def test_table_is_exactly_the_expected_transitions() -> None:
    table = {(a, b) for a, targets in AGENT_TRANSITIONS.items() for b in targets}
    assert table == EXPECTED
    assert set(AGENT_TRANSITIONS) == set(S)


@pytest.mark.parametrize(("start", "end"), sorted(EXPECTED, key=lambda p: (p[0].value, p[1].value)))
def test_allowed_transition(start: AgentState, end: AgentState) -> None:
    agent = Agent("8001", state=start, since=1.0)
    assert agent.move(end, 5.0, "why") is start
    assert (agent.state, agent.reason, agent.since) == (end, "why", 5.0)


@pytest.mark.parametrize(
    ("start", "end"),
    [p for p in ALL_PAIRS if p not in EXPECTED],
    ids=lambda s: s.value,
)
def test_refused_transition(start: AgentState, end: AgentState) -> None:
    agent = Agent("8001", state=start, since=1.0, reason="kept")
    with pytest.raises(IllegalTransition, match=f"agent 8001: {start.value} -> {end.value}"):
        agent.move(end, 5.0)
    assert (agent.state, agent.reason, agent.since) == (start, "kept", 1.0)


def test_queue_calls_only_when_ready_and_no_offer_to_offline() -> None:
    for state in S:
        can_reserve = S.RESERVED in AGENT_TRANSITIONS[state]
        assert can_reserve == (state is S.READY)


def test_wrap_up_deadline_is_cleared_when_leaving_wrap_up() -> None:
    agent = Agent("8001", state=S.WRAP_UP, wrap_up_deadline=20.0)
    agent.move(S.READY, 21.0)
    assert agent.wrap_up_deadline is None


def test_device() -> None:
    assert Device("sip", "1001").needs_registration
    assert Device("webrtc", "1001").needs_registration
    assert not Device("pstn", "+8613800000000").needs_registration
    assert Device("pstn", "+86").as_dict() == {"kind": "pstn", "address": "+86"}


def test_idle_since_skills_and_flags() -> None:
    agent = Agent("8001", skills={"english": 5, "billing": 2}, role="supervisor", state=S.READY, since=3.0)
    assert agent.idle_since() == 3.0
    agent.logged_in_at = 1.0
    assert agent.idle_since() == 1.0
    agent.last_call_ended_at = 9.0
    assert agent.idle_since() == 9.0
    assert agent.has_skills({"english": 5}) and not agent.has_skills({"english": 6})
    assert not agent.has_skills({"french": 1})
    assert agent.skill_score({"english": 1, "billing": 1, "french": 1}) == 7
    assert agent.is_supervisor and agent.logged_in and agent.available
    assert not Agent("x", state=S.OFFLINE).available and Agent("x", state=S.OFFLINE).logged_in


def test_dump_and_load_round_trip() -> None:
    agent = Agent("8001", queues=("support",))
    agent.device = Device("sip", "1001")
    agent.state, agent.reason, agent.since = S.WRAP_UP, None, 10.0
    agent.wrap_up_deadline, agent.resume_state, agent.resume_reason = 20.0, S.NOT_READY, "break"
    agent.return_state, agent.return_reason = S.NOT_READY, "lunch"
    agent.logged_in_at, agent.last_call_ended_at = 1.0, 9.0
    agent.call_count, agent.answered_count, agent.talk_s = 4, 3, 99.5
    agent.conversation_id, agent.queue_id, agent.answered_at = "CV1", "support", 5.0
    copy = Agent("8001", queues=("support",))
    copy.load(agent.dump())
    assert copy.dump() == agent.dump()
    empty = Agent("8002")
    empty.load(Agent("8002").dump())
    assert empty.device is None and empty.state is S.LOGGED_OUT
