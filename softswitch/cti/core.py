"""The CTI core: the single owner of agent and queue state (ARCHITECTURE.md "one owner per state").

Sans-IO (STYLE.md 1-3): every input is a method call carrying `now`, and every method returns an
`Outcome` — the events to publish, the timers to arm or cancel (by `TimerKey`), and the call actions the
call layer must carry out (`OfferCall`, `CancelOffer`, `ConnectCaller`, `RouteCaller`). Nothing here
touches a socket, a task or the clock. An adapter feeds the core from the call layer, the registrar and
the command transports, publishes the events, performs the actions and keeps one timer per key (arming
a key that is armed replaces it; cancelling one that is not is harmless). A timer that fires late or
after the state moved on is ignored: each one is checked against the deadline the core holds.

Commands an agent or supervisor sends (`login`, `logout`, `set_state`) raise `CommandError` when refused,
before anything changes. Inputs from the call layer and the registrar never raise for a stale or
mismatched input (a late `offer_answered`, a call end for an agent who was logged out meanwhile): they
change nothing and say so in the log, because the call layer cannot undo what already happened on the
wire. The exception is a late answer: the agent's leg is then dropped (`CancelOffer`).

Decisions where issue 6 is silent are documented in docs/cti.md; the main ones:

- statistics (`agent.stats`) count from login; `call_count` counts offers and outbound calls,
  `answered_count` the ones connected, `talk_s` their talk time;
- a caller whose offer is cancelled through no fault of the agent (the caller hung up, timed out, or
  another agent answered a ring_all offer) puts the agent back to `ready` without `agent.offer_missed`;
- at restart (`restore`), an agent left `busy` without a live call goes to `wrap_up` (its call ended
  unseen: the after-call work is still owed), one left `reserved` or `ringing` goes back to `ready` (the
  offer is cancelled and the caller, if still there, is offered again), and logged-in agents whose
  device is not registered become `offline`.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from softswitch.config import AgentConfig, Config, CtiConfig, QueueConfig
from softswitch.cti.agents import (
    ON_CALL_STATES,
    OUTBOUND_STATES,
    RESTING_STATES,
    Agent,
    AgentState,
    Device,
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
from softswitch.cti.queues import Queue, QueuedCall, WaitingCaller
from softswitch.events.envelope import format_time
from softswitch.events.types import (
    AgentLoggedIn,
    AgentLoggedOut,
    AgentOffered,
    AgentOfferMissed,
    AgentStateChanged,
    AgentStats,
    CallDequeued,
    CallQueued,
    Event,
    QueueStats,
)

log = structlog.get_logger(__name__)

#: Version of the `snapshot()` document; `restore` refuses others.
SNAPSHOT_VERSION = 1
#: Reason of `not_ready` after an unanswered offer (EVENTS.md; seed: 呼入非接通挂断置忙).
NO_ANSWER_REASON = "no_answer"
#: Reason of `offline` (the device's registration went away).
OFFLINE_REASON = "device_unregistered"
#: Reasons of `busy`: a queue call that was answered, or a call the agent placed (or took directly).
BUSY_QUEUE_REASON = "queue"
BUSY_OUTBOUND_REASON = "outbound"

TimerKind = Literal["offer", "wrap_up", "max_wait"]


# -- what the core hands out ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimerKey:
    """Names one timer: `offer` and `wrap_up` per agent id, `max_wait` per conversation id."""

    kind: TimerKind
    subject: str


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """(Re)arm `key` to fire at `at` (same clock as `now`); feed it back with `timer_fired(key, now)`."""

    key: TimerKey
    at: float


@dataclass(frozen=True, slots=True)
class OfferCall:
    """Call the agent's device for a queue caller (the agent is `reserved`); report `offer_ringing`,
    `offer_answered` or `offer_failed`. `auto_answer` asks a device that supports it to answer itself."""

    agent_id: str
    conversation_id: str
    queue_id: str
    device: Device
    auto_answer: bool
    caller: str  # the customer's number, for the agent's display
    user_data: str | None


@dataclass(frozen=True, slots=True)
class CancelOffer:
    """Stop calling the agent's device for this conversation (or drop the leg if it answered late)."""

    agent_id: str
    conversation_id: str
    device: Device


@dataclass(frozen=True, slots=True)
class ConnectCaller:
    """The agent answered: bridge the queue caller with the agent's leg."""

    agent_id: str
    conversation_id: str
    queue_id: str


@dataclass(frozen=True, slots=True)
class RouteCaller:
    """Take the caller out of the queue to the dialplan destination `to`; `None`: end the call.

    `reason`: `timeout` (max wait), `full` (max length), `no_agents` (no agent logged in)."""

    conversation_id: str
    queue_id: str
    to: str | None
    reason: str


CallAction = OfferCall | CancelOffer | ConnectCaller | RouteCaller


