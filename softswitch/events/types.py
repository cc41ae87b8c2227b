"""Typed, frozen events of the vocabulary in docs/events.md (EVENTS.md).

Each event names its `type` (the CloudEvents type), its `subject` (the conversation, agent, queue or
device it is about) and the kind of that subject (`subject_kind`: the `seq` counter of the envelope runs
per kind and subject). Call-control code publishes these on the bus; sinks turn them into MQTT messages,
webhooks and rows.

Fields whose values form a documented set (EVENTS.md: `direction`, `role`, `final_status`, …) stay `str`
so that producers need no casts; each class lists those sets in `value_sets`, from which the JSON Schemas
of `softswitch.events.schemas` take their `enum`s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

#: `direction` of a leg, seen from the softswitch (EVENTS.md "Call events").
DIRECTIONS = ("inbound", "outbound")
#: `role` of a leg in its conversation.
ROLES = ("caller", "callee", "agent", "customer", "supervisor", "consult")
#: `final_status` of a leg or conversation (`call.ended`, `conversation.ended`, CDRs).
FINAL_STATUSES = ("completed", "busy", "no_answer", "rejected", "canceled", "failed", "time_limit")
#: `released_by` of `call.ended`: which side ended the leg.
RELEASED_BY = ("local", "remote", "system")
#: `reason` of `device.registered`: a new binding, or a known one registered again.
REGISTERED_REASONS = ("registered", "refreshed")
#: `reason` of `device.unregistered` (RFC 3261 §10.2.2 removal, §10.3 expiry, a replaced flow).
UNREGISTERED_REASONS = ("unregistered", "expired", "replaced")


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event."""

    type: ClassVar[str] = ""
    #: What `subject` names: "conversation", "device", "agent" or "queue".
    subject_kind: ClassVar[str] = ""
    #: Documented value sets of this event's string fields (field name -> allowed values).
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    @property
    def subject(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class DeviceRegistered(Event):
    """A contact binding was added or refreshed for a user (RFC 3261 §10.3)."""

    type: ClassVar[str] = "device.registered"
    subject_kind: ClassVar[str] = "device"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {"reason": REGISTERED_REASONS}
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
    subject_kind: ClassVar[str] = "device"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {"reason": UNREGISTERED_REASONS}
    user: str
    contact: str
    transport: str
    reason: str  # "unregistered", "expired", "replaced"

    @property
    def subject(self) -> str:
        return self.user


DTMF_METHODS: Final = ("rfc4733", "info")

# -- call events (EVENTS.md "Call events") -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallEvent(Event):
    """Fields every call event carries: which conversation and leg, and who talks to whom."""

    subject_kind: ClassVar[str] = "conversation"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {"direction": DIRECTIONS, "role": ROLES}

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
    """A leg was created: an INVITE arrived or was sent (RFC 3261 §13.2, §13.3)."""

    type: ClassVar[str] = "call.initiated"
    user: str | None = None
    trunk: str | None = None


@dataclass(frozen=True, slots=True)
class CallRinging(CallEvent):
    """The far end of a leg alerts: 180, or 183 with early media (RFC 3261 §13.2.2.1, RFC 3960)."""

    type: ClassVar[str] = "call.ringing"
    early_media: bool = False


@dataclass(frozen=True, slots=True)
class CallAnswered(CallEvent):
    """A leg was answered: 2xx to its INVITE (RFC 3261 §13.2.2.4)."""

    type: ClassVar[str] = "call.answered"
    answered_by: str = ""


@dataclass(frozen=True, slots=True)
class CallBridged(CallEvent):
    """A leg's media was joined to `peer_call_id`'s."""

    type: ClassVar[str] = "call.bridged"
    peer_call_id: str = ""


@dataclass(frozen=True, slots=True)
class CallUnbridged(CallEvent):
    """A leg's media was split from `peer_call_id`'s."""

    type: ClassVar[str] = "call.unbridged"
    peer_call_id: str = ""


HELD_BY: Final = ("local", "remote", "api")


@dataclass(frozen=True, slots=True)
class CallHeld(CallEvent):
    """A leg was put on hold: its peer is split from it and it hears music (`by`: who asked)."""

    type: ClassVar[str] = "call.held"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {**CallEvent.value_sets, "by": HELD_BY}
    by: str = "api"


@dataclass(frozen=True, slots=True)
class CallRetrieved(CallEvent):
    """A held leg was taken off hold and joined to its peer again."""

    type: ClassVar[str] = "call.retrieved"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {**CallEvent.value_sets, "by": HELD_BY}
    by: str = "api"


@dataclass(frozen=True, slots=True)
class CallMuted(CallEvent):
    """The leg's audio no longer reaches the other parties (a supervisor still hears it); it still hears."""

    type: ClassVar[str] = "call.muted"


@dataclass(frozen=True, slots=True)
class CallUnmuted(CallEvent):
    """The leg is heard again."""

    type: ClassVar[str] = "call.unmuted"


@dataclass(frozen=True, slots=True)
class CallDtmf(CallEvent):
    """A key pressed on a leg: an RFC 4733 telephone-event or a SIP INFO (application/dtmf-relay)."""

    type: ClassVar[str] = "call.dtmf"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {**CallEvent.value_sets, "method": DTMF_METHODS}
    digit: str = ""
    duration_ms: int = 0
    method: str = "rfc4733"  # rfc4733|info


@dataclass(frozen=True, slots=True)
class CallEnded(CallEvent):
    """A leg ended: BYE, CANCEL or a final non-2xx response (RFC 3261 §15, §9, §13.2.2.3)."""

    type: ClassVar[str] = "call.ended"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        **CallEvent.value_sets,
        "final_status": FINAL_STATUSES,
        "released_by": RELEASED_BY,
    }
    final_status: str = "completed"  # completed|busy|no_answer|rejected|canceled|failed|time_limit
    released_by: str = "remote"  # local|remote|system
    sip_code: int = 0
    cause: str = ""
    ring_s: float = 0.0
    talk_s: float = 0.0
    hold_s: float = 0.0


