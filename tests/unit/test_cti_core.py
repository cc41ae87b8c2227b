"""The CTI core: offers, strategies in motion, wrap-up timers, devices, abandonment and reconciliation."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softswitch.config import AgentConfig, CtiConfig, QueueConfig, load_config
from softswitch.cti.agents import AGENT_TRANSITIONS, AgentState, Device
from softswitch.cti.core import (
    CancelOffer,
    ConnectCaller,
    CtiCore,
    OfferCall,
    Outcome,
    RouteCaller,
    TimerKey,
    max_wait_timer,
    offer_timer,
    wrap_up_timer,
)
from softswitch.cti.errors import (
    AGENT_NOT_LOGGED_IN,
    ALREADY_LOGGED_IN,
    DEVICE_UNAVAILABLE,
    INVALID_ARGUMENT,
    INVALID_STATE,
    UNKNOWN_AGENT,
    UNKNOWN_QUEUE,
    CommandError,
)
from softswitch.cti.queues import QueuedCall
from softswitch.events.types import (
    AgentLoggedIn,
    AgentLoggedOut,
    AgentOffered,
    AgentOfferMissed,
    AgentStateChanged,
    AgentStats,
    CallDequeued,
    CallQueued,
    QueueStats,
)

T0 = 1_000.0
USERS = ["1001", "1002", "1003", "1004", "1005"]


def agent_config(agent_id: str, extension: str | None, **extra: Any) -> AgentConfig:
    return AgentConfig(id=agent_id, password=f"pw{agent_id}", extension=extension, **extra)


def make_core(
    *,
    strategy: str = "longest_idle",
    queue: dict[str, Any] | None = None,
    cti: CtiConfig | None = None,
    agents: list[AgentConfig] | None = None,
    pstn: bool = False,
) -> CtiCore:
    agents = agents or [
        agent_config("8001", "1001", queues=["support"], wrap_up_s=10),
        agent_config("8002", "1002", queues=["support"], wrap_up_s=10),
        agent_config("8003", "1003", queues=["support"], wrap_up_s=0),
        agent_config("9001", "1005", role="supervisor", team=["8001", "8002"]),
    ]
    queues = [QueueConfig(id="support", strategy=strategy, **(queue or {})), QueueConfig(id="sales")]
    return CtiCore(agents, queues, cti=cti, users=USERS, pstn_available=pstn, rng=random.Random(7))


def call(conversation_id: str = "CV1", **extra: Any) -> QueuedCall:
    return QueuedCall(conversation_id, "CA" + conversation_id, from_="+8613800000000", to="8000", **extra)


def login_ready(core: CtiCore, *agent_ids: str, now: float = T0) -> None:
    for agent_id in agent_ids:
        agent = core.agent(agent_id)
        assert agent.device is None
        ext = core.agent_configs[agent_id].extension
        assert ext is not None
        core.device_registered(ext, now)
        core.login(agent_id, now)


def states(core: CtiCore) -> dict[str, str]:
    return {a.id: a.state.value for a in core.agents()}


def offers(out: Outcome) -> list[tuple[str, str]]:
    return [(a.agent_id, a.conversation_id) for a in out.actions if isinstance(a, OfferCall)]


def state_events(out: Outcome) -> list[tuple[str, str, str | None]]:
    return [(e.agent_id, e.state, e.reason) for e in out.events_of(AgentStateChanged)]


@pytest.fixture
def core() -> CtiCore:
    return make_core()


# -- login, logout, set_state --------------------------------------------------------------------


def test_login_on_registered_device_goes_ready(core: CtiCore) -> None:
    core.device_registered("1001", T0)
    out = core.login("8001", T0)
    assert out.events_of(AgentLoggedIn) == [AgentLoggedIn("8001", {"kind": "sip", "address": "1001"}, None)]
    changed = out.events_of(AgentStateChanged)[0]
    assert (changed.state, changed.previous_state, changed.queues) == ("ready", "logged_out", ("support",))
    assert changed.since == "1970-01-01T00:16:40.000Z"
    assert out.events_of(AgentStats) == [AgentStats("8001", 0, 0, 0.0)]
    assert out.events_of(QueueStats)[0].agents_ready == 1


def test_login_without_registration_is_offline_until_the_device_registers(core: CtiCore) -> None:
    out = core.login("8001", T0, state="not_ready", reason="break")
    assert state_events(out) == [("8001", "offline", "device_unregistered")]
    out = core.device_registered("1001", T0 + 5)
    assert state_events(out) == [("8001", "not_ready", "break")]


def test_login_with_initial_state_and_pstn_device() -> None:
    core = make_core(
        agents=[agent_config("8001", None, queues=["support"], initial_state="not_ready")], pstn=True
    )
    out = core.login("8001", T0, device=Device("pstn", "+8613800000000"))
    assert state_events(out) == [("8001", "not_ready", "busy")]  # PSTN devices need no registration
    assert core.agent("8001").device == Device("pstn", "+8613800000000")


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"device": Device("sip", "7777")}, DEVICE_UNAVAILABLE),
        ({"device": Device("pstn", "+8613800000000")}, DEVICE_UNAVAILABLE),  # no trunk
        ({"device": Device("fax", "1")}, INVALID_ARGUMENT),
        ({"state": "not_ready", "reason": "napping"}, INVALID_ARGUMENT),
        ({"state": "ready", "reason": "break"}, INVALID_ARGUMENT),
        ({"state": "busy"}, INVALID_ARGUMENT),
    ],
)
def test_login_refusals(core: CtiCore, kwargs: dict[str, Any], code: str) -> None:
    with pytest.raises(CommandError) as error:
        core.login("8001", T0, **kwargs)
    assert error.value.code == code
    assert core.agent("8001").state is AgentState.LOGGED_OUT


def test_login_refusals_that_depend_on_others(core: CtiCore) -> None:
    with pytest.raises(CommandError) as error:
        core.login("nobody", T0)
    assert error.value.code == UNKNOWN_AGENT
    login_ready(core, "8001")
    with pytest.raises(CommandError) as error:
        core.login("8001", T0)
    assert error.value.code == ALREADY_LOGGED_IN
    with pytest.raises(CommandError) as error:
        core.login("8002", T0, device=Device("sip", "1001"))
    assert error.value.code == DEVICE_UNAVAILABLE and "in use by agent 8001" in error.value.message
    no_extension = make_core(agents=[agent_config("8001", None)])
    with pytest.raises(CommandError) as error:
        no_extension.login("8001", T0)
    assert error.value.code == INVALID_ARGUMENT


def test_set_state_and_logout(core: CtiCore) -> None:
    login_ready(core, "8001")
    assert state_events(core.set_state("8001", "not_ready", T0 + 1)) == [("8001", "not_ready", "busy")]
    assert state_events(core.set_state("8001", "not_ready", T0 + 2, reason="lunch")) == [
        ("8001", "not_ready", "lunch")
    ]
    assert state_events(core.set_state("8001", "not_ready", T0 + 3, reason="lunch")) == []
    assert state_events(core.set_state("8001", "ready", T0 + 4)) == [("8001", "ready", None)]
    out = core.logout("8001", T0 + 5)
    assert state_events(out) == [("8001", "logged_out", None)]
    assert out.events_of(AgentLoggedOut) == [AgentLoggedOut("8001", {"kind": "sip", "address": "1001"}, None)]
    for method in (lambda: core.logout("8001", T0), lambda: core.set_state("8001", "ready", T0)):
        with pytest.raises(CommandError) as error:
            method()
        assert error.value.code == AGENT_NOT_LOGGED_IN


# -- offers ----------------------------------------------------------------------------------------


def test_queue_call_offer_answer_wrap_up_ready(core: CtiCore) -> None:
    login_ready(core, "8001")
    out = core.call_queued("support", call(), T0 + 10)
    assert out.events_of(CallQueued)[0].position == 1
    assert offers(out) == [("8001", "CV1")]
    assert out.events_of(AgentOffered) == [AgentOffered("8001", "CV1", "support")]
    assert ArmTimerAt(out, offer_timer("8001")) == T0 + 30
    assert ArmTimerAt(out, max_wait_timer("CV1")) == T0 + 310
    assert states(core)["8001"] == "reserved"

    assert state_events(core.offer_ringing("8001", "CV1", T0 + 11)) == [("8001", "ringing", None)]
    out = core.offer_answered("8001", "CV1", T0 + 14)
    assert state_events(out) == [("8001", "busy", "queue")]
    assert out.actions == [ConnectCaller("8001", "CV1", "support")]
    dequeued = out.events_of(CallDequeued)[0]
    assert (dequeued.reason, dequeued.wait_s, dequeued.position) == ("answered", 4.0, 1)
    assert offer_timer("8001") in out.cancelled_timers and max_wait_timer("CV1") in out.cancelled_timers

    out = core.agent_call_ended("8001", "CV1", T0 + 74)
    changed = out.events_of(AgentStateChanged)[0]
    assert (changed.state, changed.wrap_up_deadline) == ("wrap_up", "1970-01-01T00:18:04.000Z")
    assert out.events_of(AgentStats) == [AgentStats("8001", 1, 1, 60.0)]
    assert ArmTimerAt(out, wrap_up_timer("8001")) == T0 + 84
    # A timer that fires early (clock skew) changes nothing; the real one ends wrap-up.
    assert state_events(core.timer_fired(wrap_up_timer("8001"), T0 + 80)) == []
    assert state_events(core.timer_fired(wrap_up_timer("8001"), T0 + 84)) == [("8001", "ready", None)]
    stats = core.queue_stats("support", T0 + 84)
    assert (stats.answered, stats.abandoned, stats.service_level) == (1, 0, 100.0)


def ArmTimerAt(out: Outcome, key: TimerKey) -> float | None:
    for timer in out.timers:
        if timer.key == key:
            return timer.at
    return None


def test_agent_ends_wrap_up_early_and_talk_time_from_call_layer(core: CtiCore) -> None:
    login_ready(core, "8001")
    core.call_queued("support", call(), T0)
    core.offer_answered("8001", "CV1", T0 + 2)
    out = core.agent_call_ended("8001", "CV1", T0 + 40, talk_s=35.5)
    assert out.events_of(AgentStats)[0].talk_s == 35.5
    out = core.set_state("8001", "ready", T0 + 41)
    assert state_events(out) == [("8001", "ready", None)]
    assert wrap_up_timer("8001") in out.cancelled_timers


def test_queue_wrap_up_overrides_agent_and_zero_skips_it() -> None:
    core = make_core(queue={"wrap_up_s": 3})
    login_ready(core, "8001")
    core.call_queued("support", call(), T0)
    core.offer_answered("8001", "CV1", T0 + 1)
    out = core.agent_call_ended("8001", "CV1", T0 + 5)
    assert ArmTimerAt(out, wrap_up_timer("8001")) == T0 + 8
    core.timer_fired(wrap_up_timer("8001"), T0 + 8)
    login_ready(core, "8003")  # wrap_up_s = 0 for 8003, but the queue's 3 s apply
    zero = make_core()
    login_ready(zero, "8003")
    zero.call_queued("support", call(), T0)
    zero.offer_answered("8003", "CV1", T0 + 1)
    assert state_events(zero.agent_call_ended("8003", "CV1", T0 + 5)) == [("8003", "ready", None)]


def test_offer_timeout_makes_agent_not_ready_and_rings_next(core: CtiCore) -> None:
    login_ready(core, "8001", now=T0)
    login_ready(core, "8002", now=T0 + 1)
    out = core.call_queued("support", call(), T0 + 10)
    assert offers(out) == [("8001", "CV1")]  # longest idle: logged in first
    out = core.timer_fired(offer_timer("8001"), T0 + 30)
    assert out.events_of(AgentOfferMissed) == [AgentOfferMissed("8001", "CV1", "support", True)]
    assert CancelOffer("8001", "CV1", Device("sip", "1001")) in out.actions
    assert ("8001", "not_ready", "no_answer") in state_events(out)
    assert offers(out) == [("8002", "CV1")]


def test_offer_rejected_without_auto_not_ready_tries_others_first() -> None:
    core = make_core(cti=CtiConfig(no_answer_not_ready=False))
    login_ready(core, "8001", now=T0)
    login_ready(core, "8002", now=T0 + 1)
    core.call_queued("support", call(), T0 + 10)
    out = core.offer_failed("8001", "CV1", T0 + 12)
    assert out.events_of(AgentOfferMissed)[0].auto_not_ready is False
    assert offers(out) == [("8002", "CV1")]
    assert states(core)["8001"] == "ready"
    # 8002 misses too: everyone missed once, a new round starts with the longest idle.
    out = core.offer_failed("8002", "CV1", T0 + 14)
    assert offers(out) == [("8001", "CV1")]


def test_stale_inputs_change_nothing(core: CtiCore) -> None:
    login_ready(core, "8001")
    assert core.timer_fired(offer_timer("8001"), T0).events == []
    assert core.offer_ringing("8001", "CVX", T0).events == []
    assert core.offer_failed("8001", "CVX", T0).events == []
    assert core.agent_call_ended("8001", "CVX", T0).events == []
    assert core.caller_abandoned("CVX", T0).events == []
    late = core.offer_answered("8001", "CVX", T0)
    assert late.actions == [CancelOffer("8001", "CVX", Device("sip", "1001"))]  # drop the late leg
    with pytest.raises(ValueError, match="unknown timer kind"):
        core.timer_fired(TimerKey("bogus", "x"), T0)  # type: ignore[arg-type]
    with pytest.raises(CommandError) as error:
        core.call_queued("nope", call(), T0)
    assert error.value.code == UNKNOWN_QUEUE


def test_caller_abandons_while_ringing(core: CtiCore) -> None:
    login_ready(core, "8001")
    core.call_queued("support", call(), T0)
    core.offer_ringing("8001", "CV1", T0 + 1)
    out = core.caller_abandoned("CV1", T0 + 30)
    assert CancelOffer("8001", "CV1", Device("sip", "1001")) in out.actions
    assert state_events(out) == [("8001", "ready", None)]
    assert out.events_of(AgentOfferMissed) == []
    assert out.events_of(CallDequeued)[0].reason == "abandoned"
    stats = core.queue_stats("support", T0 + 30)
    assert (stats.abandoned, stats.service_level) == (1, 0.0)  # gave up after the 20 s threshold


def test_caller_left_by_key_is_not_abandoned(core: CtiCore) -> None:
    core.call_queued("support", call(), T0)
    out = core.caller_left("CV1", T0 + 5)
    assert out.events_of(CallDequeued)[0].reason == "left"
    assert core.queue_stats("support", T0).abandoned == 0


def test_max_wait_routes_to_overflow() -> None:
    core = make_core(queue={"max_wait_s": 60, "overflow": "9000"})
    core.call_queued("support", call(), T0)
    assert core.timer_fired(max_wait_timer("CV1"), T0 + 59).actions == []
    out = core.timer_fired(max_wait_timer("CV1"), T0 + 60)
    assert out.actions == [RouteCaller("CV1", "support", "9000", "timeout")]
    assert out.events_of(CallDequeued)[0].reason == "timeout"


def test_max_length_and_no_agents_destinations() -> None:
    core = make_core(queue={"max_length": 1, "overflow": "9000", "no_agents": "9100"})
    out = core.call_queued("support", call("CV1"), T0)
    assert out.actions == [RouteCaller("CV1", "support", "9100", "no_agents")]
    assert out.events_of(CallQueued) == []
    login_ready(core, "8001")
    core.set_state("8001", "not_ready", T0)
    core.call_queued("support", call("CV1"), T0)
    out = core.call_queued("support", call("CV2"), T0)
    assert out.actions == [RouteCaller("CV2", "support", "9000", "full")]
    # The last agent logs out: the waiting caller is sent to the no-agents destination.
    out = core.logout("8001", T0 + 1)
    assert RouteCaller("CV1", "support", "9100", "no_agents") in out.actions
    assert out.events_of(CallDequeued)[0].reason == "no_agents"


def test_without_no_agents_destination_the_caller_waits(core: CtiCore) -> None:
    out = core.call_queued("support", call(), T0)
    assert out.actions == [] and out.events_of(CallQueued)
    out = login_ready_out(core, "8001", T0 + 5)
    assert offers(out) == [("8001", "CV1")]
    with pytest.raises(ValueError, match="already waits"):
        core.call_queued("sales", call(), T0)


def login_ready_out(core: CtiCore, agent_id: str, now: float) -> Outcome:
    ext = core.agent_configs[agent_id].extension
    assert ext is not None
    core.device_registered(ext, now)
    return core.login(agent_id, now)


def test_priority_callers_first_and_higher_priority_queue_first() -> None:
    agents = [agent_config("8001", "1001", queues=["support", "sales"])]
    queues = [QueueConfig(id="support"), QueueConfig(id="sales", priority=5)]
    core = CtiCore(agents, queues, users=USERS)
    core.call_queued("support", call("CV1"), T0)
    core.call_queued("support", call("CV2", priority=3), T0 + 1)
    assert core.queue("support").position("CV2") == 1
    core.call_queued("sales", call("CV3"), T0 + 2)
    out = login_ready_out(core, "8001", T0 + 3)
    assert offers(out) == [("8001", "CV3")]


def test_ring_all_first_answer_wins() -> None:
    core = make_core(strategy="ring_all")
    login_ready(core, "8001", "8002", "8003")
    out = core.call_queued("support", call(), T0 + 1)
    assert sorted(offers(out)) == [("8001", "CV1"), ("8002", "CV1"), ("8003", "CV1")]
    out = core.offer_answered("8002", "CV1", T0 + 3)
    assert sorted((a.agent_id, type(a).__name__) for a in out.actions) == [
        ("8001", "CancelOffer"),
        ("8002", "ConnectCaller"),
        ("8003", "CancelOffer"),
    ]
    assert states(core) | {"9001": "x"} == {"8001": "ready", "8002": "busy", "8003": "ready", "9001": "x"}
    # The second answer arrives too late: its leg is dropped.
    assert core.offer_answered("8001", "CV1", T0 + 3.1).actions == [
        CancelOffer("8001", "CV1", Device("sip", "1001"))
    ]


# -- devices ---------------------------------------------------------------------------------------


def test_offline_agents_are_never_offered_and_return_to_their_state(core: CtiCore) -> None:
    login_ready(core, "8001")
    core.set_state("8001", "not_ready", T0, reason="meeting")
    out = core.device_unregistered("1001", T0 + 1)
    assert state_events(out) == [("8001", "offline", "device_unregistered")]
    core.set_state("8001", "ready", T0 + 2)  # remembered for the return
    assert offers(core.call_queued("support", call(), T0 + 3)) == []
    out = core.device_registered("1001", T0 + 4)
    assert ("8001", "ready", None) in state_events(out)
    assert offers(out) == [("8001", "CV1")]


def test_device_lost_while_ringing_or_busy(core: CtiCore) -> None:
    login_ready(core, "8001", "8002")
    core.call_queued("support", call(), T0)
    first = "8001" if core.agent("8001").conversation_id else "8002"
    other = "8002" if first == "8001" else "8001"
    ext = core.agent_configs[first].extension
    assert ext is not None
    out = core.device_unregistered(ext, T0 + 1)
    assert (first, "offline", "device_unregistered") in state_events(out)
    assert offers(out) == [(other, "CV1")]
    core.offer_answered(other, "CV1", T0 + 2)
    other_ext = core.agent_configs[other].extension
    assert other_ext is not None
    assert state_events(core.device_unregistered(other_ext, T0 + 3)) == []  # the call goes on
    out = core.agent_call_ended(other, "CV1", T0 + 9)
    assert state_events(out) == [(other, "offline", "device_unregistered")]
    assert state_events(core.device_registered(other_ext, T0 + 10)) == [(other, "ready", None)]


def test_wrap_up_cut_short_by_device_loss_returns_to_resume_state(core: CtiCore) -> None:
    login_ready(core, "8001")
    core.call_queued("support", call(), T0)
    core.offer_answered("8001", "CV1", T0 + 1)
    core.agent_call_ended("8001", "CV1", T0 + 5)
    out = core.device_unregistered("1001", T0 + 6)
    assert wrap_up_timer("8001") in out.cancelled_timers
    assert state_events(core.device_registered("1001", T0 + 60)) == [("8001", "ready", None)]


# -- outbound calls and requests during calls -------------------------------------------------------


def test_outbound_from_not_ready_returns_to_not_ready(core: CtiCore) -> None:
    login_ready(core, "8001")
    core.set_state("8001", "not_ready", T0, reason="break")
    assert state_events(core.agent_call_started("8001", "CVO", T0 + 1)) == [("8001", "busy", "outbound")]
    core.agent_call_ended("8001", "CVO", T0 + 31, talk_s=20.0)
    out = core.timer_fired(wrap_up_timer("8001"), T0 + 41)
    assert state_events(out) == [("8001", "not_ready", "break")]
    assert (core.agent("8001").call_count, core.agent("8001").answered_count) == (1, 1)


def test_outbound_start_withdraws_an_offer_and_set_state_while_busy_is_remembered(core: CtiCore) -> None:
    login_ready(core, "8001")
    core.call_queued("support", call(), T0)
    out = core.agent_call_started("8001", "CVO", T0 + 1)
    assert CancelOffer("8001", "CV1", Device("sip", "1001")) in out.actions
    assert core.queue("support").caller("CV1") is not None  # still waiting for someone else
    assert state_events(core.set_state("8001", "not_ready", T0 + 2, reason="lunch")) == []
    assert core.state_data("8001", T0 + 2)["next"] == {"state": "not_ready", "reason": "lunch"}
    core.agent_call_ended("8001", "CVO", T0 + 3, talk_s=0.0)
    assert core.agent("8001").answered_count == 0  # never answered
    out = core.timer_fired(wrap_up_timer("8001"), T0 + 13)
    assert state_events(out) == [("8001", "not_ready", "lunch")]


def test_set_state_during_an_offer(core: CtiCore) -> None:
    login_ready(core, "8001")
    core.call_queued("support", call(), T0)
    with pytest.raises(CommandError) as error:
        core.set_state("8001", "ready", T0 + 1)
    assert error.value.code == INVALID_STATE
    out = core.set_state("8001", "not_ready", T0 + 1, reason="break")
    assert CancelOffer("8001", "CV1", Device("sip", "1001")) in out.actions
    assert out.events_of(AgentOfferMissed) == []


def test_logout_refused_on_a_call_unless_forced(core: CtiCore) -> None:
    login_ready(core, "8001")
    core.agent_call_started("8001", "CVO", T0)
    with pytest.raises(CommandError) as error:
        core.logout("8001", T0 + 1)
    assert error.value.code == INVALID_STATE
    out = core.logout("8001", T0 + 1, forced_by="9001")
    assert out.events_of(AgentLoggedOut)[0].forced_by == "9001"
    assert core.agent_call_ended("8001", "CVO", T0 + 2).events == []


def test_logout_during_offer_reoffers_the_caller(core: CtiCore) -> None:
    login_ready(core, "8001", "8002")
    out = core.call_queued("support", call(), T0 + 1)
    first = offers(out)[0][0]
    out = core.logout(first, T0 + 2)
    assert next(a for a in out.actions if isinstance(a, CancelOffer)).agent_id == first
    assert len(offers(out)) == 1 and offers(out)[0][0] != first


# -- persistence and reconciliation -----------------------------------------------------------------


def test_snapshot_restore_round_trip_and_reconciliation() -> None:
    core = make_core()
    login_ready(core, "8001", "8002", "8003")
    core.call_queued("support", call("CV1"), T0)  # offered to one agent
    ringing = next(a.id for a in core.agents() if a.state is AgentState.RESERVED)
    core.call_queued("support", call("CV2"), T0)
    busy = next(a.id for a in core.agents() if a.state is AgentState.RESERVED and a.id != ringing)
    core.offer_answered(busy, "CV2", T0 + 1)
    core.call_queued("support", call("CV3"), T0 + 2)  # offered to the third
    third = next(a.id for a in core.agents() if a.state is AgentState.RESERVED and a.id != ringing)
    core.offer_answered(third, "CV3", T0 + 3)
    snapshot = core.snapshot()

    restarted = make_core()
    registered = ["1001", "1002"]  # 1003 went away during the restart
    live = ["CV1", "CV2"]  # CV3 ended unseen
    out = restarted.restore(snapshot, registered, live, T0 + 100)
    got = states(restarted)
    # A busy agent with a live call stays busy, registered or not (it goes offline when the call ends).
    assert got[busy] == "busy"
    assert restarted.agent(busy).conversation_id == "CV2"
    assert (
        CancelOffer(ringing, "CV1", Device("sip", core.agent_configs[ringing].extension or "")) in out.actions
    )
    expected_third = "offline" if core.agent_configs[third].extension == "1003" else "wrap_up"
    assert got[third] == expected_third
    # CV1 waits again and is offered to a ready agent (the formerly ringing one, if registered).
    assert restarted.queue("support").caller("CV1") is not None
    assert all(a.state is not AgentState.RINGING for a in restarted.agents())
    assert {e.queue_id for e in out.events_of(QueueStats)} == {"support", "sales"}


def test_restore_reconciles_every_case() -> None:
    core = make_core()
    login_ready(core, "8001", "8002", "8003")
    for agent_id in ("8001", "8002", "8003"):
        core.set_state(agent_id, "not_ready", T0)
    core.agent_call_started("8001", "CVA", T0)  # busy, call lost
    core.agent_call_started("8002", "CVB", T0)  # busy, call alive
    snapshot = core.snapshot()
    restarted = make_core()
    out = restarted.restore(snapshot, ["1001", "1002"], ["CVB"], T0 + 5)
    assert states(restarted) == {"8001": "wrap_up", "8002": "busy", "8003": "offline", "9001": "logged_out"}
    assert ArmTimerAt(out, wrap_up_timer("8001")) == T0 + 15
    # The wrap-up deadline passed during a long outage: straight to the state after it.
    later = make_core()
    later.restore(snapshot, ["1001", "1002", "1003"], ["CVB"], T0 + 500)
    assert later.agent("8001").state is AgentState.WRAP_UP
    later.timer_fired(wrap_up_timer("8001"), T0 + 510)
    assert (later.agent("8001").state, later.agent("8001").reason) == (AgentState.NOT_READY, "busy")
    assert later.agent("8003").state is AgentState.NOT_READY
    with pytest.raises(ValueError, match="version"):
        make_core().restore({"version": 99}, [], [], T0)


def test_restore_drops_dead_callers_and_times_out_overdue_ones() -> None:
    core = make_core(queue={"max_wait_s": 60})
    core.call_queued("support", call("CV1"), T0)
    core.call_queued("support", call("CV2"), T0 + 50)
    core.call_queued("support", call("CV3"), T0 + 50)
    restarted = make_core(queue={"max_wait_s": 60})
    out = restarted.restore(core.snapshot(), [], ["CV1", "CV2"], T0 + 70)
    assert out.actions == [RouteCaller("CV1", "support", None, "timeout")]
    assert ArmTimerAt(out, max_wait_timer("CV2")) == T0 + 110
    assert restarted.queue("support").caller("CV3") is None
    assert restarted.restore(None, [], [], T0).events_of(AgentStateChanged) == []


def test_from_config() -> None:
    config = load_config(None, env={})
    core = CtiCore.from_config(config)
    assert [a.id for a in core.agents()] == ["8001", "8002"]
    assert [q.id for q in core.queues()] == ["support"]
    assert core.pstn_available is False


# -- properties ------------------------------------------------------------------------------------

AGENT_IDS = ["8001", "8002", "8003"]
CONVS = ["CV1", "CV2", "CV3", "CV4"]

inputs = st.one_of(
    st.tuples(st.just("login"), st.sampled_from(AGENT_IDS), st.sampled_from(["ready", "not_ready"])),
    st.tuples(st.just("logout"), st.sampled_from(AGENT_IDS), st.booleans()),
    st.tuples(st.just("set_state"), st.sampled_from(AGENT_IDS), st.sampled_from(["ready", "not_ready"])),
    st.tuples(st.just("registered"), st.sampled_from(["1001", "1002", "1003"]), st.none()),
    st.tuples(st.just("unregistered"), st.sampled_from(["1001", "1002", "1003"]), st.none()),
    st.tuples(st.just("queued"), st.sampled_from(CONVS), st.none()),
    st.tuples(st.just("abandoned"), st.sampled_from(CONVS), st.none()),
    st.tuples(st.just("ringing"), st.sampled_from(AGENT_IDS), st.none()),
    st.tuples(st.just("answered"), st.sampled_from(AGENT_IDS), st.none()),
    st.tuples(st.just("failed"), st.sampled_from(AGENT_IDS), st.none()),
    st.tuples(st.just("outbound"), st.sampled_from(AGENT_IDS), st.sampled_from(CONVS)),
    st.tuples(st.just("ended"), st.sampled_from(AGENT_IDS), st.none()),
    st.tuples(
        st.just("timer"),
        st.sampled_from(["offer", "wrap_up", "max_wait"]),
        st.sampled_from(AGENT_IDS + CONVS),
    ),
    st.tuples(st.just("restart"), st.none(), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(inputs, st.floats(min_value=0, max_value=40)), max_size=60),
    st.sampled_from(["longest_idle", "round_robin", "fewest_calls", "ring_all", "random"]),
)
def test_random_inputs_keep_every_invariant(
    steps: list[tuple[tuple[Any, Any, Any], float]], strategy: str
) -> None:
    core = make_core(strategy=strategy)
    now = T0
    registered: set[str] = set()
    for (kind, a, b), delay in steps:
        now += delay
        before = {ag.id: ag.state for ag in core.agents()}
        try:
            out = _apply(core, kind, a, b, now, registered)
        except CommandError:
            assert {ag.id: ag.state for ag in core.agents()} == before, "a refused command changed state"
            continue
        for event in out.events_of(AgentStateChanged):
            previous, state = AgentState(event.previous_state), AgentState(event.state)
            assert state in AGENT_TRANSITIONS[previous]
        for action in out.actions:
            if isinstance(action, OfferCall):
                agent = core.agent(action.agent_id)
                moves = [
                    (e.previous_state, e.state)
                    for e in out.events_of(AgentStateChanged)
                    if e.agent_id == agent.id
                ]
                assert ("ready", "reserved") in moves, "offered to an agent that was not ready"
                assert agent.device is not None
                assert not agent.device.needs_registration or agent.device.address in registered
        for agent in core.agents():
            if (
                agent.state is AgentState.READY
                and agent.device is not None
                and agent.device.needs_registration
            ):
                assert agent.device.address in registered, "ready without a registered device"
            if agent.state in (AgentState.RESERVED, AgentState.RINGING):
                queue = core.queue_of(agent.conversation_id or "")
                assert queue is not None and agent.id in (
                    queue.caller(agent.conversation_id or "").offered_to
                )  # type: ignore[union-attr]
        waiting = [c.conversation_id for q in core.queues() for c in q.callers()]
        assert len(waiting) == len(set(waiting))


def _apply(core: CtiCore, kind: str, a: Any, b: Any, now: float, registered: set[str]) -> Outcome:
    if kind == "login":
        return core.login(a, now, state=b)
    if kind == "logout":
        return core.logout(a, now, forced_by="9001" if b else None)
    if kind == "set_state":
        return core.set_state(a, b, now)
    if kind == "registered":
        registered.add(a)
        return core.device_registered(a, now)
    if kind == "unregistered":
        registered.discard(a)
        return core.device_unregistered(a, now)
    if kind == "queued":
        if core.queue_of(a) is not None or any(ag.conversation_id == a for ag in core.agents()):
            return Outcome()
        return core.call_queued("support", call(a), now)
    if kind == "abandoned":
        return core.caller_abandoned(a, now)
    agent = core.agent(a) if kind in ("ringing", "answered", "failed", "ended", "outbound") else None
    if kind == "ringing":
        assert agent is not None
        return core.offer_ringing(a, agent.conversation_id or "CVX", now)
    if kind == "answered":
        assert agent is not None
        return core.offer_answered(a, agent.conversation_id or "CVX", now)
    if kind == "failed":
        assert agent is not None
        return core.offer_failed(a, agent.conversation_id or "CVX", now)
    if kind == "outbound":
        if core.queue_of(b) is not None or any(ag.conversation_id == b for ag in core.agents()):
            return Outcome()
        return core.agent_call_started(a, b, now)
    if kind == "ended":
        assert agent is not None
        return core.agent_call_ended(a, agent.conversation_id or "CVX", now)
    if kind == "timer":
        return core.timer_fired(TimerKey(a, b), now)
    # restart: persist, rebuild, reconcile against what is registered and alive
    live = {c.conversation_id for q in core.queues() for c in q.callers()}
    live |= {ag.conversation_id for ag in core.agents() if ag.conversation_id}
    snapshot = core.snapshot()
    fresh = make_core(strategy=core.queue("support").strategy)
    out = fresh.restore(snapshot, sorted(registered), sorted(live), now)
    core.__dict__.update(fresh.__dict__)
    return out
