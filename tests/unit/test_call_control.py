"""Call control decisions, driven by scripted media-worker events (the worker itself is tested for real
in tests/integration/test_media_*.py and through the B2BUA end to end)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from softswitch.calls.control import CallControl, caller_response, final_status
from softswitch.cti.agents import Device
from softswitch.cti.commands import CallControlRequest, MonitorRequest, RecordRequest, TransferRequest
from softswitch.cti.core import ConnectCaller, OfferCall
from softswitch.cti.errors import INVALID_STATE, NOT_SUPPORTED
from softswitch.cti.errors import CommandError as CtiError
from softswitch.dialplan import actions
from softswitch.events.bus import EventBus
from softswitch.events.types import CallDtmf, CallEnded, ConversationEnded, Event, ParticipantJoined
from softswitch.media.protocol import (
    Answer,
    Bridge,
    Command,
    CommandError,
    Echo,
    Hangup,
    LegDtmf,
    LegIncoming,
    LegState,
    Listen,
    Originate,
    Play,
    PlayerDone,
    Reject,
    StopPlay,
    StopTone,
    Tone,
    Unbridge,
)
from softswitch.media.protocol import Event as MediaEvent
from softswitch.prompts import PromptError, PromptSet


class ScriptedMedia:
    """Records the commands call control sends; the test plays the worker's events."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.callback: Callable[[str, MediaEvent], None] | None = None
        self.fail: set[str] = set()

    async def command(self, worker_id: str, cmd: Command, timeout_s: float = 5.0) -> dict[str, Any]:
        self.commands.append(cmd)
        if cmd.type in self.fail:
            raise CommandError("capacity", "worker full")
        if isinstance(cmd, Play):
            return {"duration_s": 1.0}
        return {}

    def subscribe(self, callback: Callable[[str, MediaEvent], None]) -> None:
        self.callback = callback

    def address(self, worker_id: str) -> tuple[str, int] | None:
        return ("127.0.0.1", 5090 + int(worker_id[1:]))

    def emit(self, event: MediaEvent, worker: str = "w1") -> None:
        assert self.callback is not None
        self.callback(worker, event)

    def take(self) -> list[Command]:
        out, self.commands = self.commands, []
        return out


class Plan:
    def __init__(self) -> None:
        support = actions.ActionTemplate(actions.Queue("support"))
        self.menus = {"demo": actions.IvrMenu("demo", "ivr_demo", {"1": support})}

    def route(self, number: str, *, caller: str = "") -> actions.Action | None:
        if number.startswith("1"):
            return actions.Dial(target=number, timeout_s=20, max_duration_s=0.3 if number == "1004" else None)
        if number == "*97":
            return actions.Echo()
        if number == "*98":
            return actions.Playback(prompt="enter_digits", then="readback")
        if number == "*99":
            return actions.Playback(prompt="welcome")
        if number == "*90":
            return actions.Playback(prompt="no_such_prompt")
        if number == "8000":
            return actions.Queue(queue="support")
        if number in ("9000", "9001"):
            return actions.Conference(room=number, muted=number == "9001")
        if number == "0":
            return actions.Hangup(code=403, reason="Forbidden")
        return None


class Fixture:
    def __init__(self) -> None:
        self.media = ScriptedMedia()
        self.bus = EventBus()
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.bound = {"1002", "1004"}
        self.control = CallControl(
            self.media, Plan(), self.bus,
            users={"1001": "Alice", "1002": "Bob", "1003": "Carol", "1004": "Dave"},
            has_binding=lambda u: u in self.bound, domain="127.0.0.1",
        )  # fmt: skip
        self.control.start()

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def incoming(self, number: str, leg: str = "w1-1", worker: str = "w1") -> None:
        self.media.emit(
            LegIncoming(
                leg=leg, sip_call_id=f"sip-{leg}", from_uri="sip:1001@127.0.0.1", from_display="Alice",
                to_uri=f"sip:{number}@127.0.0.1", request_uri=f"sip:{number}@127.0.0.1", identity="1001",
                headers={},
            ),
            worker,
        )  # fmt: skip
        await self.settle()

    async def state(self, leg: str, state: str, code: int = 0, reason: str = "", by: str = "") -> None:
        self.media.emit(
            LegState(leg=leg, state=state, sip_code=code, reason=reason, sip_call_id="", released_by=by)
        )
        await self.settle()

    def types(self) -> list[str]:
        return [e.type for e in self.events]


