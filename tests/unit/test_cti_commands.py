"""The command handlers: body validation, authorization, every reply code, call.* requests."""

from __future__ import annotations

import random
from typing import Any

import pytest

from softswitch.config import AgentConfig, QueueConfig
from softswitch.cti.commands import (
    Actor,
    CallControlRequest,
    CommandHandlers,
    CommandResult,
    MonitorRequest,
    OriginateRequest,
    RecordRequest,
    Reply,
    SendDtmfRequest,
    TransferRequest,
    failure,
    success,
)
from softswitch.cti.core import CtiCore
from softswitch.cti.errors import REPLY_CODES, CommandError
from softswitch.cti.queues import QueuedCall
from softswitch.events.types import AgentLoggedIn, AgentLoggedOut

T0 = 1_000.0
SERVICE = Actor.service()


def make() -> CommandHandlers:
    agents = [
        AgentConfig(id="8001", password="pw8001", extension="1001", queues=["support"]),
        AgentConfig(id="8002", password="pw8002", extension="1002", queues=["support"]),
        AgentConfig(id="8003", password="pw8003", extension="1003"),
        AgentConfig(id="9001", password="pw9001", extension="1005", role="supervisor", team=["8001", "8002"]),
    ]
    core = CtiCore(
        agents, [QueueConfig(id="support")], users=["1001", "1002", "1003", "1005"], rng=random.Random(1)
    )
    for user in ("1001", "1002", "1003", "1005"):
        core.device_registered(user, T0)
    return CommandHandlers(core)


@pytest.fixture
def handlers() -> CommandHandlers:
    return make()


def run(handlers: CommandHandlers, command: str, body: Any, actor: Actor = SERVICE) -> CommandResult:
    return handlers.handle(command, body, actor, T0)


def code(result: CommandResult) -> str:
    assert result.reply is not None
    return result.reply.code


def login(handlers: CommandHandlers, agent_id: str) -> None:
    result = run(handlers, "agent.login", {"agent_id": agent_id})
    assert code(result) == "ok", result.reply


def busy(handlers: CommandHandlers, agent_id: str, conversation: str = "CVO") -> None:
    handlers.core.agent_call_started(agent_id, conversation, T0)


# -- validation --------------------------------------------------------------------------------------


def test_every_events_md_command_has_a_handler(handlers: CommandHandlers) -> None:
    assert set(handlers.commands) == {
        "agent.login",
        "agent.logout",
        "agent.set_state",
        "agent.get_state",
        "call.originate",
        "call.answer",
        "call.hangup",
        "call.hold",
        "call.retrieve",
        "call.mute",
        "call.unmute",
        "call.send_dtmf",
        "call.transfer",
        "call.consult",
        "call.transfer_complete",
        "call.consult_cancel",
        "call.conference",
        "call.conference_leave",
        "call.monitor",
        "call.survey",
        "call.record",
    }


@pytest.mark.parametrize(
    ("command", "body", "expected"),
    [
        ("agent.login", {"agent_id": "8001", "surprise": 1}, "surprise: unknown field"),
        ("agent.login", {"password": "x"}, "agent_id: required"),
        ("agent.login", {"agent_id": 8001}, "agent_id: Input should be a valid string"),
        ("agent.login", {"agent_id": "8001", "device": {"kind": "fax", "address": "1"}}, "device.kind:"),
        (
            "agent.login",
            {"agent_id": "8001", "device": {"kind": "pstn", "address": "abc"}},
            "address: a PSTN",
        ),
        (
            "agent.login",
            {"agent_id": "8001", "device": {"kind": "sip", "address": "a b"}},
            "address: expected",
        ),
        ("agent.login", {"agent_id": "8001", "device": {"kind": "sip", "address": "1", "x": 1}}, "device.x:"),
        ("agent.set_state", {"agent_id": "8001", "state": "busy"}, "state:"),
        ("agent.set_state", {"agent_id": "8001"}, "state: required"),
        ("call.hangup", {}, "agent_id: give agent_id or call_id"),
        ("call.hangup", {"agent_id": "8001", "call_id": "CA1"}, "agent_id: give agent_id or call_id"),
        ("call.send_dtmf", {"agent_id": "8001", "digits": "12x"}, "digits:"),
        ("call.transfer", {"agent_id": "8001", "target": {"kind": "moon", "id": "1"}}, "target.kind:"),
        ("call.monitor", {"supervisor_id": "9001", "agent_id": "8001", "mode": "spy"}, "mode:"),
        ("call.originate", {"agent_id": "8001", "to": ""}, "to:"),
        ("call.record", {"agent_id": "8001", "action": "pause"}, "action:"),
    ],
)
def test_invalid_bodies_name_the_field(
    handlers: CommandHandlers, command: str, body: Any, expected: str
) -> None:
    result = run(handlers, command, {**body, "request_id": "r-1"})
    assert result.reply is not None
    assert (result.reply.ok, result.reply.code, result.reply.request_id) == (False, "invalid_argument", "r-1")
    assert result.reply.message.startswith(expected), result.reply.message
    assert result.outcome.events == [] and result.request is None


