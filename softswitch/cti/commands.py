"""One handler per CTI command of EVENTS.md, shared by the MQTT, WebSocket and REST transports.

`CommandHandlers.handle(command, body, actor, now)` validates the JSON body (pydantic; unknown fields
are refused with `invalid_argument` naming the field), checks that `actor` may act on the agent it names
(an agent on itself, a supervisor on its team, a trusted service on anyone), and then either

- changes agent state through `CtiCore` (`agent.*`): the result carries the reply and the core's
  `Outcome`; or
- for `call.*`, checks what the core knows (the agent is logged in, has a device, has a call where one
  is needed) and returns a typed `CallRequest` for the call layer to carry out. The result then has no
  reply yet: the call layer answers with `success(request, data)` or `failure(request, error)` once it
  has acted, so a reply always says what really happened.

A refused command never changes anything, and every refusal carries one of the stable codes of
`softswitch.cti.errors` (documented in docs/cti.md).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, model_validator

from softswitch.cti.agents import OUTBOUND_STATES, Agent, AgentState, Device
from softswitch.cti.core import CtiCore, Outcome
from softswitch.cti.errors import (
    AGENT_NOT_LOGGED_IN,
    AUTHENTICATION_FAILED,
    DEVICE_UNAVAILABLE,
    INVALID_ARGUMENT,
    INVALID_STATE,
    NO_ACTIVE_CALL,
    NOT_PERMITTED,
    OK,
    UNKNOWN_COMMAND,
    CommandError,
)

#: Longest `request_id` echoed back (it is the client's correlation key, not ours).
MAX_REQUEST_ID_LENGTH = 128
#: Longest `user_data` carried on an outbound call (the seed's userData: 256 bytes).
MAX_USER_DATA_LENGTH = 256
#: Most DTMF digits in one `call.send_dtmf` (a PIN or an extension, not a fax).
MAX_DTMF_DIGITS = 32

# A number to dial: digits with an optional leading "+", or a SIP user part.
_DIAL_RE = r"^[A-Za-z0-9*#+._~-]{1,64}$"
_PSTN_RE = re.compile(r"\+?[0-9]{3,20}")

Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]
DialString = Annotated[str, StringConstraints(pattern=_DIAL_RE)]


# -- who sends a command -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    """Who a transport authenticated: a trusted `service` (an MQTT backend, a REST API account), an
    `agent` (WebSocket or REST with the agent's own credentials), or `anonymous` (only `agent.login`
    with a password)."""

    kind: Literal["service", "agent", "anonymous"]
    agent_id: str | None = None

    @classmethod
    def service(cls) -> Actor:
        return cls("service")

    @classmethod
    def agent(cls, agent_id: str) -> Actor:
        return cls("agent", agent_id)

    @classmethod
    def anonymous(cls) -> Actor:
        return cls("anonymous")


# -- replies -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """`{"ok", "code", "message", "data", "request_id"}` (EVENTS.md "Commands")."""

    ok: bool
    code: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "code": self.code,
            "message": self.message,
            "data": self.data,
            "request_id": self.request_id,
        }

    @classmethod
    def error(cls, error: CommandError, request_id: str | None) -> Reply:
        return cls(False, error.code, error.message, {}, request_id)


# -- what the call layer is asked to do ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallRequest:
    """A validated, authorized `call.*` command. `agent_id`/`conversation_id` name the agent and its
    call when the command named an agent; `call_id` when a service named a leg directly. `by` is the
    agent id of the actor (a supervisor acting on a team member), or None for a service."""

    command: str
    request_id: str | None
    by: str | None
    agent_id: str | None
    conversation_id: str | None
    call_id: str | None


@dataclass(frozen=True, slots=True)
class CallControlRequest(CallRequest):
    """`call.answer`, `call.hangup`, `call.hold`, `call.retrieve`, `call.mute`, `call.unmute`,
    `call.transfer_complete`, `call.consult_cancel`, `call.conference`, `call.conference_leave`,
    `call.survey`: one operation on the agent's active call."""


