"""ACD queues: service order, every strategy's choice, skills, statistics and persistence."""

from __future__ import annotations

import random
from typing import Any

import pytest

from softswitch.config import QueueConfig
from softswitch.cti.agents import Agent, AgentState
from softswitch.cti.queues import STRATEGIES, Queue, QueuedCall


def make_queue(**config: Any) -> Queue:
    return Queue(QueueConfig(id="support", **config), random.Random(1))


def agent(agent_id: str, *, idle: float, answered: int = 0, skills: dict[str, int] | None = None) -> Agent:
    a = Agent(agent_id, queues=("support",), skills=skills or {}, state=AgentState.READY)
    a.logged_in_at = 0.0
    a.last_call_ended_at = idle
    a.answered_count = answered
    return a


def call(conversation_id: str, priority: int = 0) -> QueuedCall:
    return QueuedCall(conversation_id, "CA" + conversation_id, priority=priority)


AGENTS = [
    agent("8003", idle=30.0, answered=1),
    agent("8001", idle=20.0, answered=5),
    agent("8002", idle=10.0, answered=1),
]


def test_strategies_match_the_config_literal() -> None:
    assert set(STRATEGIES) == {"longest_idle", "round_robin", "fewest_calls", "ring_all", "random", "skills"}


def test_longest_idle() -> None:
    assert [a.id for a in make_queue().choose(AGENTS)] == ["8002"]


def test_longest_idle_without_calls_uses_login_time_and_ties_break_by_id() -> None:
    a, b = Agent("8002", state=AgentState.READY), Agent("8001", state=AgentState.READY)
    a.logged_in_at = b.logged_in_at = 5.0
    assert [x.id for x in make_queue().choose([a, b])] == ["8001"]


def test_fewest_calls_then_longest_idle() -> None:
    assert [a.id for a in make_queue(strategy="fewest_calls").choose(AGENTS)] == ["8002"]


def test_round_robin_rotates_by_id() -> None:
    queue = make_queue(strategy="round_robin")
    picked = []
    for _ in range(4):
        chosen = queue.choose(AGENTS)[0]
        queue.last_offered = chosen.id
        picked.append(chosen.id)
    assert picked == ["8001", "8002", "8003", "8001"]
    queue.last_offered = "8001"
    assert queue.choose([a for a in AGENTS if a.id != "8002"])[0].id == "8003"  # skips who is not there


def test_ring_all_offers_everyone() -> None:
    assert [a.id for a in make_queue(strategy="ring_all").choose(AGENTS)] == ["8001", "8002", "8003"]


def test_random_uses_the_injected_source() -> None:
    picks = {make_queue(strategy="random").choose(AGENTS)[0].id for _ in range(1)}
    rng = random.Random(1)
    expected = rng.choice(sorted(AGENTS, key=lambda a: a.id)).id
    assert picks == {expected}
    queue = Queue(QueueConfig(id="support", strategy="random"), random.Random(99))
    seen = {queue.choose(AGENTS)[0].id for _ in range(50)}
    assert seen == {"8001", "8002", "8003"}


def test_skills_best_level_first_then_longest_idle() -> None:
    queue = make_queue(strategy="skills", skills={"english": 2})
    experts = [
        agent("8001", idle=20.0, skills={"english": 5}),
        agent("8002", idle=10.0, skills={"english": 3}),
        agent("8003", idle=5.0, skills={"english": 5}),
        agent("8004", idle=1.0, skills={"english": 1}),
    ]
    eligible = [a for a in experts if queue.eligible(a)]
    assert [a.id for a in eligible] == ["8001", "8002", "8003"]
    assert [a.id for a in queue.choose(eligible)] == ["8003"]


def test_skills_filter_every_strategy_and_membership() -> None:
    queue = make_queue(skills={"billing": 1})
    assert not queue.eligible(agent("8001", idle=0.0))
    assert queue.eligible(agent("8001", idle=0.0, skills={"billing": 1}))
    outsider = Agent("8009", queues=("sales",), skills={"billing": 9})
    assert not queue.eligible(outsider)


def test_no_candidates() -> None:
    for strategy in STRATEGIES:
        extra = {"skills": {"x": 1}} if strategy == "skills" else {}
        assert make_queue(strategy=strategy, **extra).choose([]) == []


def test_service_order_position_and_removal() -> None:
    queue = make_queue(max_length=3)
    queue.add(call("CV1"), 10.0)
    queue.add(call("CV2", priority=5), 11.0)
    queue.add(call("CV3"), 10.0)
    assert [c.conversation_id for c in queue.callers()] == ["CV2", "CV1", "CV3"]
    assert queue.position("CV1") == 2 and queue.full and len(queue) == 3 and "CV3" in queue
    caller, position = queue.remove("CV2")
    assert (caller.conversation_id, position) == ("CV2", 1)
    assert queue.longest_wait_s(20.0) == 10.0
    with pytest.raises(ValueError, match="already in queue"):
        queue.add(call("CV1"), 12.0)
    with pytest.raises(KeyError):
        queue.position("CV9")
    assert not make_queue().full  # max_length 0: no limit


def test_statistics_and_service_level() -> None:
    queue = make_queue(service_level_s=20)
    assert queue.service_level() is None
    queue.record_answered(5.0)
    queue.record_answered(25.0)
    queue.record_abandoned(3.0)  # a quick hang-up does not count against the service level
    queue.record_abandoned(30.0)
    assert (queue.answered, queue.abandoned) == (2, 2)
    assert queue.service_level() == pytest.approx(33.3)
    queue.add(call("CV1"), 0.0)
    members = [agent("8001", idle=0.0), Agent("8002", queues=("support",), state=AgentState.BUSY)]
    members.append(Agent("8003", queues=("support",), state=AgentState.WRAP_UP))
    stats = queue.stats(12.5, members)
    assert (stats.queue_id, stats.waiting, stats.longest_wait_s) == ("support", 1, 12.5)
    assert (stats.agents_ready, stats.agents_busy, stats.service_level) == (1, 1, 33.3)


def test_dump_and_load() -> None:
    queue = make_queue()
    queue.add(QueuedCall("CV1", "CA1", "sip@x", "inbound", "+86", "8000", "order-1", 2), 1.0)
    queue.add(call("CV2"), 2.0)
    queue.caller("CV2").missed_by.add("8001")  # type: ignore[union-attr]
    queue.last_offered = "8002"
    queue.record_answered(1.0)
    queue.record_abandoned(40.0)
    copy = make_queue()
    copy.load(queue.dump())
    assert copy.dump() == queue.dump()
    assert copy.caller("CV1").call.user_data == "order-1"  # type: ignore[union-attr]
    copy.drop("CV1")
    copy.drop("CV9")
    assert [c.conversation_id for c in copy.callers()] == ["CV2"]