async def dial(f: Fixture, number: str = "1002") -> str:
    await f.incoming(number)
    [orig] = f.media.take()
    assert isinstance(orig, Originate)
    return orig.leg


async def test_a_call_is_two_legs_bridged_on_one_worker() -> None:
    f = Fixture()
    await f.incoming("1002")
    [orig] = f.media.take()
    assert isinstance(orig, Originate)
    assert orig.uri == "sip:1002@127.0.0.1" and orig.from_uri == "sip:1001@127.0.0.1"
    assert orig.display_name == "Alice" and orig.timeout_s == 20
    b = orig.leg
    await f.state(b, "ringing", 180)
    assert f.media.take() == [Answer(leg="w1-1", code=183), Tone(leg="w1-1", kind="ringback")]
    await f.state(b, "confirmed", 200)
    assert f.media.take() == [
        StopTone(leg="w1-1"), Answer(leg="w1-1", code=200), Bridge(a="w1-1", b=b)
    ]  # fmt: skip
    await f.state("w1-1", "confirmed", 200)
    await f.state(b, "disconnected", 200, "Normal call clearing", by="remote")
    assert f.media.take() == [Hangup(leg="w1-1")]
    await f.state("w1-1", "disconnected", 200, "", by="local")
    assert f.types() == [
        "call.initiated", "call.initiated", "call.ringing", "call.ringing", "call.answered",
        "call.answered", "call.bridged", "call.bridged", "call.ended", "call.ended", "conversation.ended",
    ]  # fmt: skip
    ended = [e for e in f.events if isinstance(e, CallEnded)]
    assert {(e.role, e.final_status, e.released_by) for e in ended} == {
        ("callee", "completed", "remote"), ("caller", "completed", "local"),
    }  # fmt: skip
    assert not f.control.conversations and not f.control.legs


async def test_early_media_from_the_callee_is_bridged_before_answer() -> None:
    f = Fixture()
    b = await dial(f)
    await f.state(b, "early", 183)
    assert f.media.take() == [
        Answer(leg="w1-1", code=183), StopTone(leg="w1-1"), Bridge(a="w1-1", b=b)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("code", "reason", "status", "caller_code"),
    [
        (486, "Busy Here", "busy", 486),
        (603, "Decline", "rejected", 603),
        (408, "timeout", "no_answer", 480),
        (480, "Temporarily Unavailable", "no_answer", 480),
        (500, "Server Internal Error", "failed", 500),
    ],
)
async def test_callee_failure_maps_to_the_caller(
    code: int, reason: str, status: str, caller_code: int
) -> None:
    f = Fixture()
    b = await dial(f)
    await f.state(b, "disconnected", code, reason, by="remote")
    assert f.media.take() == [Reject(leg="w1-1", code=caller_code)]
    await f.state("w1-1", "disconnected", caller_code, "", by="local")
    ended = {e.role: e for e in f.events if isinstance(e, CallEnded)}
    assert ended["callee"].final_status == status and ended["callee"].sip_code == code
    assert ended["caller"].sip_code == caller_code
    [conv] = [e for e in f.events if isinstance(e, ConversationEnded)]
    assert conv.final_status == ended["caller"].final_status


async def test_caller_cancel_cancels_the_callee() -> None:
    f = Fixture()
    b = await dial(f)
    await f.state(b, "ringing", 180)
    f.media.take()
    await f.state("w1-1", "disconnected", 487, "Request Terminated", by="remote")
    assert f.media.take() == [Hangup(leg=b)]
    await f.state(b, "disconnected", 487, "", by="local")
    ended = {e.role: e for e in f.events if isinstance(e, CallEnded)}
    assert ended["caller"].final_status == "canceled" and ended["caller"].released_by == "remote"
    assert ended["callee"].final_status == "canceled" and ended["callee"].released_by == "local"
    assert f.types()[-1] == "conversation.ended"


@pytest.mark.parametrize(
    ("number", "code"),
    [("1999", 404), ("1003", 480), ("5555", 404), ("0", 403), ("8000", 404)],
)
async def test_numbers_that_do_not_reach_anyone(number: str, code: int) -> None:
    f = Fixture()
    await f.incoming(number)
    [cmd] = f.media.take()
    assert isinstance(cmd, Reject) and cmd.code == code
    await f.state("w1-1", "disconnected", code, "", by="local")
    assert f.types() == ["call.initiated", "call.ended", "conversation.ended"]