def test_body_must_be_an_object_and_command_must_exist(handlers: CommandHandlers) -> None:
    assert code(run(handlers, "agent.login", ["8001"])) == "invalid_argument"
    result = run(handlers, "agent.dance", {"request_id": "r-2"})
    assert result.reply == Reply(False, "unknown_command", "no command 'agent.dance'", {}, "r-2")
    assert result.reply.as_dict() == {
        "ok": False,
        "code": "unknown_command",
        "message": "no command 'agent.dance'",
        "data": {},
        "request_id": "r-2",
    }


def test_reply_to_and_request_id_are_accepted_everywhere(handlers: CommandHandlers) -> None:
    body = {"agent_id": "8001", "request_id": "r-3", "reply_to": "app/replies"}
    result = run(handlers, "agent.get_state", body)
    assert result.reply is not None and result.reply.ok and result.reply.request_id == "r-3"
    assert result.reply.data["state"] == "logged_out"


# -- agent.* ---------------------------------------------------------------------------------------


def test_login_with_password_and_reply_data(handlers: CommandHandlers) -> None:
    body = {
        "agent_id": "8001",
        "password": "pw8001",
        "state": "not_ready",
        "reason": "break",
        "request_id": "r",
    }
    result = run(handlers, "agent.login", body, Actor.anonymous())
    assert result.reply is not None and result.reply.ok
    assert result.reply.data["state"] == "not_ready" and result.reply.data["reason"] == "break"
    assert result.reply.data["device"] == {"kind": "sip", "address": "1001"}
    assert result.outcome.events_of(AgentLoggedIn)[0].forced_by is None


@pytest.mark.parametrize(
    ("body", "actor", "expected"),
    [
        ({"agent_id": "8001", "password": "nope"}, Actor.anonymous(), "authentication_failed"),
        ({"agent_id": "8001"}, Actor.anonymous(), "authentication_failed"),
        ({"agent_id": "8001", "password": "nope"}, SERVICE, "authentication_failed"),
        ({"agent_id": "8001", "password": "pw8001"}, Actor.agent("8002"), "not_permitted"),
        ({"agent_id": "8009"}, SERVICE, "unknown_agent"),
        ({"agent_id": "8001", "device": {"kind": "sip", "address": "1004"}}, SERVICE, "device_unavailable"),
        (
            {"agent_id": "8001", "device": {"kind": "pstn", "address": "+8613800000000"}},
            SERVICE,
            "device_unavailable",
        ),
        ({"agent_id": "8001", "state": "not_ready", "reason": "nap"}, SERVICE, "invalid_argument"),
    ],
)
def test_login_refusals(handlers: CommandHandlers, body: dict[str, Any], actor: Actor, expected: str) -> None:
    result = run(handlers, "agent.login", body, actor)
    assert code(result) == expected
    assert result.outcome.events == []


def test_supervisor_logs_a_team_member_in_and_out_with_forced_by(handlers: CommandHandlers) -> None:
    supervisor = Actor.agent("9001")
    result = run(handlers, "agent.login", {"agent_id": "8001"}, supervisor)
    assert result.outcome.events_of(AgentLoggedIn)[0].forced_by == "9001"
    assert code(run(handlers, "agent.login", {"agent_id": "8001"}, supervisor)) == "already_logged_in"
    busy(handlers, "8001")
    assert code(run(handlers, "agent.logout", {"agent_id": "8001"}, Actor.agent("8001"))) == "invalid_state"
    result = run(handlers, "agent.logout", {"agent_id": "8001"}, supervisor)
    assert result.outcome.events_of(AgentLoggedOut)[0].forced_by == "9001"
    # Outside the team: refused, logged in or not.
    assert code(run(handlers, "agent.login", {"agent_id": "8003"}, supervisor)) == "authentication_failed"
    login(handlers, "8003")
    assert code(run(handlers, "agent.logout", {"agent_id": "8003"}, supervisor)) == "not_permitted"