@dataclass(frozen=True, slots=True)
class OriginateRequest(CallRequest):
    """`call.originate`: call the agent's `device` first, then `to` (caller id `caller_id` if given)."""

    device: Device | None = None
    to: str = ""
    caller_id: str | None = None
    user_data: str | None = None


@dataclass(frozen=True, slots=True)
class SendDtmfRequest(CallRequest):
    """`call.send_dtmf`: play `digits` to the far end (RFC 4733)."""

    digits: str = ""


@dataclass(frozen=True, slots=True)
class TransferRequest(CallRequest):
    """`call.transfer` (blind) or `call.consult` (attended, first step) to `target`; `target_device` is
    the device of a target agent (logged in and ready)."""

    target_kind: str = ""
    target_id: str = ""
    target_device: Device | None = None


@dataclass(frozen=True, slots=True)
class MonitorRequest(CallRequest):
    """`call.monitor`: the supervisor (`by`, device `supervisor_device`) joins the agent's call."""

    mode: str = "listen"
    supervisor_device: Device | None = None


@dataclass(frozen=True, slots=True)
class RecordRequest(CallRequest):
    """`call.record`: start or stop recording the agent's call."""

    action: str = "start"


@dataclass
class CommandResult:
    """A handled command: the reply (None while a `call.*` request awaits the call layer), the core's
    outcome (events, timers, actions) and the request for the call layer, if any."""

    reply: Reply | None
    outcome: Outcome = field(default_factory=Outcome)
    request: CallRequest | None = None


def success(request: CallRequest, data: Mapping[str, Any] | None = None) -> Reply:
    """The reply once the call layer carried out `request`."""
    return Reply(True, OK, f"{request.command} done", dict(data or {}), request.request_id)


def failure(request: CallRequest, error: CommandError) -> Reply:
    """The reply when the call layer could not carry out `request`."""
    return Reply.error(error, request.request_id)


# -- bodies ------------------------------------------------------------------------------------------