async def test_echo_answers_and_loops_audio_back() -> None:
    f = Fixture()
    await f.incoming("*97")
    assert f.media.take() == [Answer(leg="w1-1", code=200), Echo(leg="w1-1")]


async def test_originate_refused_by_the_worker_fails_the_call_with_503() -> None:
    f = Fixture()
    f.media.fail.add("originate")
    await f.incoming("1002")
    cmds = f.media.take()
    assert isinstance(cmds[0], Originate) and cmds[1] == Reject(
        leg="w1-1", code=503, reason="Service Unavailable"
    )


async def test_max_duration_ends_both_legs_with_time_limit() -> None:
    f = Fixture()
    b = await dial(f, "1004")
    await f.state(b, "confirmed", 200)
    await f.state("w1-1", "confirmed", 200)
    f.media.take()
    await asyncio.sleep(0.4)
    await f.settle()
    assert set(map(repr, f.media.take())) == {repr(Hangup(leg="w1-1")), repr(Hangup(leg=b))}
    await f.state(b, "disconnected", 200, "", by="local")
    await f.state("w1-1", "disconnected", 200, "", by="local")
    ended = [e for e in f.events if isinstance(e, CallEnded)]
    assert {e.final_status for e in ended} == {"time_limit"}
    assert {e.released_by for e in ended} == {"system"}


async def test_worker_death_fails_every_leg() -> None:
    f = Fixture()
    b = await dial(f)
    await f.state(b, "confirmed", 200)
    await f.state("w1-1", "confirmed", 200)
    f.media.take()
    await f.state(b, "disconnected", 500, "media worker died", by="system")
    await f.state("w1-1", "disconnected", 500, "media worker died", by="system")
    ended = [e for e in f.events if isinstance(e, CallEnded)]
    assert {(e.final_status, e.released_by) for e in ended} == {("failed", "system")}


def test_status_mapping_table() -> None:
    assert final_status(200, "", answered=True) == "completed"
    assert final_status(600, "", answered=False) == "busy"
    assert final_status(487, "", answered=False) == "canceled"
    assert caller_response("busy", 600) == 486
    assert caller_response("failed", 503) == 500  # a 503 would make the phone think we are overloaded


async def test_ring_timeout_reported_by_the_worker_is_a_no_answer() -> None:
    f = Fixture()
    b = await dial(f)
    await f.state(b, "ringing", 180)
    f.media.take()
    # The worker cancels the unanswered leg at the route's timeout and reports 408, released by system.
    await f.state(b, "disconnected", 408, "timeout", by="system")
    assert f.media.take() == [Reject(leg="w1-1", code=480)]
    [ended] = [e for e in f.events if isinstance(e, CallEnded)]
    assert ended.final_status == "no_answer"


def _names(play: Command) -> list[str]:
    assert isinstance(play, Play), play
    return [Path(f).stem for f in play.files]


async def test_playback_reads_back_the_digits_keyed() -> None:
    """*98: answer, prompt (a key stops it), keys until #, read back, goodbye, hang up: completed."""
    f = Fixture()
    await f.incoming("*98")
    answer, prompt = f.media.take()
    assert answer == Answer(leg="w1-1", code=200)
    assert _names(prompt) == ["enter_digits"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in prompt.files)  # type: ignore[attr-defined]
    await f.state("w1-1", "confirmed", 200)
    f.media.emit(LegDtmf(leg="w1-1", digit="4", method="rfc4733", duration_ms=0))
    await f.settle()
    assert f.media.take() == [StopPlay(leg="w1-1")]  # barge-in
    for digit in "2*#":
        f.media.emit(LegDtmf(leg="w1-1", digit=digit, method="info", duration_ms=160))
    await f.settle()
    [readback] = f.media.take()
    assert _names(readback) == ["you_entered", "digit_4", "digit_2", "digit_star", "goodbye"]
    f.media.emit(PlayerDone(leg="w1-1"))
    await f.settle()
    assert f.media.take() == [Hangup(leg="w1-1")]
    await f.state("w1-1", "disconnected", 200, "", by="local")
    dtmf = [e for e in f.events if isinstance(e, CallDtmf)]
    assert [(e.digit, e.method, e.duration_ms) for e in dtmf] == [
        ("4", "rfc4733", 0), ("2", "info", 160), ("*", "info", 160), ("#", "info", 160),
    ]  # fmt: skip
    [ended] = [e for e in f.events if isinstance(e, CallEnded)]
    assert (ended.final_status, ended.released_by) == ("completed", "local")
    assert f.types()[-1] == "conversation.ended"


