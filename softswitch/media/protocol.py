"""Control protocol between the controller and its media workers (sans-IO codec).

Newline-delimited JSON over a byte stream (TCP on 127.0.0.1 today; a Unix socket or a remote host later).
Every frame is one JSON object on one line, at most :data:`MAX_FRAME` bytes including the newline:

* command (controller → worker): ``{"v":1,"kind":"cmd","id":N,"type":"answer","args":{...}}``
* reply (worker → controller, exactly one per command, same ``id``):
  ``{"v":1,"kind":"reply","id":N,"ok":true,"result":{...}}`` or
  ``{"v":1,"kind":"reply","id":N,"ok":false,"error":{"code":"no_such_leg","message":"..."}}``
* event (worker → controller, unsolicited): ``{"v":1,"kind":"event","type":"leg.state","data":{...}}``

A command's ``id`` travels in the keyword-only field :attr:`Command.id` (``0`` until the sender assigns
one, e.g. ``dataclasses.replace(cmd, id=n)``). A failed command is a :class:`Reply` with ``ok`` false, never
an event; :meth:`Reply.raise_for_error` turns it into :class:`CommandError`.

:func:`decode` validates everything a peer may get wrong (JSON syntax, envelope, version, type name,
missing/unknown/mistyped fields, frame size) and raises :class:`ProtocolError` with a precise message; the
receiver then closes the peer. :class:`FrameDecoder` splits a byte stream into frames without doing I/O.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypeAlias, get_type_hints

PROTOCOL_VERSION: Final = 1

# One JSON line. The largest legitimate frame is a Play with a long file list or a LegIncoming with a few
# headers (a few KB); 1 MiB bounds what a broken or hostile peer can make the reader buffer.
MAX_FRAME: Final = 1_048_576

ErrorCode: TypeAlias = Literal["no_such_leg", "invalid_state", "capacity", "invalid_argument", "internal"]
ERROR_CODES: Final[frozenset[str]] = frozenset(typing.get_args(ErrorCode))

# Values carried in string fields; the codec checks types only, the worker checks these (invalid_argument).
TONE_KINDS: Final[frozenset[str]] = frozenset({"ringback", "busy", "congestion"})
LEG_STATES: Final[frozenset[str]] = frozenset(
    {"calling", "ringing", "early", "connecting", "confirmed", "disconnected"}
)
RELEASED_BY: Final[frozenset[str]] = frozenset({"local", "remote", "system", ""})
DTMF_METHODS: Final[frozenset[str]] = frozenset({"rfc4733", "info"})


class ProtocolError(Exception):
    """An undecodable or invalid frame: the receiver closes the peer."""


class CommandError(Exception):
    """A command that failed: the ``error`` of its reply (``code`` is one of :data:`ERROR_CODES`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """Base of every controller → worker command. ``id`` is the envelope's request id."""

    type: ClassVar[str] = ""
    id: int = field(default=0, kw_only=True)


@dataclass(frozen=True)
class Answer(Command):
    """Respond to an incoming INVITE with 180/183 (progress) or 200 (RFC 3261 §13.3.1)."""

    type: ClassVar[str] = "answer"
    leg: str
    code: int = 200


@dataclass(frozen=True)
class Reject(Command):
    """Final non-2xx response to an incoming leg (RFC 3261 §13.3.1.3)."""

    type: ClassVar[str] = "reject"
    leg: str
    code: int = 486
    reason: str = ""


@dataclass(frozen=True)
class Originate(Command):
    """New outgoing leg ``leg`` (id assigned by the controller): INVITE through the edge (RFC 3261 §8.1.2)."""

    type: ClassVar[str] = "originate"
    leg: str
    uri: str
    from_uri: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0
    display_name: str = ""
    direct: bool = False  # straight to ``uri`` (another worker on loopback), not through the edge


@dataclass(frozen=True)
class Bridge(Command):
    """Connect two legs both ways in the conference bridge: ``a`` hears ``b`` and ``b`` hears ``a``."""

    type: ClassVar[str] = "bridge"
    a: str
    b: str


@dataclass(frozen=True)
class Unbridge(Command):
    """Undo :class:`Bridge` (both directions); ``a == b`` stops an :class:`Echo`.

    Idempotent: the result's ``was_bridged`` says whether there was anything to undo.
    """

    type: ClassVar[str] = "unbridge"
    a: str
    b: str


@dataclass(frozen=True)
class Listen(Command):
    """One-way audio: ``leg`` hears ``source`` (``source`` does not hear ``leg`` unless told so).

    The building block of supervision (listen, whisper, barge), mute and conferences: a leg hears the mix
    of every leg it listens to. Idempotent: the result's ``connected`` says whether audio flows now.
    """

    type: ClassVar[str] = "listen"
    leg: str
    source: str


@dataclass(frozen=True)
class Unlisten(Command):
    """Undo :class:`Listen`: ``leg`` no longer hears ``source``. Idempotent: result ``was_listening``."""

    type: ClassVar[str] = "unlisten"
    leg: str
    source: str


@dataclass(frozen=True)
class Record(Command):
    """Record the mix of ``legs`` into the WAV file ``path`` (absolute; 16-bit PCM at the bridge's rate).

    ``recording`` is the controller's id. Sent again for a running recording, it adds the legs it does not
    hold yet (a party joining a recorded call); ``path`` must then be the same.
    """

    type: ClassVar[str] = "record"
    recording: str
    path: str
    legs: list[str]


@dataclass(frozen=True)
class StopRecord(Command):
    """Close recording ``recording``; the result has ``path`` and ``duration_s``. Idempotent: ``stopped``."""

    type: ClassVar[str] = "stop_record"
    recording: str


@dataclass(frozen=True)
class Hangup(Command):
    """End a leg: BYE when confirmed, CANCEL when outgoing and early, final response when incoming.

    ``code`` 0 lets the worker choose (487 for CANCEL, 603 for an unanswered incoming leg, BYE otherwise).
    """

    type: ClassVar[str] = "hangup"
    leg: str
    code: int = 0


@dataclass(frozen=True)
class Play(Command):
    """Play WAV files (absolute paths readable by the worker) to the leg; ``player.done`` at the end."""

    type: ClassVar[str] = "play"
    leg: str
    files: list[str]
    loop: bool = False


@dataclass(frozen=True)
class StopPlay(Command):
    """Stop the leg's player (no ``player.done`` for a stopped player). Idempotent: result ``stopped``."""

    type: ClassVar[str] = "stop_play"
    leg: str


@dataclass(frozen=True)
class Tone(Command):
    """Call-progress tone to the leg, looping until :class:`StopTone` (ITU-T E.180 cadences)."""

    type: ClassVar[str] = "tone"
    leg: str
    kind: str


@dataclass(frozen=True)
class StopTone(Command):
    """Stop the leg's tone. Idempotent: the result's ``stopped`` says whether one was playing."""

    type: ClassVar[str] = "stop_tone"
    leg: str


@dataclass(frozen=True)
class Echo(Command):
    """The leg hears itself (echo test, ``*97``)."""

    type: ClassVar[str] = "echo"
    leg: str


@dataclass(frozen=True)
class SendDtmf(Command):
    """Send DTMF digits on the leg as RFC 4733 telephone-events."""

    type: ClassVar[str] = "send_dtmf"
    leg: str
    digits: str


@dataclass(frozen=True)
class Ping(Command):
    """Health check: the worker replies from its main loop with the legs it holds."""

    type: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Shutdown(Command):
    """Hang up every leg and exit cleanly."""

    type: ClassVar[str] = "shutdown"


# ----------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """Base of every worker → controller event."""

    type: ClassVar[str] = ""


@dataclass(frozen=True)
class WorkerReady(Event):
    """First message of a worker after it connects; ``capacity`` is the probed number of concurrent legs."""

    type: ClassVar[str] = "worker.ready"
    worker_id: str
    sip_host: str
    sip_port: int
    capacity: int
    engine: str
    pjsip_version: str
    rtp_ports: str
    pid: int


@dataclass(frozen=True)
class LegIncoming(Event):
    """An INVITE reached the worker (RFC 3261 §13.3); the worker has sent only 100 and assigned ``leg``.

    ``identity`` is the value of X-Softswitch-Identity set by the edge ("" if none); ``headers`` holds a few
    headers of interest (User-Agent, X-*, P-Asserted-Identity).
    """

    type: ClassVar[str] = "leg.incoming"
    leg: str
    sip_call_id: str
    from_uri: str
    from_display: str
    to_uri: str
    request_uri: str
    identity: str
    headers: dict[str, str]


@dataclass(frozen=True)
class LegState(Event):
    """Invite-session state change of a leg (RFC 3261 §13, §15).

    ``state`` is one of :data:`LEG_STATES`: "ringing" is 180 without media, "early" is 183 or 180 with SDP.
    ``sip_code`` is the final code or the BYE's cause, ``reason`` its phrase; ``released_by`` ("local",
    "remote", "system") is set on "disconnected".
    """

    type: ClassVar[str] = "leg.state"
    leg: str
    state: str
    sip_code: int
    reason: str
    sip_call_id: str
    released_by: str = ""


@dataclass(frozen=True)
class LegMedia(Event):
    """Audio media of the leg became active (``True``) or inactive; ``held`` when it is inactive because
    the phone put the call on hold (a ``sendonly`` or ``inactive`` offer, RFC 3264 §8.4)."""

    type: ClassVar[str] = "leg.media"
    leg: str
    active: bool
    held: bool = False


@dataclass(frozen=True)
class LegDtmf(Event):
    """A DTMF digit received on the leg (``method`` "rfc4733" per RFC 4733 or "info" for SIP INFO)."""

    type: ClassVar[str] = "leg.dtmf"
    leg: str
    digit: str
    method: str
    duration_ms: int = 0  # 0 when the library does not know it (an RFC 4733 event is reported at its start)


@dataclass(frozen=True)
class LegTransfer(Event):
    """The phone on ``leg`` sent REFER (RFC 3515, a blind transfer): the worker answered 202 and placed
    ``new_leg`` to ``target`` (the Refer-To URI) through the edge; the REFER's NOTIFYs report that leg's
    progress to the phone (RFC 3515 §2.4.5, sipfrag)."""

    type: ClassVar[str] = "leg.transfer"
    leg: str
    new_leg: str
    target: str


@dataclass(frozen=True)
class LegReplaced(Event):
    """An INVITE with ``Replaces`` (RFC 3891) took the place of ``leg``: the worker answered the new one,
    ``new_leg`` (an incoming leg like any, but announced by this event instead of ``leg.incoming``), and
    ends ``leg`` (BYE)."""

    type: ClassVar[str] = "leg.replaced"
    leg: str
    new_leg: str
    sip_call_id: str
    from_uri: str


@dataclass(frozen=True)
class PlayerDone(Event):
    """A non-looping :class:`Play` reached the end of its last file."""

    type: ClassVar[str] = "player.done"
    leg: str


# ------------------------------------------------------------------------------------------------ reply


@dataclass(frozen=True)
class Reply:
    """The answer to command ``id``: ``result`` when ``ok``, else ``error_code``/``error_message``."""

    id: int
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""

    @classmethod
    def success(cls, id: int, result: dict[str, Any] | None = None) -> Reply:
        return cls(id=id, ok=True, result=dict(result or {}))

    @classmethod
    def failure(cls, id: int, code: str, message: str) -> Reply:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        return cls(id=id, ok=False, error_code=code, error_message=message)

    def raise_for_error(self) -> dict[str, Any]:
        """Return ``result``, or raise :class:`CommandError` for a failed command."""
        if not self.ok:
            raise CommandError(self.error_code, self.error_message)
        return self.result


COMMAND_TYPES: Final[dict[str, type[Command]]] = {
    c.type: c
    for c in (
        Answer,
        Reject,
        Originate,
        Bridge,
        Unbridge,
        Listen,
        Unlisten,
        Record,
        StopRecord,
        Hangup,
        Play,
        StopPlay,
        Tone,
        StopTone,
        Echo,
        SendDtmf,
        Ping,
        Shutdown,
    )
}
EVENT_TYPES: Final[dict[str, type[Event]]] = {
    e.type: e
    for e in (WorkerReady, LegIncoming, LegState, LegMedia, LegDtmf, LegTransfer, LegReplaced, PlayerDone)
}

Message: TypeAlias = Command | Event | Reply

# ------------------------------------------------------------------------------------------------ codec


def encode(msg: Message) -> bytes:
    """Serialize one message as a JSON line (with the trailing newline).

    Raises :class:`ProtocolError` if the line would exceed :data:`MAX_FRAME`.
    """
    obj: dict[str, Any]
    if isinstance(msg, Command):
        if msg.type not in COMMAND_TYPES:
            raise TypeError(f"not a protocol command: {type(msg).__name__}")
        args = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "id"}
        obj = {"v": PROTOCOL_VERSION, "kind": "cmd", "id": msg.id, "type": msg.type, "args": args}
    elif isinstance(msg, Event):
        if msg.type not in EVENT_TYPES:
            raise TypeError(f"not a protocol event: {type(msg).__name__}")
        data = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
        obj = {"v": PROTOCOL_VERSION, "kind": "event", "type": msg.type, "data": data}
    elif isinstance(msg, Reply):
        obj = {"v": PROTOCOL_VERSION, "kind": "reply", "id": msg.id, "ok": msg.ok}
        if msg.ok:
            obj["result"] = msg.result
        else:
            obj["error"] = {"code": msg.error_code, "message": msg.error_message}
    else:
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if len(line) > MAX_FRAME:
        raise ProtocolError(f"{obj['kind']} frame of {len(line)} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    return line


def decode(line: bytes) -> Message:
    """Parse and validate one frame (trailing ``\\n``/``\\r\\n`` optional).

    Raises :class:`ProtocolError` naming what is wrong: size, JSON syntax, envelope, version, type or field.
    """
    if len(line) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(line)} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    try:
        text = line.decode("utf-8")  # json.loads(bytes) would also guess UTF-16/32: the protocol is UTF-8
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must be a JSON object, got {_json_kind(obj)}")
    version = obj.get("v")
    if "v" not in obj:
        raise ProtocolError("missing envelope field 'v'")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(f"unsupported protocol version {version!r} (expected {PROTOCOL_VERSION})")
    kind = obj.get("kind")
    if kind == "cmd":
        _check_envelope(obj, {"v", "kind", "id", "type", "args"})
        msg_id = _envelope_id(obj)
        cmd_cls = COMMAND_TYPES.get(_envelope_type(obj))
        if cmd_cls is None:
            raise ProtocolError(f"unknown command type {obj['type']!r}")
        kwargs = _fields(cmd_cls, obj.get("args"), "args", skip={"id"})
        return cmd_cls(**kwargs, id=msg_id)
    if kind == "event":
        _check_envelope(obj, {"v", "kind", "type", "data"})
        ev_cls = EVENT_TYPES.get(_envelope_type(obj))
        if ev_cls is None:
            raise ProtocolError(f"unknown event type {obj['type']!r}")
        return ev_cls(**_fields(ev_cls, obj.get("data"), "data", skip=set()))
    if kind == "reply":
        return _decode_reply(obj)
    if "kind" not in obj:
        raise ProtocolError("missing envelope field 'kind'")
    raise ProtocolError(f"unknown frame kind {kind!r} (expected 'cmd', 'reply' or 'event')")


