"""Typed, frozen events of the vocabulary in docs/events.md (EVENTS.md).

Each event names its `type` (the CloudEvents type) and its `subject` (the conversation, agent, queue or
device it is about). Call-control code publishes these on the bus; sinks turn them into MQTT messages,
webhooks and rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event."""

    type: ClassVar[str] = ""

    @property
    def subject(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class DeviceRegistered(Event):
    """A contact binding was added or refreshed for a user (RFC 3261 §10.3)."""

    type: ClassVar[str] = "device.registered"
    user: str
    contact: str
    transport: str
    expires: int
    user_agent: str
    source: str
    reason: str = "registered"  # "registered" (new binding) or "refreshed"

    @property
    def subject(self) -> str:
        return self.user


@dataclass(frozen=True, slots=True)
class DeviceUnregistered(Event):
    """A contact binding went away: removed by the phone, expired, or replaced."""

    type: ClassVar[str] = "device.unregistered"
    user: str
    contact: str
    transport: str
    reason: str  # "unregistered", "expired", "replaced"

    @property
    def subject(self) -> str:
        return self.user


# -- call events (EVENTS.md "Call events") -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallEvent(Event):
    """Fields every call event carries: which conversation and leg, and who talks to whom."""

    conversation_id: str
    call_id: str  # the leg
    sip_call_id: str
    direction: str  # "inbound" | "outbound" (seen from the softswitch)
    from_: str
    to: str
    role: str  # "caller" | "callee" | "agent" | "customer" | "supervisor" | "consult"
    user_data: str | None

    @property
    def subject(self) -> str:
        return self.conversation_id


@dataclass(frozen=True, slots=True)
class CallInitiated(CallEvent):
    type: ClassVar[str] = "call.initiated"
    user: str | None = None
    trunk: str | None = None


@dataclass(frozen=True, slots=True)
class CallRinging(CallEvent):
    type: ClassVar[str] = "call.ringing"
    early_media: bool = False


@dataclass(frozen=True, slots=True)
class CallAnswered(CallEvent):
    type: ClassVar[str] = "call.answered"
    answered_by: str = ""


@dataclass(frozen=True, slots=True)
class CallBridged(CallEvent):
    type: ClassVar[str] = "call.bridged"
    peer_call_id: str = ""


@dataclass(frozen=True, slots=True)
class CallUnbridged(CallEvent):
    type: ClassVar[str] = "call.unbridged"
    peer_call_id: str = ""


@dataclass(frozen=True, slots=True)
class CallEnded(CallEvent):
    type: ClassVar[str] = "call.ended"
    final_status: str = "completed"  # completed|busy|no_answer|rejected|canceled|failed|time_limit
    released_by: str = "remote"  # local|remote|system
    sip_code: int = 0
    cause: str = ""
    ring_s: float = 0.0
    talk_s: float = 0.0
    hold_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ConversationEnded(Event):
    type: ClassVar[str] = "conversation.ended"
    conversation_id: str
    legs: tuple[str, ...]
    duration_s: float
    final_status: str

    @property
    def subject(self) -> str:
        return self.conversation_id


@dataclass(frozen=True, slots=True)
class CdrCreated(Event):
    """A conversation's CDR was written: the full record (EVENTS.md `cdr.created`)."""

    type: ClassVar[str] = "cdr.created"
    conversation_id: str
    cdr: dict[str, object]

    @property
    def subject(self) -> str:
        return self.conversation_id