async def test_playback_without_keys_says_so_and_a_hang_up_stops_it() -> None:
    f = Fixture()
    await f.incoming("*99")
    answer, prompt = f.media.take()
    assert answer == Answer(leg="w1-1", code=200) and _names(prompt) == ["welcome"]
    await f.state("w1-1", "confirmed", 200)
    f.media.emit(LegDtmf(leg="w1-1", digit="1", method="rfc4733"))  # no barge-in without readback
    await f.settle()
    assert f.media.take() == []
    await f.state("w1-1", "disconnected", 200, "", by="remote")  # the caller hangs up mid-prompt
    assert f.media.take() == []
    [ended] = [e for e in f.events if isinstance(e, CallEnded)]
    assert (ended.final_status, ended.released_by) == ("completed", "remote")
    assert f.control._channels == {}


async def test_playback_of_a_missing_prompt_is_refused_with_500() -> None:
    f = Fixture()
    await f.incoming("*90")
    [cmd] = f.media.take()
    assert isinstance(cmd, Reject) and cmd.code == 500


def test_prompt_set_resolves_languages_and_operator_recordings(tmp_path: Path) -> None:
    zh = PromptSet("zh")
    assert zh.path("digit_1").parent.name == "zh"
    assert zh.path("music_on_hold").parent.name == "common"
    own = tmp_path / "en"
    own.mkdir()
    (own / "welcome.wav").write_bytes(PromptSet().path("goodbye").read_bytes())
    mine = PromptSet("en", tmp_path)
    assert mine.path("welcome") == (own / "welcome.wav").resolve()
    assert mine.path("goodbye").parent.name == "en" and mine.path("goodbye").parent != own
    assert {"enter_digits", "digit_0", "digit_pound", "music_on_hold"} <= mine.names()
    assert [p.stem for p in mine.digits("0#")] == ["digit_0", "digit_pound"]
    for bad in ("../etc/passwd", "a/b", ""):
        with pytest.raises(PromptError, match="bad prompt name"):
            mine.path(bad)
    with pytest.raises(PromptError, match="no prompt 'nothing'"):
        mine.path("nothing")
    with pytest.raises(PromptError, match="digits"):
        mine.digits("12a")
    with pytest.raises(ValueError, match="language"):
        PromptSet("fr")


# -- ACD queue calls: what call control does with the CTI layer's actions, and what it reports ------