@dataclass
class Outcome:
    """What one input produced, in order: events to publish, timers, call actions."""

    events: list[Event] = field(default_factory=list)
    timers: list[ArmTimer] = field(default_factory=list)
    cancelled_timers: list[TimerKey] = field(default_factory=list)
    actions: list[CallAction] = field(default_factory=list)

    def arm(self, key: TimerKey, at: float) -> None:
        self.cancelled_timers = [k for k in self.cancelled_timers if k != key]
        self.timers = [t for t in self.timers if t.key != key]
        self.timers.append(ArmTimer(key, at))

    def cancel(self, key: TimerKey) -> None:
        self.timers = [t for t in self.timers if t.key != key]
        if key not in self.cancelled_timers:
            self.cancelled_timers.append(key)

    def events_of(self, cls: type[Event]) -> list[Any]:
        """The events of one type (for tests and adapters that route by type)."""
        return [e for e in self.events if isinstance(e, cls)]


def offer_timer(agent_id: str) -> TimerKey:
    return TimerKey("offer", agent_id)


def wrap_up_timer(agent_id: str) -> TimerKey:
    return TimerKey("wrap_up", agent_id)


def max_wait_timer(conversation_id: str) -> TimerKey:
    return TimerKey("max_wait", conversation_id)


# -- the core ------------------------------------------------------------------------------------------


