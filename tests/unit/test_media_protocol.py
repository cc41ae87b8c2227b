"""The controller ↔ media worker protocol codec (softswitch.media.protocol): no sockets, no engine."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softswitch.media.protocol import (
    COMMAND_TYPES,
    ERROR_CODES,
    EVENT_TYPES,
    MAX_FRAME,
    PROTOCOL_VERSION,
    Answer,
    Bridge,
    Command,
    CommandError,
    Echo,
    Event,
    FrameDecoder,
    Hangup,
    LegDtmf,
    LegIncoming,
    LegMedia,
    LegReplaced,
    LegState,
    LegTransfer,
    Listen,
    Message,
    Originate,
    Ping,
    Play,
    PlayerDone,
    ProtocolError,
    Record,
    Reject,
    Reply,
    SendDtmf,
    Shutdown,
    StopPlay,
    StopRecord,
    StopTone,
    Tone,
    Unbridge,
    Unlisten,
    WorkerReady,
    decode,
    encode,
)

EVERY_MESSAGE: list[Message] = [
    Answer("w1-1", 183, id=1),
    Reject("w1-1", 603, "Decline", id=2),
    Originate(
        leg="b-1",
        uri="sip:1002@127.0.0.1",
        from_uri="sip:1001@127.0.0.1",
        headers={"X-Conversation": "c-1", "P-Asserted-Identity": "<sip:1001@127.0.0.1>"},
        timeout_s=12.5,
        display_name="Alice «A»",
        id=3,
    ),
    Bridge("w1-1", "b-1", id=4),
    Unbridge("w1-1", "b-1", id=5),
    Hangup("w1-1", 0, id=6),
    Play("w1-1", ["/prompts/a.wav", "/prompts/b.wav"], loop=True, id=7),
    StopPlay("w1-1", id=8),
    Tone("w1-1", "ringback", id=9),
    StopTone("w1-1", id=10),
    Echo("w1-1", id=11),
    SendDtmf("w1-1", "123#", id=12),
    Shutdown(id=13),
    Ping(id=14),
    Listen("w1-3", "w1-1", id=15),
    Unlisten("w1-3", "w1-1", id=16),
    Record("RE1", "/data/recordings/CV1/RE1.wav", ["w1-1", "b-1"], id=17),
    StopRecord("RE1", id=18),
    LegTransfer("w1-1", "w1-7", "sip:8000@127.0.0.1:5060"),
    LegReplaced("w1-1", "w1-8", "abc@127.0.0.1", "sip:1003@127.0.0.1"),
    WorkerReady("w1", "127.0.0.1", 40000, 1024, "high-capacity", "2.12.1", "20000-24999", 4242),
    LegIncoming(
        "w1-1",
        "abc@127.0.0.1",
        "sip:1001@127.0.0.1",
        "Alice",
        "sip:1002@127.0.0.1",
        "sip:1002@127.0.0.1:40000",
        "1001",
        {"User-Agent": "baresip", "X-Softswitch-Identity": "1001"},
    ),
    LegState("w1-1", "disconnected", 200, "Normal call clearing", "abc@127.0.0.1", "remote"),
    LegState("b-1", "early", 183, "Session Progress", "def@127.0.0.1"),
    LegMedia("w1-1", True),
    LegDtmf("w1-1", "5", "rfc4733"),
    PlayerDone("w1-1"),
    Reply.success(14, {"leg": "b-1", "sip_call_id": "x"}),
    Reply.failure(15, "no_such_leg", "no leg 'w1-9'"),
]


def _frame(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_every_command_and_event_type_is_covered() -> None:
    covered = {type(m) for m in EVERY_MESSAGE}
    assert set(COMMAND_TYPES.values()) <= covered
    assert set(EVENT_TYPES.values()) <= covered
    assert Reply in covered


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    decoded = decode(line)
    assert decoded == message
    assert type(decoded) is type(message)
    if isinstance(message, Command):
        assert isinstance(decoded, Command) and decoded.id == message.id


def test_envelopes_match_the_documented_shape() -> None:
    cmd = json.loads(encode(Answer("w1-1", id=7)))
    assert cmd == {"v": 1, "kind": "cmd", "id": 7, "type": "answer", "args": {"leg": "w1-1", "code": 200}}
    event = json.loads(encode(LegMedia("w1-1", False)))
    assert event == {
        "v": 1,
        "kind": "event",
        "type": "leg.media",
        "data": {"leg": "w1-1", "active": False, "held": False},
    }
    ok = json.loads(encode(Reply.success(7)))
    assert ok == {"v": 1, "kind": "reply", "id": 7, "ok": True, "result": {}}
    failed = json.loads(encode(Reply.failure(7, "capacity", "full")))
    assert failed == {
        "v": 1,
        "kind": "reply",
        "id": 7,
        "ok": False,
        "error": {"code": "capacity", "message": "full"},
    }
    assert PROTOCOL_VERSION == 1


def test_defaults_apply_to_omitted_optional_fields() -> None:
    cmd = decode(
        _frame(v=1, kind="cmd", id=1, type="originate", args={"leg": "b", "uri": "u", "from_uri": "f"})
    )
    assert cmd == Originate(leg="b", uri="u", from_uri="f", id=1)
    assert isinstance(cmd, Originate) and cmd.timeout_s == 30.0 and cmd.headers == {}
    # An integer where a float is declared is accepted (JSON has one number type) and becomes a float.
    timed = decode(
        _frame(
            v=1,
            kind="cmd",
            id=1,
            type="originate",
            args={"leg": "b", "uri": "u", "from_uri": "f", "timeout_s": 5},
        )
    )
    assert isinstance(timed, Originate) and isinstance(timed.timeout_s, float)


def test_failed_reply_raises_command_error() -> None:
    reply = decode(encode(Reply.failure(3, "invalid_state", "leg w1-1 is already answered")))
    assert isinstance(reply, Reply)
    with pytest.raises(CommandError) as caught:
        reply.raise_for_error()
    assert (caught.value.code, caught.value.message) == ("invalid_state", "leg w1-1 is already answered")
    assert Reply.success(4, {"a": 1}).raise_for_error() == {"a": 1}
    with pytest.raises(ValueError, match="unknown error code"):
        Reply.failure(5, "oops", "x")
    assert (
        frozenset({"no_such_leg", "invalid_state", "capacity", "invalid_argument", "internal"}) == ERROR_CODES
    )


ORIGINATE_ARGS = {"leg": "b", "uri": "u", "from_uri": "f"}


def _cmd(type_: str, args: object, **envelope: object) -> bytes:
    return _frame(v=1, kind="cmd", id=envelope.pop("id", 1), type=type_, args=args, **envelope)


def _reply(**fields: object) -> bytes:
    return _frame(v=1, kind="reply", id=1, **fields)


INVALID_FRAMES: list[tuple[bytes, str]] = [
    (b"{not json", "bad JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    (b"\xff\xfe", "frame is not UTF-8: invalid start byte at byte 0"),
    (b"[1, 2]", "frame must be a JSON object, got array"),
    (_frame(kind="cmd"), "missing envelope field 'v'"),
    (_frame(v=2, kind="cmd"), "unsupported protocol version 2 (expected 1)"),
    (_frame(v=True, kind="cmd"), "unsupported protocol version True (expected 1)"),
    (_frame(v=1), "missing envelope field 'kind'"),
    (_frame(v=1, kind="push"), "unknown frame kind 'push' (expected 'cmd', 'reply' or 'event')"),
    (_cmd("transfer", {}), "unknown command type 'transfer'"),
    (_frame(v=1, kind="event", type="leg.hold", data={}), "unknown event type 'leg.hold'"),
    (_frame(v=1, kind="cmd", id=1, type="answer"), "cmd frame: missing envelope field 'args'"),
    (_cmd("answer", {}, x=1), "cmd frame: unknown envelope field 'x'"),
    (_cmd("answer", {}, id=-1), "cmd frame: 'id' must be a non-negative integer, got -1"),
    (_cmd("answer", {}, id="7"), "cmd frame: 'id' must be a non-negative integer, got '7'"),
    (_cmd(5, {}), "cmd frame: 'type' must be a string, got number"),  # type: ignore[arg-type]
    (_cmd("answer", []), "answer: 'args' must be an object, got array"),
    (_cmd("answer", {}), "answer: missing field args.leg"),
    (_cmd("answer", {"leg": "a", "cause": 1}), "answer: unknown field args.cause"),
    (_cmd("answer", {"leg": 5}), "answer: args.leg must be a string, got number"),
    (_cmd("answer", {"leg": "a", "code": True}), "answer: args.code must be an integer, got boolean"),
    (_cmd("answer", {"leg": "a", "code": 200.5}), "answer: args.code must be an integer, got number"),
    (
        _cmd("play", {"leg": "a", "files": ["a", 1]}),
        "play: args.files must be an array of strings, got array",
    ),
    (_cmd("play", {"leg": "a", "files": ["a"], "loop": 1}), "play: args.loop must be a boolean, got number"),
    (
        _cmd("originate", {**ORIGINATE_ARGS, "headers": {"X-A": 1}}),
        "originate: args.headers must be an object of strings, got object",
    ),
    (
        _cmd("originate", {**ORIGINATE_ARGS, "timeout_s": "30"}),
        "originate: args.timeout_s must be a number, got string",
    ),
    (_frame(v=1, kind="event", type="leg.media", data={"leg": "a"}), "leg.media: missing field data.active"),
    (_reply(), "reply frame: missing envelope field 'ok'"),
    (_reply(ok="yes"), "reply frame: 'ok' must be a boolean, got string"),
    (_reply(ok=True), "reply frame: missing envelope field 'result'"),
    (_reply(ok=True, result=[]), "reply frame: 'result' must be an object, got array"),
    (
        _reply(ok=True, result={}, error={"code": "internal", "message": ""}),
        "reply frame: unknown envelope field 'error'",
    ),
    (_reply(ok=False, error={"code": "oops", "message": "m"}), "reply frame: error.code must be one of"),
    (
        _reply(ok=False, error={"code": "internal", "message": 3}),
        "reply frame: error.message must be a string, got number",
    ),
    (
        _reply(ok=False, error={"code": "internal", "message": "m", "x": 1}),
        "reply frame: unknown error field 'x'",
    ),
]


@pytest.mark.parametrize(("line", "message"), INVALID_FRAMES)
def test_invalid_frames_raise_a_precise_protocol_error(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(line)
    assert message in str(caught.value)


def test_oversize_frames_are_refused_both_ways() -> None:
    big = "x" * MAX_FRAME
    with pytest.raises(ProtocolError, match=r"cmd frame of \d+ bytes exceeds MAX_FRAME \(1048576\)"):
        encode(Play("w1-1", [big]))
    with pytest.raises(ProtocolError, match=r"frame of 1048577 bytes exceeds MAX_FRAME \(1048576\)"):
        decode(b" " * (MAX_FRAME + 1))
    # Exactly MAX_FRAME bytes including the newline is allowed.
    line = encode(Play("w1-1", ["/a.wav"]))
    padding = MAX_FRAME - len(line)
    padded = line[:-2] + b" " * padding + line[-2:]
    assert len(padded) == MAX_FRAME
    assert decode(padded) == Play("w1-1", ["/a.wav"])


def test_frame_decoder_splits_a_stream_and_bounds_a_partial_frame() -> None:
    stream = b"".join(encode(m) for m in EVERY_MESSAGE)
    decoder = FrameDecoder()
    out: list[Message] = []
    for i in range(0, len(stream), 7):  # arbitrary chunking
        out += decoder.feed(stream[i : i + 7])
    assert out == EVERY_MESSAGE
    assert decoder.pending == 0
    assert decoder.feed(b"\n\r\n") == []  # blank lines are keep-alive noise, not frames

    unterminated = FrameDecoder()
    unterminated.feed(b"{" + b" " * (MAX_FRAME - 1))
    with pytest.raises(ProtocolError, match="unterminated frame longer than MAX_FRAME"):
        unterminated.feed(b" ")
    broken = FrameDecoder()
    with pytest.raises(ProtocolError, match="bad JSON"):
        broken.feed(encode(PlayerDone("w1-1")) + b"{oops}\n")


def test_encode_refuses_what_is_not_a_protocol_message() -> None:
    @dataclasses.dataclass(frozen=True)
    class Hold(Command):
        leg: str = ""

    @dataclasses.dataclass(frozen=True)
    class Stray(Event):
        pass

    with pytest.raises(TypeError, match="not a protocol command: Hold"):
        encode(Hold("a"))
    with pytest.raises(TypeError, match="not a protocol event: Stray"):
        encode(Stray())
    with pytest.raises(TypeError, match="not a protocol message: dict"):
        encode({"v": 1})  # type: ignore[arg-type]


_text = st.text(max_size=40)


@given(
    leg=_text,
    uri=_text,
    from_uri=_text,
    headers=st.dictionaries(_text, _text, max_size=4),
    timeout_s=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    display_name=_text,
    msg_id=st.integers(min_value=0, max_value=2**53),
)
def test_originate_round_trips_any_text(
    leg: str,
    uri: str,
    from_uri: str,
    headers: dict[str, str],
    timeout_s: float,
    display_name: str,
    msg_id: int,
) -> None:
    cmd = Originate(leg, uri, from_uri, headers, timeout_s, display_name, id=msg_id)
    assert decode(encode(cmd)) == cmd


@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_another_exception(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)