class RecordingQueues:
    """The CTI layer as call control sees it: every report recorded (its decisions are tested in
    tests/unit/test_cti_*.py; here the test plays them as actions)."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, ...]] = []

    def has_queue(self, queue_id: str) -> bool:
        return queue_id == "support"

    def caller_queued(
        self, queue_id: str, conversation_id: str, call_id: str, sip_call_id: str, from_: str, to: str
    ) -> None:
        self.reports.append(("queued", queue_id, call_id, from_, to))

    def caller_gone(self, conversation_id: str) -> None:
        self.reports.append(("gone",))

    def exit_of(self, queue_id: str) -> tuple[str | None, str | None]:
        return "0", None

    def caller_left(self, conversation_id: str) -> None:
        self.reports.append(("left",))

    def offer_ringing(self, agent_id: str, conversation_id: str) -> None:
        self.reports.append(("ringing", agent_id))

    def offer_answered(self, agent_id: str, conversation_id: str) -> None:
        self.reports.append(("answered", agent_id))

    def offer_failed(self, agent_id: str, conversation_id: str) -> None:
        self.reports.append(("failed", agent_id))

    def agent_call_started(self, agent_id: str, conversation_id: str) -> None:
        self.reports.append(("started", agent_id))

    def agent_call_ended(self, agent_id: str, conversation_id: str, talk_s: float) -> None:
        self.reports.append(("ended", agent_id))


async def _queued(f: Fixture) -> tuple[RecordingQueues, str]:
    queues = RecordingQueues()
    f.control.queues = queues
    await f.incoming("8000")
    answer, music = f.media.take()
    assert answer == Answer(leg="w1-1", code=200)
    assert isinstance(music, Play) and music.loop and _names(music) == ["music_on_hold"]
    assert queues.reports == [("queued", "support", "w1-1", "1001", "8000")]
    [conversation] = f.control.conversations
    return queues, conversation


def _offer(conversation: str, agent: str = "8001", address: str = "1002") -> OfferCall:
    return OfferCall(agent, conversation, "support", Device("sip", address), False, "1001", None)


async def test_a_queue_call_is_offered_connected_and_ended() -> None:
    f = Fixture()
    queues, conversation = await _queued(f)
    await f.state("w1-1", "confirmed", 200)
    f.control.carry_out(_offer(conversation))
    await f.settle()
    [originate] = f.media.take()
    assert isinstance(originate, Originate) and originate.uri == "sip:1002@127.0.0.1"
    agent_leg = originate.leg
    await f.state(agent_leg, "ringing", 180)
    await f.state(agent_leg, "confirmed", 200)
    assert queues.reports[1:] == [("ringing", "8001"), ("answered", "8001")]
    assert f.media.take() == []  # nothing is bridged before the CTI layer says so
    f.control.carry_out(ConnectCaller("8001", conversation, "support"))
    await f.settle()
    assert f.media.take() == [StopPlay(leg="w1-1"), Bridge(a="w1-1", b=agent_leg)]
    await f.state("w1-1", "disconnected", 200, by="remote")  # the customer hangs up
    assert f.media.take() == [Hangup(leg=agent_leg)]
    await f.state(agent_leg, "disconnected", 200, by="local")
    assert queues.reports[-1] == ("ended", "8001")
    roles = {e.call_id: e.role for e in f.events if isinstance(e, CallEnded)}
    assert roles == {"w1-1": "caller", agent_leg: "agent"}
    assert f.types()[-1] == "conversation.ended"


async def test_a_rejected_offer_is_reported_and_the_caller_waits_on() -> None:
    f = Fixture()
    queues, conversation = await _queued(f)
    f.control.carry_out(_offer(conversation))
    await f.settle()
    [originate] = f.media.take()
    assert isinstance(originate, Originate)
    await f.state(originate.leg, "disconnected", 486, "Busy Here", by="remote")
    assert queues.reports[-1] == ("failed", "8001")
    assert f.media.take() == []  # the caller is not touched: still hearing music, still queued
    assert conversation in f.control.conversations


async def test_an_abandoning_caller_withdraws_the_ringing_offer() -> None:
    f = Fixture()
    queues, conversation = await _queued(f)
    f.control.carry_out(_offer(conversation))
    await f.settle()
    [originate] = f.media.take()
    assert isinstance(originate, Originate)
    await f.state(originate.leg, "ringing", 180)
    await f.state("w1-1", "disconnected", 200, by="remote")
    assert ("gone",) in queues.reports
    assert f.media.take() == [Hangup(leg=originate.leg)]  # CANCEL of the offer
    await f.state(originate.leg, "disconnected", 487, by="local")
    assert ("failed", "8001") not in queues.reports  # withdrawn, not missed
    assert f.types()[-1] == "conversation.ended"


async def test_an_offer_to_a_phone_that_is_not_registered_fails_at_once() -> None:
    f = Fixture()
    queues, conversation = await _queued(f)
    f.control.carry_out(_offer(conversation, address="1003"))  # 1003 has no binding
    await f.settle()
    assert f.media.take() == []
    assert queues.reports[-1] == ("failed", "8001")


async def test_the_exit_key_takes_a_waiting_caller_out_of_the_queue() -> None:
    f = Fixture()
    queues, _ = await _queued(f)
    await f.state("w1-1", "confirmed", 200)
    f.media.emit(LegDtmf(leg="w1-1", digit="5", method="rfc4733"))  # not the exit key: nothing
    await f.settle()
    assert f.media.take() == [] and queues.reports[-1][0] == "queued"
    f.media.emit(LegDtmf(leg="w1-1", digit="0", method="rfc4733"))
    await f.settle()
    assert queues.reports[-1] == ("left",)
    assert f.media.take() == [StopPlay(leg="w1-1"), Hangup(leg="w1-1")]  # no exit_to: the call ends


async def test_a_worker_dying_under_a_ringing_offer_is_no_missed_offer() -> None:
    f = Fixture()
    queues, conversation = await _queued(f)
    f.control.carry_out(_offer(conversation))
    await f.settle()
    [originate] = f.media.take()
    assert isinstance(originate, Originate)
    await f.state(originate.leg, "disconnected", 500, "media worker died", by="system")
    await f.state("w1-1", "disconnected", 500, "media worker died", by="system")
    assert ("failed", "8001") not in queues.reports  # the agent is not made not_ready for it
    assert ("gone",) in queues.reports


# -- mid-call control: who hears whom is the conversation's `edges` (listener, source) -----------------


async def _talking(f: Fixture) -> tuple[str, str, str]:
    """A call from 1001 (leg w1-1, the customer here) answered by 1002 (the agent's leg); returns the
    conversation id and both legs, commands and events cleared."""
    b = await dial(f)
    await f.state(b, "confirmed", 200)
    await f.state("w1-1", "confirmed", 200)
    f.media.take()
    f.events.clear()
    [conversation] = f.control.conversations
    return conversation, "w1-1", b


def _edges(f: Fixture, conversation: str) -> set[tuple[str, str]]:
    return f.control.conversations[conversation].edges


def _both(a: str, b: str) -> set[tuple[str, str]]:
    return {(a, b), (b, a)}


async def _consulting(f: Fixture) -> tuple[str, str, str, str]:
    conversation, customer, agent = await _talking(f)
    result = await f.control.execute(
        TransferRequest("call.consult", None, None, None, None, agent, "user", "1004")
    )
    target = result["recipient_call"]
    commands = f.media.take()
    assert commands[0] == Unbridge(a=agent, b=customer)
    assert isinstance(commands[1], Play) and _names(commands[1]) == ["music_on_hold"]
    assert isinstance(commands[2], Originate) and commands[2].uri == "sip:1004@127.0.0.1"
    await f.state(target, "ringing", 180)
    assert f.media.take() == [Tone(leg=agent, kind="ringback")]
    await f.state(target, "confirmed", 200)
    assert f.media.take() == [StopTone(leg=agent), Bridge(a=agent, b=target)]
    assert _edges(f, conversation) == _both(agent, target)
    return conversation, customer, agent, target


async def test_consult_then_transfer_complete_leaves_customer_and_target_talking() -> None:
    f = Fixture()
    conversation, customer, agent, target = await _consulting(f)
    await f.control.execute(CallControlRequest("call.transfer_complete", None, None, None, None, agent))
    assert _edges(f, conversation) == _both(customer, target)
    assert f.media.take()[-1] == Hangup(leg=agent)
    await f.state(agent, "disconnected", 200, by="local")
    assert conversation in f.control.conversations  # the agent's end ended nobody else
    assert [t for t in f.types() if t.startswith("transfer.")] == [
        "transfer.initiated", "transfer.answered", "transfer.completed"
    ]  # fmt: skip
    await f.state(customer, "disconnected", 200, by="remote")
    assert f.media.take() == [Hangup(leg=target)]
    await f.state(target, "disconnected", 200, by="local")
    assert not f.control.conversations


@pytest.mark.parametrize("how", ["busy", "cancel"])
async def test_a_consult_that_fails_or_is_cancelled_brings_the_customer_back(how: str) -> None:
    f = Fixture()
    conversation, customer, agent = await _talking(f)
    result = await f.control.execute(
        TransferRequest("call.consult", None, None, None, None, agent, "user", "1004")
    )
    target = result["recipient_call"]
    f.media.take()
    if how == "cancel":
        await f.control.execute(CallControlRequest("call.consult_cancel", None, None, None, None, agent))
        assert f.media.take() == [Hangup(leg=target)]
        await f.state(target, "disconnected", 487, by="local")
    else:
        await f.state(target, "disconnected", 486, "Busy Here", by="remote")
    assert f.media.take() == [StopTone(leg=agent), StopPlay(leg=customer), Bridge(a=agent, b=customer)]
    assert _edges(f, conversation) == _both(agent, customer)
    expected = "transfer.cancelled" if how == "cancel" else "transfer.failed"
    assert [t for t in f.types() if t.startswith("transfer.")] == ["transfer.initiated", expected]
    assert "call.retrieved" in f.types()


async def test_the_agent_hanging_up_during_an_answered_consult_completes_the_transfer() -> None:
    f = Fixture()
    conversation, customer, agent, target = await _consulting(f)
    await f.state(agent, "disconnected", 200, by="remote")
    assert f.media.take() == [StopPlay(leg=customer), Bridge(a=customer, b=target)]
    assert _edges(f, conversation) == _both(customer, target)
    assert "transfer.completed" in f.types()


async def test_a_three_way_call_goes_on_until_two_parties_left() -> None:
    f = Fixture()
    conversation, customer, agent, target = await _consulting(f)
    result = await f.control.execute(CallControlRequest("call.conference", None, None, None, None, agent))
    assert sorted(result["participants"]) == sorted([customer, agent, target])
    assert _edges(f, conversation) == _both(customer, agent) | _both(customer, target) | _both(agent, target)
    await f.state(target, "disconnected", 200, by="remote")  # one hangs up: the other two talk on
    assert _edges(f, conversation) == _both(customer, agent)
    assert f.control.legs[customer].peer == agent
    await f.state(agent, "disconnected", 200, by="remote")  # then the call ends
    assert f.media.take()[-1] == Hangup(leg=customer)
    joined = [e.call_id for e in f.events if isinstance(e, ParticipantJoined)]
    assert sorted(joined) == sorted([customer, agent, target])


@pytest.mark.parametrize(
    ("mode", "extra"),
    [("listen", set()), ("whisper", {("AGENT", "SUP")}), ("barge", {("AGENT", "SUP"), ("CUSTOMER", "SUP")})],
)
async def test_supervision_modes_and_a_muted_agent(mode: str, extra: set[tuple[str, str]]) -> None:
    f = Fixture()
    f.bound.add("1003")
    conversation, customer, agent = await _talking(f)
    monitor = MonitorRequest("call.monitor", None, "8002", None, None, agent, "listen", Device("sip", "1003"))
    sup = (await f.control.execute(monitor))["supervisor_call"]
    await f.state(sup, "confirmed", 200)
    listening = {(sup, customer), (sup, agent)}
    assert _edges(f, conversation) == _both(customer, agent) | listening
    if mode != "listen":
        await f.control.execute(dataclasses.replace(monitor, mode=mode))
    names = {"AGENT": agent, "CUSTOMER": customer, "SUP": sup}
    wanted = {(names[x], names[y]) for x, y in extra}
    assert _edges(f, conversation) == _both(customer, agent) | listening | wanted
    # Muted, the agent is heard by the supervisor only; it still hears everyone.
    await f.control.execute(CallControlRequest("call.mute", None, None, None, None, agent))
    heard_agent = {x for x, y in _edges(f, conversation) if y == agent}
    assert heard_agent == {sup}
    await f.control.execute(CallControlRequest("call.unmute", None, None, None, None, agent))
    assert _edges(f, conversation) == _both(customer, agent) | listening | wanted
    await f.state(sup, "disconnected", 200, by="remote")  # the supervisor leaves: the call goes on
    assert _edges(f, conversation) == _both(customer, agent)
    assert conversation in f.control.conversations
    assert [t for t in f.types() if t.startswith("supervision.")][-1] == "supervision.ended"


async def test_commands_in_the_wrong_state_are_refused_with_a_code() -> None:
    f = Fixture()
    _conversation, _customer, agent = await _talking(f)
    for command, code in [
        (CallControlRequest("call.transfer_complete", None, None, None, None, agent), INVALID_STATE),
        (CallControlRequest("call.conference", None, None, None, None, agent), INVALID_STATE),
        (CallControlRequest("call.unmute", None, None, None, None, agent), INVALID_STATE),
        (RecordRequest("call.record", None, None, None, None, agent, "stop"), INVALID_STATE),
        (RecordRequest("call.record", None, None, None, None, agent, "start"), NOT_SUPPORTED),
        (TransferRequest("call.consult", None, None, None, None, agent, "queue", "support"), NOT_SUPPORTED),
    ]:
        with pytest.raises(CtiError) as raised:
            await f.control.execute(command)
        assert raised.value.code == code, command


# -- conference rooms -------------------------------------------------------------------------------


async def test_a_room_mixes_its_members_and_links_a_caller_on_another_worker() -> None:
    f = Fixture()
    await f.incoming("9000", "w1-1")
    assert f.media.take() == [Answer(leg="w1-1", code=200)]
    await f.incoming("9000", "w1-2")
    assert f.media.take() == [
        Answer(leg="w1-2", code=200), Listen(leg="w1-2", source="w1-1"), Listen(leg="w1-1", source="w1-2")
    ]  # fmt: skip
    # A caller on worker w2: a direct call to the room's worker w1 carries its audio.
    await f.incoming("9000", "w2-1", worker="w2")
    answer, link = f.media.take()
    assert answer == Answer(leg="w2-1", code=200)
    assert isinstance(link, Originate) and link.direct and link.uri.endswith("@127.0.0.1:5091")
    token_user = link.uri.split(":")[1].split("@")[0]
    f.media.emit(
        LegIncoming(
            leg="w1-3", sip_call_id="link", from_uri="sip:1001@127.0.0.1", from_display="", to_uri=link.uri,
            request_uri=link.uri, identity="", headers={},
        ),
        "w1",
    )  # fmt: skip
    await f.settle()
    assert f.media.take() == [Answer(leg="w1-3", code=200)]
    await f.state("w1-3", "confirmed", 200)
    assert set(f.media.take()) == {
        Listen(leg="w1-3", source="w1-1"), Listen(leg="w1-1", source="w1-3"),
        Listen(leg="w1-3", source="w1-2"), Listen(leg="w1-2", source="w1-3"),
    }  # fmt: skip
    await f.state(link.leg, "confirmed", 200)
    assert f.media.take() == [Bridge(a="w2-1", b=link.leg)]
    assert token_user.startswith("link-")
    assert sorted(f.control.rooms["9000"].members) == ["w1-1", "w1-2", "w1-3"]
    joined = [e.call_id for e in f.events if isinstance(e, ParticipantJoined)]
    assert joined == ["w1-1", "w1-2", "w2-1"]  # the link legs are no participants
    # The linked caller hangs up: its link ends with it and leaves the room.
    await f.state("w2-1", "disconnected", 200, by="remote")
    assert set(f.media.take()) == {Hangup(leg=link.leg), Hangup(leg="w1-3")}
    await f.state(link.leg, "disconnected", 200, by="local")
    await f.state("w1-3", "disconnected", 200, by="local")
    assert sorted(f.control.rooms["9000"].members) == ["w1-1", "w1-2"]
    assert all(e.role != "link" for e in f.events if isinstance(e, CallEnded))
    for leg in ("w1-1", "w1-2"):
        await f.state(leg, "disconnected", 200, by="remote")
    assert "9000" not in f.control.rooms and not f.control.conversations


async def test_a_member_joining_muted_hears_the_room_and_is_not_heard() -> None:
    f = Fixture()
    await f.incoming("9001", "w1-1")
    await f.incoming("9001", "w1-2")
    f.media.take()
    await f.incoming("9001", "w1-3")
    assert f.media.take() == [Answer(leg="w1-3", code=200)]  # both earlier members muted: nobody to hear
    f.control.rooms["9001"].members["w1-1"] = False  # as if w1-1 had joined unmuted
    await f.incoming("9001", "w1-4")
    assert f.media.take() == [Answer(leg="w1-4", code=200), Listen(leg="w1-4", source="w1-1")]


async def test_a_direct_link_to_an_unknown_token_is_refused() -> None:
    f = Fixture()
    await f.incoming("link-0123456789abcdef01234567", "w1-9")
    assert f.media.take() == [Reject(leg="w1-9", code=404, reason="Not Found")]
    assert not f.control.conversations


async def test_a_blind_transfer_to_an_ivr_menu_plays_it_to_the_customer() -> None:
    f = Fixture()
    _conversation, customer, agent = await _talking(f)
    with pytest.raises(CtiError) as raised:
        await f.control.execute(
            TransferRequest("call.transfer", None, None, None, None, agent, "ivr", "nope")
        )
    assert raised.value.code == INVALID_STATE
    await f.control.execute(TransferRequest("call.transfer", None, None, None, None, agent, "ivr", "demo"))
    await f.settle()
    unbridge, hangup, prompt = f.media.take()[:3]
    assert (unbridge, hangup) == (Unbridge(a=agent, b=customer), Hangup(leg=agent))
    assert isinstance(prompt, Play) and prompt.leg == customer and _names(prompt) == ["ivr_demo"]
    assert [t for t in f.types() if t.startswith("transfer.")] == ["transfer.initiated", "transfer.completed"]
    await f.state(agent, "disconnected", 200, by="local")
    await f.state(customer, "disconnected", 200, by="remote")
    assert not f.control.conversations