def test_agent_acts_on_itself_only(handlers: CommandHandlers) -> None:
    login(handlers, "8001")
    login(handlers, "8002")
    me = Actor.agent("8001")
    result = run(
        handlers, "agent.set_state", {"agent_id": "8001", "state": "not_ready", "reason": "lunch"}, me
    )
    assert result.reply is not None and result.reply.data["reason"] == "lunch"
    for command in ("agent.set_state", "agent.logout", "agent.get_state"):
        body: dict[str, Any] = {"agent_id": "8002"}
        if command == "agent.set_state":
            body["state"] = "ready"
        assert code(run(handlers, command, body, me)) == "not_permitted"
    assert code(run(handlers, "agent.get_state", {"agent_id": "8001"}, Actor.anonymous())) == "not_permitted"
    assert (
        code(run(handlers, "agent.get_state", {"agent_id": "8001"}, Actor.agent("ghost"))) == "not_permitted"
    )
    assert code(run(handlers, "agent.logout", {"agent_id": "8001"}, me)) == "ok"
    assert code(run(handlers, "agent.logout", {"agent_id": "8001"}, me)) == "agent_not_logged_in"
    assert (
        code(run(handlers, "agent.set_state", {"agent_id": "8001", "state": "ready"}, me))
        == "agent_not_logged_in"
    )


# -- call.* ----------------------------------------------------------------------------------------


def test_originate(handlers: CommandHandlers) -> None:
    body = {"agent_id": "8001", "to": "+8613800000000", "caller_id": "01080001001", "user_data": "o-1"}
    assert code(run(handlers, "call.originate", body)) == "agent_not_logged_in"
    login(handlers, "8001")
    handlers.core.set_state("8001", "not_ready", T0)  # outbound allowed while not ready
    result = run(handlers, "call.originate", {**body, "request_id": "r-9"}, Actor.agent("8001"))
    assert result.reply is None
    assert isinstance(result.request, OriginateRequest)
    assert (result.request.to, result.request.caller_id, result.request.user_data) == (
        "+8613800000000",
        "01080001001",
        "o-1",
    )
    assert result.request.device is not None and result.request.device.address == "1001"
    assert success(result.request, {"conversation_id": "CV1"}) == Reply(
        True, "ok", "call.originate done", {"conversation_id": "CV1"}, "r-9"
    )
    assert (
        failure(result.request, CommandError("device_unavailable", "no answer")).code == "device_unavailable"
    )
    busy(handlers, "8001")
    assert code(run(handlers, "call.originate", body)) == "invalid_state"
    handlers.core.device_unregistered("1002", T0)
    login(handlers, "8002")
    assert code(run(handlers, "call.originate", {**body, "agent_id": "8002"})) == "device_unavailable"


@pytest.mark.parametrize(
    "command",
    [
        "call.hangup",
        "call.hold",
        "call.retrieve",
        "call.mute",
        "call.unmute",
        "call.transfer_complete",
        "call.consult_cancel",
        "call.conference",
        "call.conference_leave",
        "call.survey",
    ],
)
def test_call_control_needs_an_active_call(handlers: CommandHandlers, command: str) -> None:
    assert code(run(handlers, command, {"agent_id": "8001"})) == "agent_not_logged_in"
    login(handlers, "8001")
    assert code(run(handlers, command, {"agent_id": "8001"})) == "no_active_call"
    busy(handlers, "8001", "CV7")
    result = run(handlers, command, {"agent_id": "8001", "request_id": "r"}, Actor.agent("8001"))
    assert result.request == CallControlRequest(command, "r", "8001", "8001", "CV7", None)
    assert code(run(handlers, command, {"agent_id": "8001"}, Actor.agent("8002"))) == "not_permitted"
    # A supervisor may act on a team member's call (force-release with call.hangup).
    result = run(handlers, command, {"agent_id": "8001"}, Actor.agent("9001"))
    assert result.request is not None and result.request.by == "9001"


