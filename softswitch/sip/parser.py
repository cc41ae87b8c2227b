"""Parsing SIP messages from bytes (RFC 3261 §7, §25) and framing them on streams (§18.3).

Any byte string gives a message or a `SipParseError` whose reason names the problem, never another
exception (the hypothesis tests hold the parser to that).
"""

from __future__ import annotations

import contextlib
import re

from softswitch.sip.errors import SipError, SipParseError
from softswitch.sip.headers import (
    MULTI_VALUE,
    canonical_name,
    is_digits,
    is_token,
    parse_cseq,
    parse_name_addr,
    parse_via,
    pretty_name,
    split_values,
)
from softswitch.sip.message import (
    MAX_HEADER_COUNT,
    MAX_HEADER_LINE,
    MAX_MESSAGE_SIZE,
    MAX_VIA_COUNT,
    Header,
    SipMessage,
    SipRequest,
    SipResponse,
)
from softswitch.sip.uri import SipUri, parse_uri

#: RFC 3261 §7.2 Status-Line; the SP before an empty Reason-Phrase may be missing (RFC 4475 §3.1.1.13).
_STATUS_LINE = re.compile(rb"^SIP/([0-9]+\.[0-9]+) ([0-9]{3})(?: (.*))?$", re.S)
#: RFC 3261 §7.1 Request-Line: single SPs, nothing after the version (RFC 4475 §3.1.2.8-10).
_REQUEST_LINE = re.compile(rb"^([^ \t\r\n]+) ([^ \t\r\n]+) SIP/([0-9]+\.[0-9]+)$")
_LENIENT_VERSION = re.compile(rb"^SIP/[0-9]+\.[0-9]+$")
#: What a start line looks like on a stream, to find the next message after garbage (§18.3).
_START_LINE = re.compile(
    rb"^(SIP/[0-9]+\.[0-9]+ [0-9]{3}(?: |\r?$)|[A-Za-z0-9.!%*_+`'~-]+ \S+ SIP/[0-9]+\.[0-9]+\r?$)", re.M
)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
#: RFC 5626 §3.5.1 keep-alive ping on a stream; the answer (pong) is a single CRLF.
_PING = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\S*)[ \t]*\r?$", re.I | re.M)
#: Digits of a Content-Length worth reading: anything longer exceeds MAX_MESSAGE_SIZE anyway.
_MAX_LENGTH_DIGITS = 10
#: Request-URI of a request whose own could not be read, kept only to address a 400.
_UNREADABLE_URI = "sip:invalid.invalid"


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    m = _HEADER_END.search(data)
    if m is None:
        return data, b""
    return data[: m.start()], data[m.end() :]


def _header_lines(head: bytes) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]


def parse_message(data: bytes) -> SipRequest | SipResponse:
    """Parse one complete message (a datagram, or one message framed from a stream)."""
    try:
        return _parse(data)
    except SipParseError:
        raise
    except SipError as e:
        raise SipParseError(e.reason) from None
    except (ValueError, IndexError, UnicodeError) as e:
        raise SipParseError(f"Malformed message ({type(e).__name__})") from None


def _parse(data: bytes) -> SipRequest | SipResponse:
    data = data.lstrip(b"\r\n")  # RFC 3261 §7.5: CRLFs before the start line are ignored
    if not data:
        raise SipParseError("Empty message")
    head, body = _split_head(data)
    lines = _header_lines(head)
    message = _start_line(lines[0], lines[1:])
    if len(data) > MAX_MESSAGE_SIZE:
        _read_headers_leniently(message, lines[1:])
        raise SipParseError("Message Too Large", message, status=513)
    _read_headers(message, lines[1:])
    if message.version != "SIP/2.0":
        raise SipParseError("Version Not Supported", message, status=505)
    try:
        _validate(message)
    except SipParseError as e:
        if e.message is None:
            raise SipParseError(e.reason, message, e.status) from None
        raise
    message.body = _frame_body(message, body)
    return message


