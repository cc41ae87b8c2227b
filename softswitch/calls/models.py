"""Conversations and legs as explicit state machines (STYLE.md 5), owned by call control.

A conversation is what a person calls "a call": the legs that were bridged together over its life. A leg
is one SIP dialog between a media worker and a phone (or a trunk).
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug, not an input error."""


class LegState(enum.Enum):
    INITIATED = "initiated"  # inbound: INVITE received; outbound: INVITE sent
    RINGING = "ringing"  # 180 without media
    EARLY = "early"  # early media (183, or 180 with SDP)
    ANSWERED = "answered"  # 200 OK / ACK
    ENDED = "ended"


LEG_TRANSITIONS: dict[LegState, frozenset[LegState]] = {
    LegState.INITIATED: frozenset({LegState.RINGING, LegState.EARLY, LegState.ANSWERED, LegState.ENDED}),
    LegState.RINGING: frozenset({LegState.RINGING, LegState.EARLY, LegState.ANSWERED, LegState.ENDED}),
    LegState.EARLY: frozenset({LegState.RINGING, LegState.EARLY, LegState.ANSWERED, LegState.ENDED}),
    LegState.ANSWERED: frozenset({LegState.ENDED}),
    LegState.ENDED: frozenset(),
}


class ConversationState(enum.Enum):
    SETUP = "setup"  # the caller is waiting for someone to answer
    ACTIVE = "active"  # answered
    ENDED = "ended"


CONVERSATION_TRANSITIONS: dict[ConversationState, frozenset[ConversationState]] = {
    ConversationState.SETUP: frozenset({ConversationState.ACTIVE, ConversationState.ENDED}),
    ConversationState.ACTIVE: frozenset({ConversationState.ENDED}),
    ConversationState.ENDED: frozenset(),
}


def new_conversation_id() -> str:
    return "CV" + secrets.token_hex(12)


@dataclass(eq=False)
class Leg:
    """One leg; `id` is the media worker's leg id, `call_id` in events."""

    id: str
    worker_id: str
    conversation_id: str
    direction: str  # "inbound" | "outbound"
    role: str  # "caller" | "callee" | …
    from_: str
    to: str
    sip_call_id: str = ""
    user: str | None = None  # the registered user on the other end, if any
    state: LegState = LegState.INITIATED
    created_at: float = 0.0
    ring_at: float | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    sip_code: int = 0
    final_status: str = ""
    released_by: str = ""
    cause: str = ""
    peer: str | None = None  # the leg it is bridged with
    agent_id: str | None = None  # the agent on the leg's device (a queue offer, a transfer or a consult)
    direct_agent: bool = False  # the agent was called directly (transfer, consult), not offered a caller
    held: bool = False  # split from its peer and hearing music on hold (call.hold)
    room: str | None = None  # the conference room it is in (directly, or through a link)
    remote_held: bool = False  # its phone put the call on hold (sendonly/inactive re-INVITE)
    muted: bool = False  # its audio reaches no other party but a supervisor (call.mute)
    muted_from: set[str] = field(default_factory=set)  # the legs that heard it before call.mute
    detached: bool = False  # left the call on purpose (transfer, conference leave, a supervisor's leg):
    #                        its end ends nobody else

    def move(self, state: LegState) -> None:
        if state not in LEG_TRANSITIONS[self.state]:
            raise IllegalTransition(f"leg {self.id}: {self.state.value} -> {state.value}")
        self.state = state

    @property
    def offer(self) -> bool:
        """A leg offering a queue caller to an agent (or an agent's own outbound call)."""
        return self.agent_id is not None and not self.direct_agent

    @property
    def ended(self) -> bool:
        return self.state is LegState.ENDED

    def ring_seconds(self) -> float:
        if self.ring_at is None:
            return 0.0
        end = self.answered_at or self.ended_at or self.ring_at
        return max(0.0, end - self.ring_at)

    def talk_seconds(self) -> float:
        if self.answered_at is None or self.ended_at is None:
            return 0.0
        return max(0.0, self.ended_at - self.answered_at)


@dataclass(eq=False)
class Consult:
    """An attended transfer in progress (`call.consult`): `transferee` holds with music while
    `initiator` talks to `recipient`; it ends completed, cancelled, failed, or as a conference."""

    transfer_id: str
    initiator: str  # the agent's leg
    transferee: str  # the customer's leg, on hold
    recipient: str  # the consulted party's leg
    target: dict[str, str]
    answered: bool = False
    cancelled: bool = False  # call.consult_cancel asked for it


@dataclass(eq=False)
class Supervision:
    """A supervisor's leg on the call of an agent's leg, in `mode` (listen, whisper, barge)."""

    supervisor_id: str
    leg: str
    target: str  # the agent's leg
    mode: str
    started: bool = False  # the supervisor's phone answered


@dataclass(eq=False)
class CallRecording:
    """The conversation's recording: one mixed WAV file at `path` (`url` relative to the data dir)."""

    id: str
    path: str
    url: str
    started_at: float


@dataclass(eq=False)
class Room:
    """A conference room: its members (legs on its home worker, each with whether it joined muted) hear
    each other."""

    id: str
    worker_id: str
    members: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class PhoneTransfer:
    """A blind transfer a phone asked for with REFER: `transferor`'s party `transferee` goes to the leg
    the worker placed to `target`."""

    transfer_id: str
    transferor: str
    transferee: str
    target: dict[str, str]


@dataclass(frozen=True)
class RoomLink:
    """A link placed from a caller's worker to a room's home worker, until it arrives there."""

    room: str
    conversation_id: str
    caller: str
    muted: bool


@dataclass(eq=False)
class Conversation:
    """The legs of one call and how it went."""

    id: str
    worker_id: str
    created_at: float
    caller: str = ""
    callee: str = ""
    state: ConversationState = ConversationState.SETUP
    legs: dict[str, Leg] = field(default_factory=dict)
    answered_at: float | None = None
    ended_at: float | None = None
    final_status: str = ""
    max_duration_s: float | None = None
    queue_id: str | None = None  # the ACD queue the caller waits in (None once connected or routed away)
    a_leg: str | None = None  # the leg that started it: the inbound caller, or the agent of call.originate
    edges: set[tuple[str, str]] = field(default_factory=set)  # (listener, source): who hears whom now
    consult: Consult | None = None
    supervision: Supervision | None = None
    recording: CallRecording | None = None
    conference: set[str] = field(default_factory=set)  # the legs of a three-way call (call.conference)

    def move(self, state: ConversationState) -> None:
        if state not in CONVERSATION_TRANSITIONS[self.state]:
            raise IllegalTransition(f"conversation {self.id}: {self.state.value} -> {state.value}")
        self.state = state

    def live_legs(self) -> list[Leg]:
        return [leg for leg in self.legs.values() if not leg.ended]