class _Body(BaseModel):
    """Every body: unknown fields refused, no type coercion; `request_id` and `reply_to` allowed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    request_id: Annotated[str, StringConstraints(max_length=MAX_REQUEST_ID_LENGTH)] | None = None
    reply_to: str | None = None


class DeviceBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: Literal["sip", "pstn", "webrtc"]
    address: Annotated[str, StringConstraints(min_length=1, max_length=64)]

    @model_validator(mode="after")
    def _check_address(self) -> DeviceBody:
        if self.kind == "pstn" and not _PSTN_RE.fullmatch(self.address):
            raise ValueError("address: a PSTN device is a phone number such as +8613800000000")
        if self.kind != "pstn" and not re.fullmatch(r"[A-Za-z0-9._~+-]+", self.address):
            raise ValueError("address: expected a user name such as 1001")
        return self


class LoginBody(_Body):
    agent_id: Id
    password: str | None = None
    device: DeviceBody | None = None
    state: Literal["ready", "not_ready"] | None = None
    reason: str | None = None


class AgentBody(_Body):
    agent_id: Id


class SetStateBody(_Body):
    agent_id: Id
    state: Literal["ready", "not_ready"]
    reason: str | None = None


class OriginateBody(_Body):
    agent_id: Id
    to: DialString
    caller_id: DialString | None = None
    user_data: Annotated[str, StringConstraints(max_length=MAX_USER_DATA_LENGTH)] | None = None


class CallTargetBody(_Body):
    """`agent_id` (the agent's active call) or `call_id` (a leg), exactly one."""

    agent_id: Id | None = None
    call_id: Id | None = None

    @model_validator(mode="after")
    def _one_of(self) -> CallTargetBody:
        if (self.agent_id is None) == (self.call_id is None):
            raise ValueError("agent_id: give agent_id or call_id (exactly one)")
        return self


class DtmfBody(CallTargetBody):
    digits: Annotated[str, StringConstraints(pattern=rf"^[0-9*#A-Da-d]{{1,{MAX_DTMF_DIGITS}}}$")]


class TargetBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: Literal["agent", "user", "external", "queue", "ivr"]
    id: DialString


class TransferBody(CallTargetBody):
    target: TargetBody


class ConsultBody(_Body):
    agent_id: Id
    target: TargetBody


class MonitorBody(_Body):
    supervisor_id: Id
    agent_id: Id
    mode: Literal["listen", "whisper", "barge"]


class RecordBody(CallTargetBody):
    action: Literal["start", "stop"]


_B = TypeVar("_B", bound=BaseModel)


def _describe(error: ValidationError) -> str:
    """The first problem of a body as `field.path: reason`."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown field"
    if first["type"] == "missing":
        return f"{loc}: required"
    if ":" in message.split(" ", 1)[0]:  # our own validators already name the field
        return message
    return f"{loc}: {message}" if loc else message


# -- the handlers --------------------------------------------------------------------------------------

#: Commands on the agent's active call, with what the call must be: "call" (busy) or "offer"
#: (ringing, for answering) or "any" (hang up also rejects an offer).
_CALL_CONTROL = {
    "call.answer": "offer",
    "call.hangup": "any",
    "call.hold": "call",
    "call.retrieve": "call",
    "call.mute": "call",
    "call.unmute": "call",
    "call.transfer_complete": "call",
    "call.consult_cancel": "call",
    "call.conference": "call",
    "call.conference_leave": "call",
    "call.survey": "call",
}
#: Commands that must name an agent (not a bare leg).
_AGENT_ONLY = frozenset(
    {"call.transfer_complete", "call.consult_cancel", "call.conference", "call.conference_leave"}
)


class CommandHandlers:
    """The command vocabulary of EVENTS.md over one `CtiCore`."""

    def __init__(self, core: CtiCore) -> None:
        self.core = core
        self._handlers: dict[str, Callable[[str, Mapping[str, Any], Actor, float], CommandResult]] = {
            "agent.login": self._login,
            "agent.logout": self._logout,
            "agent.set_state": self._set_state,
            "agent.get_state": self._get_state,
            "call.originate": self._originate,
            "call.send_dtmf": self._send_dtmf,
            "call.transfer": self._transfer,
            "call.consult": self._consult,
            "call.monitor": self._monitor,
            "call.record": self._record,
            **{name: self._call_control for name in _CALL_CONTROL},
        }

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    def handle(self, command: str, body: Any, actor: Actor, now: float) -> CommandResult:
        """Run one command; never raises for a bad command (the reply says what was wrong)."""
        request_id = _request_id(body)
        try:
            handler = self._handlers.get(command)
            if handler is None:
                raise CommandError(UNKNOWN_COMMAND, f"no command {command!r}")
            if not isinstance(body, Mapping):
                raise CommandError(INVALID_ARGUMENT, "body: expected a JSON object")
            return handler(command, body, actor, now)
        except CommandError as error:
            return CommandResult(Reply.error(error, request_id))

    # -- agent.* -------------------------------------------------------------------------------------

    def _login(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(LoginBody, raw)
        config = self.core.agent_configs.get(body.agent_id)
        self.core.agent(body.agent_id)  # unknown_agent before anything else
        assert config is not None
        trusted = self._may_act(actor, body.agent_id)
        if body.password is not None:
            if not hmac.compare_digest(body.password.encode(), config.password.encode()):
                raise CommandError(AUTHENTICATION_FAILED, f"wrong password for agent {body.agent_id}")
        elif not trusted:
            raise CommandError(AUTHENTICATION_FAILED, "password: required")
        if actor.kind == "agent" and not trusted:
            raise CommandError(NOT_PERMITTED, f"agent {actor.agent_id} may not log in agent {body.agent_id}")
        device = Device(body.device.kind, body.device.address) if body.device else None
        outcome = self.core.login(
            body.agent_id,
            now,
            device=device,
            state=body.state,
            reason=body.reason,
            forced_by=self._forced_by(actor, body.agent_id),
        )
        return self._agent_reply(command, body.agent_id, body.request_id, now, outcome)

    def _logout(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(AgentBody, raw)
        self._authorize(actor, body.agent_id)
        outcome = self.core.logout(body.agent_id, now, forced_by=self._forced_by(actor, body.agent_id))
        return self._agent_reply(command, body.agent_id, body.request_id, now, outcome)

    def _set_state(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(SetStateBody, raw)
        self._authorize(actor, body.agent_id)
        outcome = self.core.set_state(body.agent_id, body.state, now, reason=body.reason)
        return self._agent_reply(command, body.agent_id, body.request_id, now, outcome)

    def _get_state(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(AgentBody, raw)
        self._authorize(actor, body.agent_id)
        return self._agent_reply(command, body.agent_id, body.request_id, now, Outcome())

    def _agent_reply(
        self, command: str, agent_id: str, request_id: str | None, now: float, outcome: Outcome
    ) -> CommandResult:
        data = self.core.state_data(agent_id, now)
        return CommandResult(Reply(True, OK, f"{command} done", data, request_id), outcome)

    # -- call.* --------------------------------------------------------------------------------------

    def _originate(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(OriginateBody, raw)
        by = self._authorize(actor, body.agent_id)
        agent = self._logged_in(body.agent_id)
        if agent.state not in OUTBOUND_STATES:
            raise CommandError(
                INVALID_STATE,
                f"agent {agent.id} is {agent.state.value}: outbound calls need ready, not_ready or wrap_up",
            )
        request = OriginateRequest(
            command, body.request_id, by, agent.id, None, None, agent.device, body.to, body.caller_id,
            body.user_data,
        )  # fmt: skip
        return CommandResult(None, Outcome(), request)

    def _call_control(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(CallTargetBody, raw)
        by, agent_id, conversation_id = self._call_target(command, body, actor, _CALL_CONTROL[command])
        request = CallControlRequest(command, body.request_id, by, agent_id, conversation_id, body.call_id)
        return CommandResult(None, Outcome(), request)

    def _send_dtmf(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(DtmfBody, raw)
        by, agent_id, conversation_id = self._call_target(command, body, actor, "call")
        request = SendDtmfRequest(
            command, body.request_id, by, agent_id, conversation_id, body.call_id, body.digits.upper()
        )
        return CommandResult(None, Outcome(), request)

    def _transfer(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(TransferBody, raw)
        by, agent_id, conversation_id = self._call_target(command, body, actor, "call")
        device = self._check_target(body.target)
        request = TransferRequest(
            command, body.request_id, by, agent_id, conversation_id, body.call_id, body.target.kind,
            body.target.id, device,
        )  # fmt: skip
        return CommandResult(None, Outcome(), request)

    def _consult(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(ConsultBody, raw)
        target = CallTargetBody(agent_id=body.agent_id, request_id=body.request_id)
        by, agent_id, conversation_id = self._call_target(command, target, actor, "call")
        device = self._check_target(body.target)
        request = TransferRequest(
            command, body.request_id, by, agent_id, conversation_id, None, body.target.kind, body.target.id,
            device,
        )  # fmt: skip
        return CommandResult(None, Outcome(), request)

    def _monitor(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(MonitorBody, raw)
        supervisor = self.core.agent(body.supervisor_id)
        agent = self.core.agent(body.agent_id)
        if actor.kind != "service" and actor.agent_id != supervisor.id:
            raise CommandError(NOT_PERMITTED, f"only {supervisor.id} may monitor as {supervisor.id}")
        if not supervisor.is_supervisor or agent.id not in supervisor.team:
            raise CommandError(NOT_PERMITTED, f"{supervisor.id} does not supervise agent {agent.id}")
        supervising = self._logged_in(supervisor.id)
        target = self._logged_in(agent.id, check_device=False)
        if target.state is not AgentState.BUSY or target.conversation_id is None:
            raise CommandError(NO_ACTIVE_CALL, f"agent {agent.id} has no call ({target.state.value})")
        request = MonitorRequest(
            command, body.request_id, supervisor.id, agent.id, target.conversation_id, None, body.mode,
            supervising.device,
        )  # fmt: skip
        return CommandResult(None, Outcome(), request)

    def _record(self, command: str, raw: Mapping[str, Any], actor: Actor, now: float) -> CommandResult:
        body = _parse(RecordBody, raw)
        by, agent_id, conversation_id = self._call_target(command, body, actor, "call")
        request = RecordRequest(
            command, body.request_id, by, agent_id, conversation_id, body.call_id, body.action
        )
        return CommandResult(None, Outcome(), request)

    # -- checks --------------------------------------------------------------------------------------

    def _may_act(self, actor: Actor, agent_id: str) -> bool:
        if actor.kind == "service":
            return True
        if actor.kind != "agent" or actor.agent_id is None:
            return False
        if actor.agent_id == agent_id:
            return True
        try:
            acting = self.core.agent(actor.agent_id)
        except CommandError:
            return False
        return acting.is_supervisor and agent_id in acting.team

    def _authorize(self, actor: Actor, agent_id: str) -> str | None:
        """Check that `actor` may act on `agent_id` (known); returns the acting agent id (None: service)."""
        self.core.agent(agent_id)
        if not self._may_act(actor, agent_id):
            who = actor.agent_id if actor.kind == "agent" else actor.kind
            raise CommandError(NOT_PERMITTED, f"{who} may not act on agent {agent_id}")
        return actor.agent_id if actor.kind == "agent" else None

    @staticmethod
    def _forced_by(actor: Actor, agent_id: str) -> str | None:
        return actor.agent_id if actor.kind == "agent" and actor.agent_id != agent_id else None

    def _logged_in(self, agent_id: str, *, check_device: bool = True) -> Agent:
        agent = self.core.agent(agent_id)
        if not agent.logged_in:
            raise CommandError(AGENT_NOT_LOGGED_IN, f"agent {agent_id} is not logged in")
        if check_device and agent.state is AgentState.OFFLINE:
            raise CommandError(
                DEVICE_UNAVAILABLE, f"agent {agent_id} is offline: its device is not registered"
            )
        return agent

    def _call_target(
        self, command: str, body: CallTargetBody, actor: Actor, needs: str
    ) -> tuple[str | None, str | None, str | None]:
        """(by, agent_id, conversation_id) of a command on an agent's call or on a leg."""
        if body.call_id is not None:
            if command in _AGENT_ONLY:
                raise CommandError(
                    INVALID_ARGUMENT, "agent_id: required (this command acts on an agent's call)"
                )
            if actor.kind != "service":
                raise CommandError(
                    NOT_PERMITTED, "call_id: only a service may name a leg; agents name agent_id"
                )
            return None, None, None
        assert body.agent_id is not None
        by = self._authorize(actor, body.agent_id)
        agent = self._logged_in(body.agent_id, check_device=False)
        if needs == "offer":
            if agent.state not in (AgentState.RESERVED, AgentState.RINGING):
                raise CommandError(
                    INVALID_STATE, f"agent {agent.id} has no offer ringing ({agent.state.value})"
                )
        elif needs == "any":
            if agent.conversation_id is None:
                raise CommandError(NO_ACTIVE_CALL, f"agent {agent.id} has no call ({agent.state.value})")
        elif agent.state is not AgentState.BUSY or agent.conversation_id is None:
            raise CommandError(NO_ACTIVE_CALL, f"agent {agent.id} has no call ({agent.state.value})")
        return by, agent.id, agent.conversation_id

    def _check_target(self, target: TargetBody) -> Device | None:
        """A transfer or consult target that exists; for an agent, its device (the agent must be logged
        in and ready: a transfer does not wait for a busy agent, a queue does)."""
        if target.kind == "agent":
            agent = self._logged_in(target.id)
            if agent.state is not AgentState.READY:
                raise CommandError(INVALID_STATE, f"agent {agent.id} is {agent.state.value}, not ready")
            return agent.device
        if target.kind == "queue":
            self.core.queue(target.id)
        return None


def _parse(model: type[_B], raw: Mapping[str, Any]) -> _B:
    try:
        return model.model_validate(dict(raw))
    except ValidationError as error:
        raise CommandError(INVALID_ARGUMENT, _describe(error)) from None


def _request_id(body: Any) -> str | None:
    if isinstance(body, Mapping):
        value = body.get("request_id")
        if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_LENGTH:
            return value
    return None


__all__ = [
    "Actor",
    "CallControlRequest",
    "CallRequest",
    "CommandHandlers",
    "CommandResult",
    "MonitorRequest",
    "OriginateRequest",
    "RecordRequest",
    "Reply",
    "SendDtmfRequest",
    "TransferRequest",
    "failure",
    "success",
]