def _start_line(start: bytes, header_lines: list[bytes]) -> SipRequest | SipResponse:
    """RFC 3261 §7.1 Request-Line or §7.2 Status-Line; errors carry what can be read of the rest."""
    if start.startswith(b"SIP/"):
        m = _STATUS_LINE.match(start)
        if not m:
            raise SipParseError("Bad status line")  # responses are dropped, never answered
        version, status, reason = m.groups()
        response = SipResponse(int(status), _decode(reason or b""), [], b"", f"SIP/{version.decode()}")
        if not 100 <= response.status <= 699:
            raise SipParseError("Bad status code")
        return response
    r = _REQUEST_LINE.match(start)
    if not r:
        raise SipParseError("Bad request line", _lenient_request(start, header_lines))
    method_b, uri_b, version = r.groups()
    method = _decode(method_b)
    if not is_token(method):
        raise SipParseError("Bad method")
    uri_text = _decode(uri_b)
    uri: SipUri | None
    try:
        uri = parse_uri(uri_text)
    except SipParseError:
        uri = None
    request = SipRequest(method, uri or parse_uri(_UNREADABLE_URI), [], b"", f"SIP/{version.decode()}")
    request.raw_uri = uri_text
    if uri is None:
        _read_headers_leniently(request, header_lines)
        raise SipParseError("Bad Request-URI", request)
    if uri.headers:
        # RFC 3261 §19.1.1 (table): headers are not allowed in a Request-URI (RFC 4475 §3.1.2.11).
        _read_headers_leniently(request, header_lines)
        raise SipParseError("Headers not allowed in Request-URI", request)
    return request


def _lenient_request(start: bytes, header_lines: list[bytes]) -> SipRequest | None:
    """A Request-Line with extra or embedded whitespace (RFC 4475 §3.1.2.8-10) cannot be processed,
    but its method and headers can still be read so that the 400 reaches the sender."""
    words = start.split()
    if len(words) < 3 or not _LENIENT_VERSION.match(words[-1]) or not is_token(_decode(words[0])):
        return None
    request = SipRequest(_decode(words[0]), _UNREADABLE_URI)
    request.raw_uri = _decode(b" ".join(words[1:-1]))
    _read_headers_leniently(request, header_lines)
    return request


def _read_headers_leniently(message: SipMessage, lines: list[bytes]) -> None:
    """Read what headers can be read; the caller is already reporting a more important error."""
    with contextlib.suppress(SipParseError):
        _read_headers(message, lines)


def _read_headers(message: SipMessage, lines: list[bytes]) -> None:
    """RFC 3261 §7.3: header lines, unfolded (§7.3.1), each keeping its bytes for forwarding."""
    headers: list[Header] = []
    current: list[bytes] = []
    size = 0

    def flush() -> None:
        if not current:
            return
        raw = b"\r\n".join(current)
        text = _decode(b" ".join(part.strip(b" \t") for part in current))
        name, colon, value = text.partition(":")
        name = name.rstrip(" \t")
        if not colon or not name or not is_token(name):
            message.headers = headers
            raise SipParseError("Bad header line", message)
        headers.append(Header(name, value.strip(" \t"), raw))
        current.clear()

    for line in lines:
        if line[:1] in (b" ", b"\t") and current:
            size += len(line)
            if size > MAX_HEADER_LINE:
                message.headers = headers
                raise SipParseError("Header line too long", message)
            current.append(line)  # RFC 3261 §7.3.1 folding
            continue
        flush()
        if len(headers) >= MAX_HEADER_COUNT:
            message.headers = headers
            raise SipParseError("Too many headers", message)
        size = len(line)
        if size > MAX_HEADER_LINE:
            message.headers = headers
            raise SipParseError("Header line too long", message)
        if line:
            current.append(line)
    flush()
    message.headers = headers


def _validate(message: SipRequest | SipResponse) -> None:
    """Mandatory headers of RFC 3261 §8.1.1 and the syntax of those the edge relies on."""
    for h in message.headers:
        if h.key in MULTI_VALUE:
            try:
                split_values(h.value)
            except SipParseError:
                raise SipParseError(f"Bad {pretty_name(h.key)} header", message) from None
    vias = message.get_all("via")
    if not vias:
        raise SipParseError("Missing Via header", message)
    if len(vias) > MAX_VIA_COUNT:
        raise SipParseError("Too many Via headers", message)
    for value in vias:
        parse_via(value)
    for name, pretty in (("from", "From"), ("to", "To")):
        values = message.get_all(name)
        if not values:
            raise SipParseError(f"Missing {pretty} header", message)
        if len(values) > 1:
            raise SipParseError(f"Multiple {pretty} headers", message)
        parse_name_addr(values[0], header_name=pretty)
    call_ids = message.get_all("call-id")
    if not call_ids:
        raise SipParseError("Missing Call-ID header", message)
    if len(call_ids) > 1 or not call_ids[0] or any(c in call_ids[0] for c in " \t"):
        raise SipParseError("Bad Call-ID header", message)
    cseqs = message.get_all("cseq")
    if not cseqs:
        raise SipParseError("Missing CSeq header", message)
    if len(cseqs) > 1:
        raise SipParseError("Multiple CSeq headers", message)
    _, method = parse_cseq(cseqs[0])
    if isinstance(message, SipRequest):
        if method != message.method:
            raise SipParseError("CSeq method does not match the request method", message)
        message.max_forwards  # noqa: B018 - validates the value
    for value in message.get_all("contact"):
        if value.strip() != "*":
            parse_name_addr(value, header_name="Contact")
    message.expires  # noqa: B018 - validates the value