TRANSFER_FLOWS: Final = ("blind", "attended")


@dataclass(frozen=True, slots=True)
class TransferEvent(Event):
    """A transfer of `transferred_call` by `initiator_call` to `target` (EVENTS.md `transfer.*`)."""

    subject_kind: ClassVar[str] = "conversation"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {"flow": TRANSFER_FLOWS}
    conversation_id: str
    transfer_id: str
    flow: str
    transferred_call: str
    initiator_call: str
    recipient_call: str | None
    target: dict[str, str]

    @property
    def subject(self) -> str:
        return self.conversation_id


@dataclass(frozen=True, slots=True)
class TransferInitiated(TransferEvent):
    """A transfer was asked for."""

    type: ClassVar[str] = "transfer.initiated"


@dataclass(frozen=True, slots=True)
class TransferCompleted(TransferEvent):
    """The initiator is out of the call and the transferred party is on its way to the target (blind)."""

    type: ClassVar[str] = "transfer.completed"


@dataclass(frozen=True, slots=True)
class TransferAnswered(TransferEvent):
    """The consulted party answered (attended flow): initiator and recipient talk, the transferee holds."""

    type: ClassVar[str] = "transfer.answered"


@dataclass(frozen=True, slots=True)
class TransferCancelled(TransferEvent):
    """The initiator gave the consultation up (`call.consult_cancel`) and is back with the transferee."""

    type: ClassVar[str] = "transfer.cancelled"


@dataclass(frozen=True, slots=True)
class TransferFailed(TransferEvent):
    """The target did not answer, refused, or hung up before the transfer completed."""

    type: ClassVar[str] = "transfer.failed"
    reason: str = ""


PARTICIPANT_REASONS: Final = ("conference", "joined", "left", "hangup", "ended")


