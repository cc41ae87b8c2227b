"""Contact-centre agents as explicit state machines (STYLE.md 5), owned by `softswitch.cti.core.CtiCore`.

An agent logs in on a device and moves through the states of EVENTS.md:

| state | meaning | seed (PhoneKit / DKY) |
|---|---|---|
| `logged_out` | not logged in | 下班 / logoff |
| `ready` | waiting for a queue call | 就绪 / 置闲 (state 2) |
| `not_ready` | no queue calls; `reason` says why | 暂停 pause / 置忙 (state 3); 小休 is reason `break` |
| `reserved` | chosen for a queue caller; the device is being called | |
| `ringing` | the device rings with the offer | 振铃 |
| `busy` | on a call (a queue call answered, or an outbound call) | 通话中 |
| `wrap_up` | after-call work until `wrap_up_deadline` (话后处理 / 整理) | pauseCause `wrapup` |
| `offline` | logged in, but the device's registration is gone: never offered calls | 掉线 |

Rules (issue 6):

- Queue calls are offered only to `ready` agents; outbound calls are allowed from `ready`, `not_ready`
  and `wrap_up` (DKY: 置忙 "only affects incoming calls").
- An unanswered offer puts the agent in `not_ready` with reason `no_answer` (seed: 呼入非接通挂断置忙),
  unless `[cti] no_answer_not_ready` is off.
- After a call the agent is in `wrap_up` for the queue's (or the agent's) `wrap_up_s` and then goes back
  to `resume_state`: `ready` after a queue call, the state held before the call after an outbound one,
  or what the agent asked for while busy (`agent.set_state` during a call is remembered, not refused).
  The agent may end wrap-up early with `agent.set_state`.
- A device whose registration goes away makes a `ready`, `not_ready` or `wrap_up` agent `offline`; a
  `busy` agent stays `busy` until the call ends (SIP dialogs outlive registrations) and goes `offline`
  then. **When the device registers again the agent goes back to the state it had before** (`ready`,
  or `not_ready` with its reason; after a wrap-up cut short, the state the wrap-up would have ended
  in). Chosen over `not_ready`/`device_returned` because the common cause is a phone that rebooted or
  lost its network for a moment: an agent who was ready keeps taking calls without touching the
  toolbar, and one who was not ready stays not ready with the same reason, so nobody is offered calls
  they did not ask for.
- A supervisor may log an agent out in any state (`forced_by`); an agent logging itself out while on a
  call is refused.

Illegal transitions raise `IllegalTransition`: a bug in the core, never an input error (inputs are
checked before anything moves).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from softswitch.calls.models import IllegalTransition

__all__ = [
    "AGENT_TRANSITIONS",
    "OFFERABLE_STATES",
    "ON_CALL_STATES",
    "OUTBOUND_STATES",
    "Agent",
    "AgentState",
    "Device",
    "IllegalTransition",
]


class AgentState(enum.Enum):
    LOGGED_OUT = "logged_out"
    READY = "ready"
    NOT_READY = "not_ready"
    RESERVED = "reserved"
    RINGING = "ringing"
    BUSY = "busy"
    WRAP_UP = "wrap_up"
    OFFLINE = "offline"


S = AgentState

#: Every state change an agent may make. Logging out (forced by a supervisor) is possible from every
#: logged-in state; `not_ready -> not_ready` changes the reason.
AGENT_TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    S.LOGGED_OUT: frozenset({S.READY, S.NOT_READY, S.OFFLINE}),
    S.READY: frozenset({S.NOT_READY, S.RESERVED, S.BUSY, S.OFFLINE, S.LOGGED_OUT}),
    S.NOT_READY: frozenset({S.READY, S.NOT_READY, S.BUSY, S.OFFLINE, S.LOGGED_OUT}),
    S.RESERVED: frozenset({S.RINGING, S.BUSY, S.READY, S.NOT_READY, S.OFFLINE, S.LOGGED_OUT}),
    S.RINGING: frozenset({S.BUSY, S.READY, S.NOT_READY, S.OFFLINE, S.LOGGED_OUT}),
    S.BUSY: frozenset({S.WRAP_UP, S.READY, S.NOT_READY, S.OFFLINE, S.LOGGED_OUT}),
    S.WRAP_UP: frozenset({S.READY, S.NOT_READY, S.BUSY, S.OFFLINE, S.LOGGED_OUT}),
    S.OFFLINE: frozenset({S.READY, S.NOT_READY, S.LOGGED_OUT}),
}

#: States in which the agent has a call or an offer (a queue must not offer another one).
ON_CALL_STATES = frozenset({S.RESERVED, S.RINGING, S.BUSY})
#: States from which the agent may place an outbound call.
OUTBOUND_STATES = frozenset({S.READY, S.NOT_READY, S.WRAP_UP})
#: The only state in which a queue call is offered.
OFFERABLE_STATES = frozenset({S.READY})
#: States the agent returns to after wrap-up or after the device comes back.
RESTING_STATES = frozenset({S.READY, S.NOT_READY})

#: Device kinds whose availability follows a SIP registration (a WebRTC client registers too).
REGISTERED_DEVICE_KINDS = frozenset({"sip", "webrtc"})


@dataclass(frozen=True, slots=True)
class Device:
    """Where the agent takes calls: a SIP user (`sip`), a phone number through a trunk (`pstn`) or a
    browser client registered as a user (`webrtc`)."""

    kind: str  # "sip" | "pstn" | "webrtc"
    address: str

    @property
    def needs_registration(self) -> bool:
        return self.kind in REGISTERED_DEVICE_KINDS

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "address": self.address}


@dataclass(eq=False)
class Agent:
    """One agent: configuration it keeps, its state, its current call or offer, and its statistics."""

    id: str
    role: str = "agent"  # "agent" | "supervisor"
    queues: tuple[str, ...] = ()
    skills: dict[str, int] = field(default_factory=dict)
    wrap_up_s: int = 10
    auto_answer: bool = False
    team: frozenset[str] = frozenset()

    device: Device | None = None
    state: AgentState = AgentState.LOGGED_OUT
    reason: str | None = None
    since: float = 0.0
    logged_in_at: float | None = None
    wrap_up_deadline: float | None = None
    #: Where wrap-up ends (`ready`, or `not_ready` with `resume_reason`).
    resume_state: AgentState = AgentState.READY
    resume_reason: str | None = None
    #: The state to return to when the device registers again (while `offline`).
    return_state: AgentState = AgentState.READY
    return_reason: str | None = None
    #: The device went away during a call: go offline when the call ends.
    device_lost: bool = False

    #: The conversation the agent is offered, ringing for, or talking on.
    conversation_id: str | None = None
    #: The queue of the offer or call (None for outbound or direct calls).
    queue_id: str | None = None
    offer_deadline: float | None = None
    answered_at: float | None = None
    last_call_ended_at: float | None = None

    call_count: int = 0
    answered_count: int = 0
    talk_s: float = 0.0

    def move(self, state: AgentState, now: float, reason: str | None = None) -> AgentState:
        """Change state (the table decides); returns the previous state."""
        if state not in AGENT_TRANSITIONS[self.state]:
            raise IllegalTransition(f"agent {self.id}: {self.state.value} -> {state.value}")
        previous = self.state
        self.state = state
        self.reason = reason
        self.since = now
        if state is not AgentState.WRAP_UP:
            self.wrap_up_deadline = None
        return previous

    @property
    def logged_in(self) -> bool:
        return self.state is not AgentState.LOGGED_OUT

    @property
    def available(self) -> bool:
        """Logged in with a usable device (not `offline`)."""
        return self.state not in (AgentState.LOGGED_OUT, AgentState.OFFLINE)

    @property
    def is_supervisor(self) -> bool:
        return self.role == "supervisor"

    def idle_since(self) -> float:
        """When the agent last finished a call, or logged in: the key of `longest_idle`."""
        if self.last_call_ended_at is not None:
            return self.last_call_ended_at
        return self.logged_in_at if self.logged_in_at is not None else self.since

    def has_skills(self, required: dict[str, int]) -> bool:
        return all(self.skills.get(name, 0) >= level for name, level in required.items())

    def skill_score(self, required: dict[str, int]) -> int:
        """Sum of the agent's levels in the skills a queue requires (higher is better)."""
        return sum(self.skills.get(name, 0) for name in required)

    def reset_stats(self) -> None:
        self.call_count = 0
        self.answered_count = 0
        self.talk_s = 0.0

    def clear_call(self) -> None:
        self.conversation_id = None
        self.queue_id = None
        self.offer_deadline = None
        self.answered_at = None

    # -- persistence -----------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """The agent's dynamic state as JSON-able data (configuration is not included)."""
        return {
            "device": self.device.as_dict() if self.device else None,
            "state": self.state.value,
            "reason": self.reason,
            "since": self.since,
            "logged_in_at": self.logged_in_at,
            "wrap_up_deadline": self.wrap_up_deadline,
            "resume_state": self.resume_state.value,
            "resume_reason": self.resume_reason,
            "return_state": self.return_state.value,
            "return_reason": self.return_reason,
            "device_lost": self.device_lost,
            "conversation_id": self.conversation_id,
            "queue_id": self.queue_id,
            "offer_deadline": self.offer_deadline,
            "answered_at": self.answered_at,
            "last_call_ended_at": self.last_call_ended_at,
            "call_count": self.call_count,
            "answered_count": self.answered_count,
            "talk_s": self.talk_s,
        }

    def load(self, data: dict[str, Any]) -> None:
        """Restore what `dump` wrote (the state is set as saved: reconciliation comes after)."""
        device = data.get("device")
        self.device = Device(str(device["kind"]), str(device["address"])) if device else None
        self.state = AgentState(data["state"])
        self.reason = data.get("reason")
        self.since = float(data.get("since") or 0.0)
        self.logged_in_at = _opt_float(data.get("logged_in_at"))
        self.wrap_up_deadline = _opt_float(data.get("wrap_up_deadline"))
        self.resume_state = AgentState(data.get("resume_state", "ready"))
        self.resume_reason = data.get("resume_reason")
        self.return_state = AgentState(data.get("return_state", "ready"))
        self.return_reason = data.get("return_reason")
        self.device_lost = bool(data.get("device_lost", False))
        self.conversation_id = data.get("conversation_id")
        self.queue_id = data.get("queue_id")
        self.offer_deadline = _opt_float(data.get("offer_deadline"))
        self.answered_at = _opt_float(data.get("answered_at"))
        self.last_call_ended_at = _opt_float(data.get("last_call_ended_at"))
        self.call_count = int(data.get("call_count", 0))
        self.answered_count = int(data.get("answered_count", 0))
        self.talk_s = float(data.get("talk_s", 0.0))


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