class CtiCore:
    """Agents and queues of one node. Build with `from_config`; drive with the input methods."""

    def __init__(
        self,
        agents: Iterable[AgentConfig],
        queues: Iterable[QueueConfig],
        *,
        cti: CtiConfig | None = None,
        users: Collection[str] = (),
        pstn_available: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.cti = cti if cti is not None else CtiConfig()
        self.users = frozenset(users)
        self.pstn_available = pstn_available
        self.rng = rng if rng is not None else random.Random()
        self.agent_configs: dict[str, AgentConfig] = {}
        self._agents: dict[str, Agent] = {}
        for config in agents:
            self.agent_configs[config.id] = config
            self._agents[config.id] = Agent(
                id=config.id,
                role=config.role,
                queues=tuple(config.queues),
                skills=dict(config.skills),
                wrap_up_s=config.wrap_up_s,
                auto_answer=config.auto_answer,
                team=frozenset(config.team),
            )
        self._queues: dict[str, Queue] = {q.id: Queue(q, self.rng) for q in queues}
        self._registered: set[str] = set()
        self._touched: set[str] = set()  # queues whose figures may have changed during this input
        self._published_stats: dict[str, tuple[Any, ...]] = {}

    @classmethod
    def from_config(cls, config: Config, *, rng: random.Random | None = None) -> CtiCore:
        return cls(
            config.agents,
            config.queues,
            cti=config.cti,
            users=[u.name for u in config.users],
            pstn_available=bool(config.trunks),
            rng=rng,
        )

    # -- queries -----------------------------------------------------------------------------------

    def agent(self, agent_id: str) -> Agent:
        """The agent, or `CommandError(unknown_agent)`."""
        agent = self._agents.get(agent_id)
        if agent is None:
            raise CommandError(UNKNOWN_AGENT, f"no agent {agent_id!r}")
        return agent

    def agents(self) -> list[Agent]:
        return [self._agents[k] for k in sorted(self._agents)]

    def queue(self, queue_id: str) -> Queue:
        queue = self._queues.get(queue_id)
        if queue is None:
            raise CommandError(UNKNOWN_QUEUE, f"no queue {queue_id!r}")
        return queue

    def queues(self) -> list[Queue]:
        return [self._queues[k] for k in sorted(self._queues)]

    def is_registered(self, user: str) -> bool:
        return user in self._registered

    def queue_of(self, conversation_id: str) -> Queue | None:
        """The queue a conversation waits in, if any."""
        for queue in self._queues.values():
            if conversation_id in queue:
                return queue
        return None

    def state_data(self, agent_id: str, now: float) -> dict[str, Any]:
        """The agent's current state as a command reply's `data` (`agent.get_state`)."""
        agent = self.agent(agent_id)
        pending = None
        if agent.state is AgentState.BUSY:
            pending = {"state": agent.resume_state.value, "reason": agent.resume_reason}
        elif agent.state is AgentState.OFFLINE:
            pending = {"state": agent.return_state.value, "reason": agent.return_reason}
        return {
            "agent_id": agent.id,
            "state": agent.state.value,
            "reason": agent.reason,
            "since": format_time(agent.since),
            "state_s": round(max(0.0, now - agent.since), 3),
            "wrap_up_deadline": _time_or_none(agent.wrap_up_deadline),
            "queues": list(agent.queues),
            "device": agent.device.as_dict() if agent.device else None,
            "conversation_id": agent.conversation_id,
            "next": pending,
            "stats": {
                "call_count": agent.call_count,
                "answered_count": agent.answered_count,
                "talk_s": round(agent.talk_s, 3),
            },
        }

    def queue_stats(self, queue_id: str, now: float) -> QueueStats:
        queue = self.queue(queue_id)
        return queue.stats(now, self._members(queue))

    # -- agent commands ----------------------------------------------------------------------------

    def login(
        self,
        agent_id: str,
        now: float,
        *,
        device: Device | None = None,
        state: str | None = None,
        reason: str | None = None,
        forced_by: str | None = None,
    ) -> Outcome:
        """Log the agent in on `device` (default: its configured extension) in `state` (default: its
        configured `initial_state`). A device that is not registered leaves the agent `offline` until
        it registers."""
        agent = self.agent(agent_id)
        if agent.logged_in:
            raise CommandError(
                ALREADY_LOGGED_IN, f"agent {agent_id} is already logged in ({agent.state.value})"
            )
        config = self.agent_configs[agent_id]
        if device is None:
            if config.extension is None:
                raise CommandError(
                    INVALID_ARGUMENT, "device: required (the agent has no configured extension)"
                )
            device = Device("sip", config.extension)
        self._check_device(agent, device)
        target, target_reason = self._requested_state(state or config.initial_state, reason)

        out = Outcome()
        agent.device = device
        agent.logged_in_at = now
        agent.last_call_ended_at = None
        agent.device_lost = False
        agent.clear_call()
        agent.reset_stats()
        out.events.append(AgentLoggedIn(agent.id, device.as_dict(), forced_by))
        if device.needs_registration and device.address not in self._registered:
            agent.return_state, agent.return_reason = target, target_reason
            self._move(agent, AgentState.OFFLINE, now, out, OFFLINE_REASON)
        else:
            self._move(agent, target, now, out, target_reason)
        out.events.append(self._agent_stats(agent))
        return self._settle(out, now)

    def logout(self, agent_id: str, now: float, *, forced_by: str | None = None) -> Outcome:
        """Log the agent out. Refused while on a call unless forced by a supervisor (`forced_by`), in
        which case the call goes on without the agent being tracked."""
        agent = self.agent(agent_id)
        self._require_logged_in(agent)
        if agent.state is AgentState.BUSY and forced_by is None:
            raise CommandError(INVALID_STATE, f"agent {agent_id} is on a call: hang up before logging out")
        out = Outcome()
        if agent.state in (AgentState.RESERVED, AgentState.RINGING):
            self._withdraw_offer(agent, out)
        out.cancel(wrap_up_timer(agent.id))
        device = agent.device.as_dict() if agent.device else {}
        self._move(agent, AgentState.LOGGED_OUT, now, out, None)
        agent.device = None
        agent.device_lost = False
        agent.clear_call()
        out.events.append(AgentLoggedOut(agent.id, device, forced_by))
        return self._settle(out, now)

    def set_state(self, agent_id: str, state: str, now: float, *, reason: str | None = None) -> Outcome:
        """`ready` or `not_ready` (with a configured reason). While on a call the request is remembered
        for after it; while `offline`, for when the device returns; during wrap-up it ends wrap-up."""
        agent = self.agent(agent_id)
        self._require_logged_in(agent)
        target, target_reason = self._requested_state(state, reason)
        out = Outcome()
        current = agent.state
        if current is AgentState.BUSY:
            agent.resume_state, agent.resume_reason = target, target_reason
        elif current is AgentState.OFFLINE:
            agent.return_state, agent.return_reason = target, target_reason
        elif current in (AgentState.RESERVED, AgentState.RINGING):
            if target is AgentState.READY:
                raise CommandError(INVALID_STATE, f"agent {agent_id} has an offer {current.value}")
            self._withdraw_offer(agent, out)
            self._move(agent, target, now, out, target_reason)
        elif current is AgentState.WRAP_UP:
            out.cancel(wrap_up_timer(agent.id))
            self._move(agent, target, now, out, target_reason)
        elif (current, agent.reason) != (target, target_reason):
            self._move(agent, target, now, out, target_reason)
        return self._settle(out, now)

    # -- the registrar -----------------------------------------------------------------------------

    def device_registered(self, user: str, now: float) -> Outcome:
        """The user has a binding again (or for the first time): its agents come back from `offline`."""
        self._registered.add(user)
        out = Outcome()
        for agent in self._agents_on(user):
            agent.device_lost = False
            if agent.state is AgentState.OFFLINE:
                self._move(agent, agent.return_state, now, out, agent.return_reason)
        return self._settle(out, now)

    def device_unregistered(self, user: str, now: float) -> Outcome:
        """The user's last binding went away: its agents go `offline` (a busy one when its call ends)."""
        self._registered.discard(user)
        out = Outcome()
        for agent in self._agents_on(user):
            self._go_offline(agent, now, out)
        return self._settle(out, now)

    # -- the call layer: queue callers -------------------------------------------------------------

    def call_queued(
        self, queue_id: str, call: QueuedCall, now: float, *, reason: str = "dialplan"
    ) -> Outcome:
        """A caller enters `queue_id` (dialplan `queue` action, or a transfer to a queue). A caller the
        queue cannot take is routed away at once (`RouteCaller`) without `call.queued`."""
        queue = self.queue(queue_id)
        existing = self.queue_of(call.conversation_id)
        if existing is not None:
            raise ValueError(f"conversation {call.conversation_id} already waits in queue {existing.id}")
        out = Outcome()
        if queue.config.no_agents is not None and not self._anyone_logged_in(queue):
            out.actions.append(
                RouteCaller(call.conversation_id, queue.id, queue.config.no_agents, "no_agents")
            )
            return out
        if queue.full:
            out.actions.append(RouteCaller(call.conversation_id, queue.id, queue.config.overflow, "full"))
            return out
        queue.add(call, now)
        out.events.append(self._queued_event(queue, call, now, reason))
        out.arm(max_wait_timer(call.conversation_id), now + queue.config.max_wait_s)
        self._touched.add(queue.id)
        return self._settle(out, now)

    def caller_abandoned(self, conversation_id: str, now: float) -> Outcome:
        """The waiting caller hung up (counts as `abandoned`)."""
        return self._caller_gone(conversation_id, now, "abandoned")

    def caller_left(self, conversation_id: str, now: float) -> Outcome:
        """The waiting caller pressed the key that leaves the queue (the dialplan routes it on)."""
        return self._caller_gone(conversation_id, now, "left")

    # -- the call layer: offers --------------------------------------------------------------------

    def offer_ringing(self, agent_id: str, conversation_id: str, now: float) -> Outcome:
        """The agent's device alerts (180/183) for the offer."""
        agent = self.agent(agent_id)
        out = Outcome()
        if agent.state is AgentState.RESERVED and agent.conversation_id == conversation_id:
            self._move(agent, AgentState.RINGING, now, out, None)
        else:
            self._stale("offer_ringing", agent, conversation_id)
        return self._settle(out, now)

    def offer_answered(self, agent_id: str, conversation_id: str, now: float) -> Outcome:
        """The agent's device answered the offer: connect the caller (or drop the leg if too late)."""
        agent = self.agent(agent_id)
        out = Outcome()
        queue = self.queue_of(conversation_id)
        offered = agent.state in (AgentState.RESERVED, AgentState.RINGING)
        if not offered or agent.conversation_id != conversation_id or queue is None:
            self._stale("offer_answered", agent, conversation_id)
            if agent.device is not None:
                out.actions.append(CancelOffer(agent.id, conversation_id, agent.device))
            return self._settle(out, now)
        caller, position = queue.remove(conversation_id)
        out.cancel(max_wait_timer(conversation_id))
        out.cancel(offer_timer(agent.id))
        for other_id in sorted(caller.offered_to - {agent.id}):
            other = self._agents[other_id]
            self._cancel_offer(other, out)
            self._move(other, AgentState.READY, now, out, None)
        wait_s = caller.wait_s(now)
        queue.record_answered(wait_s)
        out.events.append(self._dequeued_event(queue, caller, position, now, "answered"))
        agent.offer_deadline = None
        agent.answered_at = now
        agent.answered_count += 1
        agent.resume_state, agent.resume_reason = AgentState.READY, None
        self._move(agent, AgentState.BUSY, now, out, BUSY_QUEUE_REASON)
        out.actions.append(ConnectCaller(agent.id, conversation_id, queue.id))
        self._touched.add(queue.id)
        return self._settle(out, now)

    def offer_failed(self, agent_id: str, conversation_id: str, now: float) -> Outcome:
        """The agent's device rejected the offer or could not be reached: the offer is missed."""
        agent = self.agent(agent_id)
        out = Outcome()
        if (
            agent.state in (AgentState.RESERVED, AgentState.RINGING)
            and agent.conversation_id == conversation_id
        ):
            self._miss(agent, now, out)
        else:
            self._stale("offer_failed", agent, conversation_id)
        return self._settle(out, now)

    # -- the call layer: the agent's own calls -----------------------------------------------------

    def agent_call_started(self, agent_id: str, conversation_id: str, now: float) -> Outcome:
        """The agent placed a call (or took one not offered by a queue): `busy` until it ends. An offer
        in progress is withdrawn (the caller is offered to someone else)."""
        agent = self.agent(agent_id)
        out = Outcome()
        if agent.state in OUTBOUND_STATES:
            if agent.state is AgentState.WRAP_UP:
                out.cancel(wrap_up_timer(agent.id))
            else:
                agent.resume_state, agent.resume_reason = agent.state, agent.reason
        elif agent.state in (AgentState.RESERVED, AgentState.RINGING):
            self._withdraw_offer(agent, out)
            agent.resume_state, agent.resume_reason = AgentState.READY, None
        else:
            self._stale("agent_call_started", agent, conversation_id)
            return self._settle(out, now)
        agent.clear_call()
        agent.conversation_id = conversation_id
        agent.answered_at = now
        agent.call_count += 1
        self._move(agent, AgentState.BUSY, now, out, BUSY_OUTBOUND_REASON)
        return self._settle(out, now)

    def agent_call_ended(
        self, agent_id: str, conversation_id: str, now: float, *, talk_s: float | None = None
    ) -> Outcome:
        """The agent's call ended: wrap-up (queue's or agent's seconds), then `resume_state`.

        `talk_s`: the talk time the call layer measured (from its legs); without it the time since the
        call was answered (queue calls) or started (outbound) counts. An outbound call with `talk_s`
        of 0 was never answered and does not count in `answered_count`."""
        agent = self.agent(agent_id)
        out = Outcome()
        if agent.state is not AgentState.BUSY or agent.conversation_id != conversation_id:
            self._stale("agent_call_ended", agent, conversation_id)
            return self._settle(out, now)
        started = agent.answered_at if agent.answered_at is not None else now
        talk = max(0.0, talk_s if talk_s is not None else now - started)
        if agent.queue_id is None and talk > 0:
            agent.answered_count += 1
        agent.talk_s += talk
        agent.last_call_ended_at = now
        queue = self._queues.get(agent.queue_id) if agent.queue_id is not None else None
        wrap_s = agent.wrap_up_s
        if queue is not None and queue.config.wrap_up_s is not None:
            wrap_s = queue.config.wrap_up_s
        agent.clear_call()
        out.events.append(self._agent_stats(agent))
        if agent.device_lost:
            agent.device_lost = False
            agent.return_state, agent.return_reason = agent.resume_state, agent.resume_reason
            self._move(agent, AgentState.OFFLINE, now, out, OFFLINE_REASON)
        elif wrap_s > 0:
            self._move(agent, AgentState.WRAP_UP, now, out, None, wrap_up_deadline=now + wrap_s)
            out.arm(wrap_up_timer(agent.id), now + wrap_s)
        else:
            self._move(agent, agent.resume_state, now, out, agent.resume_reason)
        return self._settle(out, now)

    # -- timers ------------------------------------------------------------------------------------

    def timer_fired(self, key: TimerKey, now: float) -> Outcome:
        """A timer the core armed went off (checked against the deadline the core holds)."""
        out = Outcome()
        if key.kind == "offer":
            agent = self._agents.get(key.subject)
            if (
                agent is not None
                and agent.state in (AgentState.RESERVED, AgentState.RINGING)
                and agent.offer_deadline is not None
                and now >= agent.offer_deadline
            ):
                self._miss(agent, now, out)
        elif key.kind == "wrap_up":
            agent = self._agents.get(key.subject)
            if (
                agent is not None
                and agent.state is AgentState.WRAP_UP
                and agent.wrap_up_deadline is not None
                and now >= agent.wrap_up_deadline
            ):
                self._move(agent, agent.resume_state, now, out, agent.resume_reason)
        elif key.kind == "max_wait":
            queue = self.queue_of(key.subject)
            caller = queue.caller(key.subject) if queue is not None else None
            if (
                queue is not None
                and caller is not None
                and now >= caller.enqueued_at + queue.config.max_wait_s
            ):
                self._route_out(queue, caller, now, out, "timeout", queue.config.overflow)
        else:
            raise ValueError(f"unknown timer kind {key.kind!r}")
        return self._settle(out, now)

    # -- persistence -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything to persist (JSON-able): agents' state and statistics, queues' callers and counters."""
        return {
            "version": SNAPSHOT_VERSION,
            "agents": {a.id: a.dump() for a in self.agents()},
            "queues": {q.id: q.dump() for q in self.queues()},
        }

    def restore(
        self,
        snapshot: Mapping[str, Any] | None,
        registrations: Collection[str],
        live_conversations: Collection[str],
        now: float,
    ) -> Outcome:
        """Load a snapshot taken before a restart and reconcile it with what is true now: the users
        registered and the conversations still up. Returns the events of every change and every timer
        to arm (timers do not survive a restart). Agents and queues no longer configured are dropped."""
        if snapshot is not None and snapshot.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {snapshot.get('version')!r} is not {SNAPSHOT_VERSION}")
        self._registered = set(registrations)
        live = set(live_conversations)
        out = Outcome()
        saved_agents: Mapping[str, Any] = snapshot.get("agents", {}) if snapshot else {}
        saved_queues: Mapping[str, Any] = snapshot.get("queues", {}) if snapshot else {}
        for queue_id, data in saved_queues.items():
            if queue_id in self._queues:
                self._queues[queue_id].load(data)
        for agent_id, data in saved_agents.items():
            if agent_id in self._agents:
                self._agents[agent_id].load(data)
        for queue in self.queues():
            for caller in queue.callers():
                if caller.conversation_id not in live:
                    queue.drop(caller.conversation_id)  # its own call.ended / cdr.created tell the story
                else:
                    out.arm(
                        max_wait_timer(caller.conversation_id), caller.enqueued_at + queue.config.max_wait_s
                    )
            self._touched.add(queue.id)
        for agent in self.agents():
            self._reconcile(agent, live, now, out)
        for queue in self.queues():
            for caller in queue.callers():
                if now >= caller.enqueued_at + queue.config.max_wait_s:
                    out.cancel(max_wait_timer(caller.conversation_id))
                    self._route_out(queue, caller, now, out, "timeout", queue.config.overflow)
        self._published_stats.clear()
        return self._settle(out, now)

    def _reconcile(self, agent: Agent, live: set[str], now: float, out: Outcome) -> None:
        if agent.state is AgentState.LOGGED_OUT:
            agent.device = None
            agent.clear_call()
            return
        if agent.device is None:  # a snapshot from a broken writer: nothing to ring, log out
            self._move(agent, AgentState.LOGGED_OUT, now, out, None)
            agent.clear_call()
            return
        if agent.state in (AgentState.RESERVED, AgentState.RINGING):
            if agent.conversation_id in live:
                out.actions.append(CancelOffer(agent.id, agent.conversation_id or "", agent.device))
            agent.clear_call()
            self._move(agent, AgentState.READY, now, out, None)
        elif agent.state is AgentState.BUSY and agent.conversation_id not in live:
            agent.clear_call()
            agent.last_call_ended_at = now
            self._move(agent, AgentState.WRAP_UP, now, out, None, wrap_up_deadline=now + agent.wrap_up_s)
        if agent.state is AgentState.WRAP_UP:
            deadline = agent.wrap_up_deadline if agent.wrap_up_deadline is not None else now
            if now >= deadline:
                self._move(agent, agent.resume_state, now, out, agent.resume_reason)
            else:
                out.arm(wrap_up_timer(agent.id), deadline)
        registered = not agent.device.needs_registration or agent.device.address in self._registered
        if agent.state is AgentState.OFFLINE and registered:
            self._move(agent, agent.return_state, now, out, agent.return_reason)
        elif agent.state is not AgentState.OFFLINE and not registered:
            self._go_offline(agent, now, out)

    # -- internals ---------------------------------------------------------------------------------

    def _move(
        self,
        agent: Agent,
        state: AgentState,
        now: float,
        out: Outcome,
        reason: str | None,
        *,
        wrap_up_deadline: float | None = None,
    ) -> None:
        previous = agent.move(state, now, reason)
        agent.wrap_up_deadline = wrap_up_deadline if state is AgentState.WRAP_UP else None
        out.events.append(
            AgentStateChanged(
                agent_id=agent.id,
                state=state.value,
                previous_state=previous.value,
                reason=reason,
                since=format_time(now),
                wrap_up_deadline=_time_or_none(agent.wrap_up_deadline),
                queues=agent.queues,
            )
        )
        self._touched.update(agent.queues)

    def _requested_state(self, state: str, reason: str | None) -> tuple[AgentState, str | None]:
        if state == "ready":
            if reason is not None:
                raise CommandError(INVALID_ARGUMENT, "reason: only not_ready takes a reason")
            return AgentState.READY, None
        if state == "not_ready":
            chosen = reason if reason is not None else self.cti.default_not_ready_reason
            if chosen not in self.cti.not_ready_reasons:
                allowed = ", ".join(self.cti.not_ready_reasons)
                raise CommandError(INVALID_ARGUMENT, f"reason: {chosen!r} is not one of {allowed}")
            return AgentState.NOT_READY, chosen
        raise CommandError(INVALID_ARGUMENT, f"state: expected ready or not_ready, got {state!r}")

    def _check_device(self, agent: Agent, device: Device) -> None:
        if device.kind in ("sip", "webrtc"):
            if device.address not in self.users:
                raise CommandError(DEVICE_UNAVAILABLE, f"device: no user {device.address!r} is configured")
        elif device.kind == "pstn":
            if not self.pstn_available:
                raise CommandError(
                    DEVICE_UNAVAILABLE, "device: no trunk is configured to reach a PSTN number"
                )
        else:
            raise CommandError(
                INVALID_ARGUMENT, f"device.kind: expected sip, pstn or webrtc, got {device.kind!r}"
            )
        for other in self._agents.values():
            if other is not agent and other.logged_in and other.device == device:
                raise CommandError(
                    DEVICE_UNAVAILABLE,
                    f"device: {device.kind} {device.address} is in use by agent {other.id}",
                )

    def _require_logged_in(self, agent: Agent) -> None:
        if not agent.logged_in:
            raise CommandError(AGENT_NOT_LOGGED_IN, f"agent {agent.id} is not logged in")

    def _agents_on(self, user: str) -> list[Agent]:
        return [
            a
            for a in self.agents()
            if a.logged_in
            and a.device is not None
            and a.device.needs_registration
            and a.device.address == user
        ]

    def _go_offline(self, agent: Agent, now: float, out: Outcome) -> None:
        state = agent.state
        if state in RESTING_STATES:
            agent.return_state, agent.return_reason = state, agent.reason
        elif state is AgentState.WRAP_UP:
            out.cancel(wrap_up_timer(agent.id))
            agent.return_state, agent.return_reason = agent.resume_state, agent.resume_reason
        elif state in (AgentState.RESERVED, AgentState.RINGING):
            self._withdraw_offer(agent, out)
            agent.return_state, agent.return_reason = AgentState.READY, None
        elif state is AgentState.BUSY:
            agent.device_lost = True
            return
        else:
            return
        self._move(agent, AgentState.OFFLINE, now, out, OFFLINE_REASON)

    def _anyone_logged_in(self, queue: Queue) -> bool:
        return any(a.available for a in self._members(queue))

    def _members(self, queue: Queue) -> list[Agent]:
        return [a for a in self.agents() if queue.id in a.queues]

    def _cancel_offer(self, agent: Agent, out: Outcome) -> None:
        """Stop the agent's offer: the device stops ringing, the caller no longer counts it as offered."""
        conversation_id = agent.conversation_id
        if conversation_id is not None:
            queue = self.queue_of(conversation_id)
            caller = queue.caller(conversation_id) if queue is not None else None
            if caller is not None:
                caller.offered_to.discard(agent.id)
            if agent.device is not None:
                out.actions.append(CancelOffer(agent.id, conversation_id, agent.device))
        out.cancel(offer_timer(agent.id))
        agent.clear_call()

    def _withdraw_offer(self, agent: Agent, out: Outcome) -> None:
        """Cancel the agent's offer for a reason of the agent's own (no `offer_missed`)."""
        self._cancel_offer(agent, out)

    def _miss(self, agent: Agent, now: float, out: Outcome) -> None:
        """The agent did not answer: `agent.offer_missed`, then not_ready/no_answer (or ready)."""
        conversation_id = agent.conversation_id or ""
        queue_id = agent.queue_id or ""
        queue = self.queue_of(conversation_id)
        caller = queue.caller(conversation_id) if queue is not None else None
        if caller is not None:
            caller.offered_to.discard(agent.id)
            caller.missed_by.add(agent.id)
        if agent.device is not None:
            # The device may still be ringing (timeout) or already gone (rejected): either way, stop it.
            out.actions.append(CancelOffer(agent.id, conversation_id, agent.device))
        out.cancel(offer_timer(agent.id))
        agent.clear_call()
        auto = self.cti.no_answer_not_ready
        out.events.append(AgentOfferMissed(agent.id, conversation_id, queue_id, auto))
        if auto:
            self._move(agent, AgentState.NOT_READY, now, out, NO_ANSWER_REASON)
        else:
            self._move(agent, AgentState.READY, now, out, None)

    def _caller_gone(self, conversation_id: str, now: float, reason: str) -> Outcome:
        out = Outcome()
        queue = self.queue_of(conversation_id)
        caller = queue.caller(conversation_id) if queue is not None else None
        if queue is None or caller is None:
            log.info("caller not waiting in any queue", conversation_id=conversation_id, reason=reason)
            return self._settle(out, now)
        self._release_offers(caller, now, out)
        caller, position = queue.remove(conversation_id)
        if reason == "abandoned":
            queue.record_abandoned(caller.wait_s(now))
        out.cancel(max_wait_timer(conversation_id))
        out.events.append(self._dequeued_event(queue, caller, position, now, reason))
        self._touched.add(queue.id)
        return self._settle(out, now)

    def _release_offers(self, caller: WaitingCaller, now: float, out: Outcome) -> None:
        """The caller goes away: agents offered it go back to ready (not their doing)."""
        for agent_id in sorted(caller.offered_to):
            agent = self._agents[agent_id]
            self._cancel_offer(agent, out)
            self._move(agent, AgentState.READY, now, out, None)
        caller.offered_to.clear()

    def _route_out(
        self, queue: Queue, caller: WaitingCaller, now: float, out: Outcome, reason: str, to: str | None
    ) -> None:
        self._release_offers(caller, now, out)
        caller, position = queue.remove(caller.conversation_id)
        out.events.append(self._dequeued_event(queue, caller, position, now, reason))
        out.actions.append(RouteCaller(caller.conversation_id, queue.id, to, reason))
        self._touched.add(queue.id)

    def _dispatch(self, now: float, out: Outcome) -> None:
        """Offer waiting callers to ready agents: higher-priority queues first, then caller priority and
        arrival across queues; each caller with an offer ringing is skipped."""
        waiting: list[tuple[tuple[int, int, float, int], Queue, WaitingCaller]] = []
        for queue in self._queues.values():
            for caller in queue.callers():
                if not caller.offered_to:
                    key = (-queue.config.priority, -caller.priority, caller.enqueued_at, caller.arrival)
                    waiting.append((key, queue, caller))
        waiting.sort(key=lambda item: (item[0], item[1].id))
        for _, queue, caller in waiting:
            eligible = [a for a in self.agents() if a.state is AgentState.READY and queue.eligible(a)]
            if not eligible:
                continue
            fresh = [a for a in eligible if a.id not in caller.missed_by]
            if not fresh:  # everyone eligible missed this caller once: start another round
                caller.missed_by.clear()
                fresh = eligible
            for agent in queue.choose(fresh):
                self._offer(queue, caller, agent, now, out)

    def _offer(self, queue: Queue, caller: WaitingCaller, agent: Agent, now: float, out: Outcome) -> None:
        assert agent.device is not None  # a ready agent always has a device
        caller.offered_to.add(agent.id)
        queue.last_offered = agent.id
        agent.conversation_id = caller.conversation_id
        agent.queue_id = queue.id
        agent.offer_deadline = now + queue.config.ring_timeout_s
        agent.call_count += 1
        self._move(agent, AgentState.RESERVED, now, out, None)
        out.events.append(AgentOffered(agent.id, caller.conversation_id, queue.id))
        out.actions.append(
            OfferCall(
                agent_id=agent.id,
                conversation_id=caller.conversation_id,
                queue_id=queue.id,
                device=agent.device,
                auto_answer=agent.auto_answer,
                caller=caller.call.from_,
                user_data=caller.call.user_data,
            )
        )
        out.arm(offer_timer(agent.id), agent.offer_deadline)

    def _empty_queues(self, now: float, out: Outcome) -> None:
        """Callers of a queue with a `no_agents` destination leave when its last agent logs out."""
        for queue in self.queues():
            if queue.config.no_agents is None or not len(queue) or self._anyone_logged_in(queue):
                continue
            for caller in queue.callers():
                out.cancel(max_wait_timer(caller.conversation_id))
                self._route_out(queue, caller, now, out, "no_agents", queue.config.no_agents)

    def _settle(self, out: Outcome, now: float) -> Outcome:
        """After every input: send callers of agentless queues away, offer callers to ready agents,
        fill in wrap-up deadlines, and publish `queue.stats` of every queue whose figures changed."""
        self._empty_queues(now, out)
        self._dispatch(now, out)
        for queue_id in sorted(self._touched):
            queue = self._queues.get(queue_id)
            if queue is None:
                continue
            stats = queue.stats(now, self._members(queue))
            figures = (
                stats.waiting,
                stats.agents_ready,
                stats.agents_busy,
                stats.answered,
                stats.abandoned,
                stats.service_level,
            )
            if self._published_stats.get(queue_id) != figures:
                self._published_stats[queue_id] = figures
                out.events.append(stats)
        self._touched.clear()
        return out

    def _agent_stats(self, agent: Agent) -> AgentStats:
        return AgentStats(agent.id, agent.call_count, agent.answered_count, round(agent.talk_s, 3))

    def _queued_event(self, queue: Queue, call: QueuedCall, now: float, reason: str) -> CallQueued:
        return CallQueued(
            **_leg_fields(call),
            queue_id=queue.id,
            position=queue.position(call.conversation_id),
            wait_s=0.0,
            reason=reason,
        )

    def _dequeued_event(
        self, queue: Queue, caller: WaitingCaller, position: int, now: float, reason: str
    ) -> CallDequeued:
        return CallDequeued(
            **_leg_fields(caller.call),
            queue_id=queue.id,
            position=position,
            wait_s=round(caller.wait_s(now), 3),
            reason=reason,
        )

    def _stale(self, what: str, agent: Agent, conversation_id: str) -> None:
        log.info(
            "stale CTI input ignored",
            input=what,
            agent_id=agent.id,
            state=agent.state.value,
            conversation_id=conversation_id,
            agent_conversation_id=agent.conversation_id,
        )


def _leg_fields(call: QueuedCall) -> dict[str, Any]:
    return {
        "conversation_id": call.conversation_id,
        "call_id": call.call_id,
        "sip_call_id": call.sip_call_id,
        "direction": call.direction,
        "from_": call.from_,
        "to": call.to,
        "role": "caller",
        "user_data": call.user_data,
    }


def _time_or_none(value: float | None) -> str | None:
    return None if value is None else format_time(value)


__all__ = [
    "ON_CALL_STATES",
    "ArmTimer",
    "CallAction",
    "CancelOffer",
    "ConnectCaller",
    "CtiCore",
    "OfferCall",
    "Outcome",
    "QueuedCall",
    "RouteCaller",
    "TimerKey",
]