class FrameDecoder:
    """Split a byte stream into frames (sans-IO): ``feed(data)`` returns the complete messages.

    Raises :class:`ProtocolError` as soon as a line exceeds :data:`MAX_FRAME`, even before its newline
    arrives, so a peer cannot make the receiver buffer without bound.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        start = 0
        while True:
            nl = self._buf.find(b"\n", start)
            if nl < 0:
                break
            if nl + 1 - start > MAX_FRAME:
                raise ProtocolError(f"frame of {nl + 1 - start} bytes exceeds MAX_FRAME ({MAX_FRAME})")
            line = bytes(self._buf[start : nl + 1])
            start = nl + 1
            if line.strip():
                out.append(decode(line))
        del self._buf[:start]
        if len(self._buf) > MAX_FRAME:
            raise ProtocolError(f"unterminated frame longer than MAX_FRAME ({MAX_FRAME})")
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


# ------------------------------------------------------------------------------------------- internals

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _check_envelope(obj: dict[str, Any], allowed: set[str]) -> None:
    missing = sorted(allowed - obj.keys())
    if missing:
        raise ProtocolError(f"{obj['kind']} frame: missing envelope field {missing[0]!r}")
    extra = sorted(obj.keys() - allowed)
    if extra:
        raise ProtocolError(f"{obj['kind']} frame: unknown envelope field {extra[0]!r}")


def _envelope_id(obj: dict[str, Any]) -> int:
    msg_id = obj["id"]
    if not isinstance(msg_id, int) or isinstance(msg_id, bool) or msg_id < 0:
        raise ProtocolError(f"{obj['kind']} frame: 'id' must be a non-negative integer, got {msg_id!r}")
    return msg_id


def _envelope_type(obj: dict[str, Any]) -> str:
    name = obj["type"]
    if not isinstance(name, str):
        raise ProtocolError(f"{obj['kind']} frame: 'type' must be a string, got {_json_kind(name)}")
    return name


def _decode_reply(obj: dict[str, Any]) -> Reply:
    ok = obj.get("ok")
    if "ok" not in obj:
        raise ProtocolError("reply frame: missing envelope field 'ok'")
    if not isinstance(ok, bool):
        raise ProtocolError(f"reply frame: 'ok' must be a boolean, got {_json_kind(ok)}")
    _check_envelope(obj, {"v", "kind", "id", "ok", "result"} if ok else {"v", "kind", "id", "ok", "error"})
    msg_id = _envelope_id(obj)
    if ok:
        result = obj["result"]
        if not isinstance(result, dict):
            raise ProtocolError(f"reply frame: 'result' must be an object, got {_json_kind(result)}")
        return Reply(id=msg_id, ok=True, result=result)
    error = obj["error"]
    if not isinstance(error, dict):
        raise ProtocolError(f"reply frame: 'error' must be an object, got {_json_kind(error)}")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or code not in ERROR_CODES:
        raise ProtocolError(f"reply frame: error.code must be one of {sorted(ERROR_CODES)}, got {code!r}")
    if not isinstance(message, str):
        raise ProtocolError(f"reply frame: error.message must be a string, got {_json_kind(message)}")
    extra = sorted(error.keys() - {"code", "message"})
    if extra:
        raise ProtocolError(f"reply frame: unknown error field {extra[0]!r}")
    return Reply(id=msg_id, ok=False, error_code=code, error_message=message)


def _fields(cls: type, payload: object, where: str, skip: set[str]) -> dict[str, Any]:
    """Validate ``payload`` against the dataclass fields of ``cls`` and return constructor kwargs."""
    name = cls.type  # type: ignore[attr-defined]
    if not isinstance(payload, dict):
        raise ProtocolError(f"{name}: '{where}' must be an object, got {_json_kind(payload)}")
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    extra = sorted(payload.keys() - known.keys())
    if extra:
        raise ProtocolError(f"{name}: unknown field {where}.{extra[0]}")
    out: dict[str, Any] = {}
    for fname, f in known.items():
        if fname not in payload:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{name}: missing field {where}.{fname}")
            continue
        out[fname] = _check_value(payload[fname], hints[fname], f"{name}: {where}.{fname}")
    return out


def _check_value(value: object, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is str:
        if isinstance(value, str):
            return value
        expected = "a string"
    elif hint is bool:
        if isinstance(value, bool):
            return value
        expected = "a boolean"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    elif origin is list and typing.get_args(hint) == (str,):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        expected = "an array of strings"
    elif origin is dict and typing.get_args(hint) == (str, str):
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return dict(value)
        expected = "an object of strings"
    else:  # pragma: no cover - a field type added without codec support
        raise TypeError(f"unsupported field type {hint!r}")
    raise ProtocolError(f"{where} must be {expected}, got {_json_kind(value)}")