@dataclass(frozen=True, slots=True)
class ParticipantEvent(Event):
    """A leg joining or leaving a conference `room` (a dialplan room, or the conversation id of a
    three-way call)."""

    subject_kind: ClassVar[str] = "conversation"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {"role": ROLES, "reason": PARTICIPANT_REASONS}
    conversation_id: str
    call_id: str
    room: str
    role: str
    reason: str

    @property
    def subject(self) -> str:
        return self.conversation_id


@dataclass(frozen=True, slots=True)
class ParticipantJoined(ParticipantEvent):
    type: ClassVar[str] = "participant.joined"


@dataclass(frozen=True, slots=True)
class ParticipantLeft(ParticipantEvent):
    type: ClassVar[str] = "participant.left"


SUPERVISION_MODES: Final = ("listen", "whisper", "barge")


@dataclass(frozen=True, slots=True)
class SupervisionEvent(Event):
    """A supervisor (`supervisor_id`, on leg `supervisor_call`) on the call of `target_call` (the agent's
    leg) in `mode`: `listen` hears both, `whisper` is heard by the agent only, `barge` by everyone."""

    subject_kind: ClassVar[str] = "conversation"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {"mode": SUPERVISION_MODES}
    conversation_id: str
    supervisor_id: str
    supervisor_call: str
    target_call: str
    mode: str

    @property
    def subject(self) -> str:
        return self.conversation_id


@dataclass(frozen=True, slots=True)
class SupervisionStarted(SupervisionEvent):
    type: ClassVar[str] = "supervision.started"


@dataclass(frozen=True, slots=True)
class SupervisionModeChanged(SupervisionEvent):
    type: ClassVar[str] = "supervision.mode_changed"
    previous_mode: str = ""


@dataclass(frozen=True, slots=True)
class SupervisionEnded(SupervisionEvent):
    type: ClassVar[str] = "supervision.ended"


@dataclass(frozen=True, slots=True)
class RecordingEvent(Event):
    """A recording of the conversation: the mixed audio of its parties in one WAV file. `url` is the
    file's path under the node's data directory (`recordings/…`)."""

    subject_kind: ClassVar[str] = "conversation"
    conversation_id: str
    recording_id: str
    url: str
    duration_s: float = 0.0

    @property
    def subject(self) -> str:
        return self.conversation_id


@dataclass(frozen=True, slots=True)
class RecordingStarted(RecordingEvent):
    type: ClassVar[str] = "recording.started"


@dataclass(frozen=True, slots=True)
class RecordingStopped(RecordingEvent):
    type: ClassVar[str] = "recording.stopped"


@dataclass(frozen=True, slots=True)
class RecordingAvailable(RecordingEvent):
    """The file is closed and complete (its WAV header written): it can be fetched."""

    type: ClassVar[str] = "recording.available"
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ConversationEnded(Event):
    """Every leg of a conversation has ended; its CDR is complete after this (EVENTS.md)."""

    type: ClassVar[str] = "conversation.ended"
    subject_kind: ClassVar[str] = "conversation"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {"final_status": FINAL_STATUSES}
    conversation_id: str
    legs: tuple[str, ...]
    duration_s: float
    final_status: str

    @property
    def subject(self) -> str:
        return self.conversation_id


@dataclass(frozen=True, slots=True)
class CdrCreated(Event):
    """A conversation's CDR was written: the full record (EVENTS.md `cdr.created`).

    The last event of a conversation: its `seq` counter is dropped once this is published.
    """

    type: ClassVar[str] = "cdr.created"
    subject_kind: ClassVar[str] = "conversation"
    conversation_id: str
    cdr: dict[str, object]

    @property
    def subject(self) -> str:
        return self.conversation_id


# -- queue events on a conversation (EVENTS.md "Call events": `call.queued` / `call.dequeued`) ----------

#: `reason` of `call.queued`: how the caller came to the queue.
QUEUED_REASONS: Final = ("dialplan", "transfer")
#: `reason` of `call.dequeued`: why the caller left the queue.
DEQUEUED_REASONS: Final = ("answered", "abandoned", "left", "timeout", "no_agents")