def test_call_id_is_for_services(handlers: CommandHandlers) -> None:
    result = run(handlers, "call.hold", {"call_id": "CA1"})
    assert result.request == CallControlRequest("call.hold", None, None, None, None, "CA1")
    assert code(run(handlers, "call.hold", {"call_id": "CA1"}, Actor.agent("8001"))) == "not_permitted"
    assert code(run(handlers, "call.conference", {"call_id": "CA1"})) == "invalid_argument"


def test_answer_needs_an_offer(handlers: CommandHandlers) -> None:
    login(handlers, "8001")
    assert code(run(handlers, "call.answer", {"agent_id": "8001"})) == "invalid_state"
    handlers.core.call_queued("support", QueuedCall("CV1", "CA1"), T0)
    result = run(handlers, "call.answer", {"agent_id": "8001"})
    assert result.request == CallControlRequest("call.answer", None, None, "8001", "CV1", None)
    # Hanging up while the offer rings rejects it.
    assert run(handlers, "call.hangup", {"agent_id": "8001"}).request is not None


def test_dtmf_transfer_consult_record(handlers: CommandHandlers) -> None:
    login(handlers, "8001")
    busy(handlers, "8001", "CV7")
    dtmf = run(handlers, "call.send_dtmf", {"agent_id": "8001", "digits": "12#a"}).request
    assert isinstance(dtmf, SendDtmfRequest) and dtmf.digits == "12#A"
    transfer = run(
        handlers, "call.transfer", {"agent_id": "8001", "target": {"kind": "queue", "id": "support"}}
    )
    assert isinstance(transfer.request, TransferRequest)
    assert (transfer.request.target_kind, transfer.request.target_id, transfer.request.conversation_id) == (
        "queue",
        "support",
        "CV7",
    )
    bad_queue = {"agent_id": "8001", "target": {"kind": "queue", "id": "nope"}}
    assert code(run(handlers, "call.transfer", bad_queue)) == "unknown_queue"
    bad_agent = {"agent_id": "8001", "target": {"kind": "agent", "id": "8999"}}
    assert code(run(handlers, "call.consult", bad_agent)) == "unknown_agent"
    consult = run(
        handlers, "call.consult", {"agent_id": "8001", "target": {"kind": "external", "id": "+861"}}
    )
    assert isinstance(consult.request, TransferRequest) and consult.request.command == "call.consult"
    record = run(handlers, "call.record", {"agent_id": "8001", "action": "start"}).request
    assert isinstance(record, RecordRequest) and record.action == "start"


def test_monitor(handlers: CommandHandlers) -> None:
    body = {"supervisor_id": "9001", "agent_id": "8001", "mode": "whisper"}
    supervisor = Actor.agent("9001")
    assert code(run(handlers, "call.monitor", body, Actor.agent("8001"))) == "not_permitted"
    assert code(run(handlers, "call.monitor", {**body, "agent_id": "8003"}, supervisor)) == "not_permitted"
    assert code(run(handlers, "call.monitor", {**body, "supervisor_id": "8002"})) == "not_permitted"
    assert code(run(handlers, "call.monitor", body, supervisor)) == "agent_not_logged_in"
    login(handlers, "9001")
    assert code(run(handlers, "call.monitor", body, supervisor)) == "agent_not_logged_in"
    login(handlers, "8001")
    assert code(run(handlers, "call.monitor", body, supervisor)) == "no_active_call"
    busy(handlers, "8001", "CV7")
    result = run(handlers, "call.monitor", body, supervisor)
    assert isinstance(result.request, MonitorRequest)
    assert (result.request.mode, result.request.conversation_id, result.request.by) == (
        "whisper",
        "CV7",
        "9001",
    )
    assert result.request.supervisor_device is not None and result.request.supervisor_device.address == "1005"
    handlers.core.device_unregistered("1005", T0)
    assert code(run(handlers, "call.monitor", body, supervisor)) == "device_unavailable"


def test_every_documented_code_is_reachable_and_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "cti.md").read_text(encoding="utf-8")
    for reply_code in REPLY_CODES:
        assert f"`{reply_code}`" in doc, reply_code
    with pytest.raises(ValueError, match="not an error code"):
        CommandError("ok", "fine")
