"""ACD queues: waiting callers in service order, agent selection strategies and live statistics.

A `Queue` holds its callers and counters; the choice of agents is a pure function of the candidates it
is given (`CtiCore` filters them: logged in, `ready`, member of the queue, skilled enough, not the one
who just missed this caller). Callers are served by priority (higher first), then arrival.

Strategies (`[[queues]] strategy`):

| strategy | the agent offered |
|---|---|
| `longest_idle` | the one whose last call ended longest ago (or who logged in longest ago, if none yet) |
| `round_robin` | the next agent by id after the one offered last, wrapping around |
| `fewest_calls` | the one with the fewest answered calls since login, then longest idle |
| `ring_all` | every candidate at once; the first to answer takes the call, the others are cancelled |
| `random` | one chosen by the injected random source |
| `skills` | the highest sum of levels in the queue's required skills, then longest idle |

Ties are broken by agent id, so a choice never depends on dictionary order. Whatever the strategy, a
queue with `skills` offers its calls only to agents at or above every required level.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from softswitch.config import QueueConfig
from softswitch.cti.agents import ON_CALL_STATES, Agent, AgentState
from softswitch.events.types import QueueStats

STRATEGIES = ("longest_idle", "round_robin", "fewest_calls", "ring_all", "random", "skills")


@dataclass(frozen=True, slots=True)
class QueuedCall:
    """A caller the call layer puts in a queue: the leg's fields of the call events, and a priority."""

    conversation_id: str
    call_id: str
    sip_call_id: str = ""
    direction: str = "inbound"
    from_: str = ""
    to: str = ""
    user_data: str | None = None
    #: Served before callers of lower priority in the same queue (e.g. a VIP number).
    priority: int = 0

    def dump(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "call_id": self.call_id,
            "sip_call_id": self.sip_call_id,
            "direction": self.direction,
            "from": self.from_,
            "to": self.to,
            "user_data": self.user_data,
            "priority": self.priority,
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> QueuedCall:
        return cls(
            conversation_id=str(data["conversation_id"]),
            call_id=str(data["call_id"]),
            sip_call_id=str(data.get("sip_call_id", "")),
            direction=str(data.get("direction", "inbound")),
            from_=str(data.get("from", "")),
            to=str(data.get("to", "")),
            user_data=data.get("user_data"),
            priority=int(data.get("priority", 0)),
        )


@dataclass(eq=False)
class WaitingCaller:
    """A caller in a queue, and the agents offered it (now) or who missed it (this time round)."""

    call: QueuedCall
    enqueued_at: float
    arrival: int  # order of arrival in the queue: the tie-break among equal times and priorities
    offered_to: set[str] = field(default_factory=set)
    missed_by: set[str] = field(default_factory=set)

    @property
    def conversation_id(self) -> str:
        return self.call.conversation_id

    @property
    def priority(self) -> int:
        return self.call.priority

    def wait_s(self, now: float) -> float:
        return max(0.0, now - self.enqueued_at)

    def order_key(self) -> tuple[int, float, int]:
        return (-self.priority, self.enqueued_at, self.arrival)


class Queue:
    """One ACD queue: its configuration, its waiting callers and its counters."""

    def __init__(self, config: QueueConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self._callers: dict[str, WaitingCaller] = {}
        self._arrivals = 0
        #: The agent offered last (round_robin continues after it).
        self.last_offered: str | None = None
        self.answered = 0
        self.answered_within_sl = 0
        self.abandoned = 0
        self.abandoned_after_sl = 0

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def strategy(self) -> str:
        return self.config.strategy

    # -- callers -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._callers)

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._callers

    @property
    def full(self) -> bool:
        return 0 < self.config.max_length <= len(self._callers)

    def callers(self) -> list[WaitingCaller]:
        """Waiting callers in service order: priority (higher first), then arrival."""
        return sorted(self._callers.values(), key=WaitingCaller.order_key)

    def caller(self, conversation_id: str) -> WaitingCaller | None:
        return self._callers.get(conversation_id)

    def add(self, call: QueuedCall, now: float) -> WaitingCaller:
        if call.conversation_id in self._callers:
            raise ValueError(f"conversation {call.conversation_id} is already in queue {self.id}")
        self._arrivals += 1
        caller = WaitingCaller(call, now, self._arrivals)
        self._callers[call.conversation_id] = caller
        return caller

    def position(self, conversation_id: str) -> int:
        """1 for the caller served next."""
        for index, caller in enumerate(self.callers(), start=1):
            if caller.conversation_id == conversation_id:
                return index
        raise KeyError(conversation_id)

    def remove(self, conversation_id: str) -> tuple[WaitingCaller, int]:
        """Take a caller out; returns it and the position it held."""
        position = self.position(conversation_id)
        return self._callers.pop(conversation_id), position

    def longest_wait_s(self, now: float) -> float:
        return max((c.wait_s(now) for c in self._callers.values()), default=0.0)

    # -- agent selection ---------------------------------------------------------------------------

    def choose(self, candidates: Sequence[Agent]) -> list[Agent]:
        """The agents to offer the next caller to, by strategy (all of them for ring_all)."""
        if not candidates:
            return []
        by_id = sorted(candidates, key=lambda a: a.id)
        strategy = self.config.strategy
        if strategy == "ring_all":
            return by_id
        if strategy == "round_robin":
            after = [a for a in by_id if self.last_offered is not None and a.id > self.last_offered]
            return [after[0] if after else by_id[0]]
        if strategy == "random":
            return [self.rng.choice(by_id)]
        if strategy == "fewest_calls":
            return [min(by_id, key=lambda a: (a.answered_count, a.idle_since(), a.id))]
        if strategy == "skills":
            required = self.config.skills
            return [min(by_id, key=lambda a: (-a.skill_score(required), a.idle_since(), a.id))]
        return [min(by_id, key=lambda a: (a.idle_since(), a.id))]  # longest_idle

    def eligible(self, agent: Agent) -> bool:
        """Whether the agent may take this queue's calls at all (membership and skills)."""
        return self.id in agent.queues and agent.has_skills(self.config.skills)

    # -- statistics --------------------------------------------------------------------------------

    def record_answered(self, wait_s: float) -> None:
        self.answered += 1
        if wait_s <= self.config.service_level_s:
            self.answered_within_sl += 1

    def record_abandoned(self, wait_s: float) -> None:
        self.abandoned += 1
        if wait_s > self.config.service_level_s:
            self.abandoned_after_sl += 1

    def service_level(self) -> float | None:
        """Percentage of callers answered within `service_level_s` among those answered and those who
        gave up after waiting longer than that (callers who hang up quickly do not count against it)."""
        counted = self.answered + self.abandoned_after_sl
        if counted == 0:
            return None
        return round(100.0 * self.answered_within_sl / counted, 1)

    def stats(self, now: float, members: Sequence[Agent]) -> QueueStats:
        return QueueStats(
            queue_id=self.id,
            waiting=len(self._callers),
            longest_wait_s=round(self.longest_wait_s(now), 3),
            agents_ready=sum(1 for a in members if a.state is AgentState.READY),
            agents_busy=sum(1 for a in members if a.state in ON_CALL_STATES),
            answered=self.answered,
            abandoned=self.abandoned,
            service_level=self.service_level(),
        )

    # -- persistence -------------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {
            "callers": [
                {
                    "call": c.call.dump(),
                    "enqueued_at": c.enqueued_at,
                    "arrival": c.arrival,
                    "missed_by": sorted(c.missed_by),
                }
                for c in self.callers()
            ],
            "arrivals": self._arrivals,
            "last_offered": self.last_offered,
            "answered": self.answered,
            "answered_within_sl": self.answered_within_sl,
            "abandoned": self.abandoned,
            "abandoned_after_sl": self.abandoned_after_sl,
        }

    def load(self, data: dict[str, Any]) -> None:
        """Restore what `dump` wrote; offers in progress are not restored (the core re-offers)."""
        self._callers = {}
        for item in data.get("callers", []):
            call = QueuedCall.load(item["call"])
            caller = WaitingCaller(call, float(item["enqueued_at"]), int(item["arrival"]))
            caller.missed_by = set(item.get("missed_by", []))
            self._callers[call.conversation_id] = caller
        self._arrivals = int(data.get("arrivals", len(self._callers)))
        self.last_offered = data.get("last_offered")
        self.answered = int(data.get("answered", 0))
        self.answered_within_sl = int(data.get("answered_within_sl", 0))
        self.abandoned = int(data.get("abandoned", 0))
        self.abandoned_after_sl = int(data.get("abandoned_after_sl", 0))

    def drop(self, conversation_id: str) -> None:
        """Forget a caller without counting it (reconciliation: its conversation is gone)."""
        self._callers.pop(conversation_id, None)