@dataclass(frozen=True, slots=True)
class CallQueued(CallEvent):
    """A caller joined an ACD queue; `position` counts from 1 at the head of the queue."""

    type: ClassVar[str] = "call.queued"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {**CallEvent.value_sets, "reason": QUEUED_REASONS}
    queue_id: str = ""
    position: int = 0
    wait_s: float = 0.0
    reason: str = "dialplan"  # dialplan|transfer


@dataclass(frozen=True, slots=True)
class CallDequeued(CallEvent):
    """A caller left an ACD queue: answered by an agent, hung up, left by key, timed out or sent away."""

    type: ClassVar[str] = "call.dequeued"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {**CallEvent.value_sets, "reason": DEQUEUED_REASONS}
    queue_id: str = ""
    position: int = 0  # the position the caller held when leaving
    wait_s: float = 0.0
    reason: str = "answered"  # answered|abandoned|left|timeout|no_agents


# -- agent and queue events (EVENTS.md "Agent, queue and device events") --------------------------------

#: `state` of an agent (`agent.state_changed`, softswitch.cti.agents.AgentState).
AGENT_STATES: Final = (
    "logged_out",
    "ready",
    "not_ready",
    "reserved",
    "ringing",
    "busy",
    "wrap_up",
    "offline",
)
#: `device.kind` of an agent's device.
DEVICE_KINDS: Final = ("sip", "pstn", "webrtc")


@dataclass(frozen=True, slots=True)
class AgentEvent(Event):
    """Fields every agent event carries: the agent it is about (also the envelope's `subject`)."""

    subject_kind: ClassVar[str] = "agent"
    agent_id: str

    @property
    def subject(self) -> str:
        return self.agent_id


@dataclass(frozen=True, slots=True)
class AgentLoggedIn(AgentEvent):
    """An agent logged in on a device (`{"kind": "sip"|"pstn"|"webrtc", "address": …}`)."""

    type: ClassVar[str] = "agent.logged_in"
    device: dict[str, str]
    forced_by: str | None = None  # the supervisor who logged the agent in, if not the agent


@dataclass(frozen=True, slots=True)
class AgentLoggedOut(AgentEvent):
    """An agent logged out; `forced_by` names the supervisor who forced it (seed: forceOffline)."""

    type: ClassVar[str] = "agent.logged_out"
    device: dict[str, str]
    forced_by: str | None = None


@dataclass(frozen=True, slots=True)
class AgentStateChanged(AgentEvent):
    """An agent's state changed; times are RFC 3339 UTC like the envelope's `time`."""

    type: ClassVar[str] = "agent.state_changed"
    value_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "state": AGENT_STATES,
        "previous_state": AGENT_STATES,
    }
    state: str
    previous_state: str
    reason: str | None
    since: str
    wrap_up_deadline: str | None
    queues: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AgentOffered(AgentEvent):
    """A queue caller was offered to the agent: the agent is reserved and its device rings."""

    type: ClassVar[str] = "agent.offered"
    conversation_id: str
    queue_id: str


@dataclass(frozen=True, slots=True)
class AgentOfferMissed(AgentEvent):
    """An offer was not answered (ring timeout or rejected); `auto_not_ready`: the agent went not_ready."""

    type: ClassVar[str] = "agent.offer_missed"
    conversation_id: str
    queue_id: str
    auto_not_ready: bool


@dataclass(frozen=True, slots=True)
class AgentStats(AgentEvent):
    """The agent's counters since login (seed: realTimeData): calls handled, answered, talk seconds."""

    type: ClassVar[str] = "agent.stats"
    call_count: int
    answered_count: int
    talk_s: float


@dataclass(frozen=True, slots=True)
class QueueStats(Event):
    """A queue's live figures; `service_level` is the percentage answered within the queue's threshold."""

    type: ClassVar[str] = "queue.stats"
    subject_kind: ClassVar[str] = "queue"
    queue_id: str
    waiting: int
    longest_wait_s: float
    agents_ready: int
    agents_busy: int
    answered: int
    abandoned: int
    service_level: float | None  # null until a caller was answered or abandoned

    @property
    def subject(self) -> str:
        return self.queue_id