def _frame_body(message: SipMessage, body: bytes) -> bytes:
    """RFC 3261 §18.3: Content-Length bounds the body; extra datagram bytes are dropped."""
    lengths = {v.strip() for v in message.get_all("content-length")}
    if not lengths:
        return body
    if len(lengths) > 1:
        raise SipParseError("Conflicting Content-Length headers", message)
    (value,) = lengths
    if not is_digits(value) or len(value.lstrip("0")) > _MAX_LENGTH_DIGITS:
        raise SipParseError("Bad Content-Length header", message)
    length = int(value)
    if length > len(body):
        raise SipParseError("Content-Length exceeds body", message)
    return body[:length]


def _partial(head: bytes) -> SipMessage | None:
    """What can be read of a header block, to address a 400 (None if not even that)."""
    try:
        return parse_message(head + b"\r\n\r\n")
    except SipParseError as e:
        return e.message
    except Exception:
        return None


class StreamFramer:
    """Splits a TCP byte stream into messages by Content-Length (RFC 3261 §18.3)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes | SipParseError]:
        self._buffer += data
        out: list[bytes | SipParseError] = []
        while True:
            item = self._next()
            if item is None:
                return out
            out.append(item)

    def _next(self) -> bytes | SipParseError | None:
        buf = self._buffer
        # Keep-alives between messages (RFC 5626 §3.5.1): CRLFCRLF ping, or stray CRLFs.
        while buf.startswith((b"\r", b"\n")):
            if buf[:4] == _PING:
                del buf[:4]
                return _PING
            if len(buf) < 4 and _PING.startswith(bytes(buf)):
                return None  # maybe a ping split across reads
            if buf[:2] == b"\r\n":
                del buf[:2]
            elif buf[:1] == b"\n":
                del buf[:1]
            else:
                break  # a lone CR: the start line check below rejects it
        if not buf:
            return None
        m = _HEADER_END.search(buf)
        if m is None:
            if len(buf) > MAX_MESSAGE_SIZE:
                return self._resync("Message Too Large", bytes(buf[:2048]), skip=len(buf))
            return None
        head = bytes(buf[: m.start()])
        if m.start() > MAX_MESSAGE_SIZE:
            return self._resync("Message Too Large", head, skip=m.end())
        if not _START_LINE.match(head):
            later = _START_LINE.search(head)
            if later is not None:
                # Garbage, then a start line: drop only the garbage (§18.3 resynchronisation).
                del buf[: later.start()]
                return SipParseError("Bad start line")
            return self._resync("Bad start line", head, skip=m.end())
        lengths = [v.strip() for v in _CONTENT_LENGTH.findall(head)]
        if not lengths:
            return self._resync("Missing Content-Length header", head, skip=m.end())
        if len(set(lengths)) > 1 or not lengths[0].isdigit() or len(lengths[0]) > _MAX_LENGTH_DIGITS:
            return self._resync("Bad Content-Length header", head, skip=m.end())
        length = int(lengths[0])
        if m.end() + length > MAX_MESSAGE_SIZE:
            return self._resync("Message Too Large", head, skip=m.end())
        if len(buf) < m.end() + length:
            return None
        message = bytes(buf[: m.end() + length])
        del buf[: m.end() + length]
        return message

    def _resync(self, reason: str, head: bytes, *, skip: int) -> SipParseError:
        """Drop the bad part and look for the next start line (RFC 3261 §18.3)."""
        del self._buffer[:skip]
        m = _START_LINE.search(self._buffer)
        if m is None:
            # Keep a tail that could be the beginning of a start line split across reads.
            keep = self._buffer[-64:] if len(self._buffer) > 64 else self._buffer
            self._buffer = bytearray(keep if b"\n" not in keep else keep[keep.rfind(b"\n") + 1 :])
        else:
            del self._buffer[: m.start()]
        return SipParseError(reason, _partial(head))


__all__ = ["StreamFramer", "canonical_name", "parse_message", "split_values"]
