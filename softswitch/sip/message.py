"""SIP messages (RFC 3261 §7): requests and responses with ordered headers that keep their bytes.

A header that the edge does not touch is written back exactly as it arrived (`Header.raw`); a header the
edge adds or changes is written in canonical form.
"""

from __future__ import annotations

import copy as _copy
import secrets
from collections.abc import Callable
from typing import Self, TypeVar

from softswitch.sip.errors import SipParseError
from softswitch.sip.headers import (
    MULTI_VALUE,
    NameAddr,
    Via,
    canonical_name,
    is_digits,
    parse_cseq,
    parse_name_addr,
    parse_via,
    pretty_name,
    split_values,
)
from softswitch.sip.uri import SipUri, parse_uri

T = TypeVar("T")

#: Largest message accepted (start line, headers and body). UDP datagrams cannot exceed it and no SIP
#: request a phone sends comes near it; larger input is an attack or a fault (RFC 3261 §18.1.1).
MAX_MESSAGE_SIZE = 65_535
#: Most header lines in one message: real messages carry 10-40.
MAX_HEADER_COUNT = 200
#: More Via hops than Max-Forwards' default allows can only be a loop or an attack.
MAX_VIA_COUNT = 70
#: Longest header line once unfolded (RFC 3261 §7.3.1): long Via branches and Contact +sip.instance
#: values stay far below it; only padding or an attack reaches it.
MAX_HEADER_LINE = 8_192
#: Largest delta-seconds (RFC 3261 §25.1 and §20.19): larger Expires values are read as this one.
MAX_DELTA_SECONDS = 2**32 - 1

#: RFC 3261 §21 and later RFCs.
REASON_PHRASES: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued", 183: "Session Progress",
    199: "Early Dialog Terminated", 200: "OK", 202: "Accepted", 204: "No Notification",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy",
    380: "Alternative Service", 400: "Bad Request", 401: "Unauthorized", 402: "Payment Required",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    412: "Conditional Request Failed", 413: "Request Entity Too Large", 414: "Request-URI Too Long",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    421: "Extension Required", 422: "Session Interval Too Small", 423: "Interval Too Brief",
    428: "Use Identity Header", 429: "Provide Referrer Identity", 433: "Anonymity Disallowed",
    439: "First Hop Lacks Outbound Support", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 489: "Bad Event", 491: "Request Pending", 493: "Undecipherable",
    494: "Security Agreement Required", 500: "Server Internal Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 580: "Precondition Failure", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable", 607: "Unwanted",
}  # fmt: skip


def new_branch() -> str:
    """RFC 3261 §8.1.1.7: a branch with the magic cookie, unique in space and time."""
    return "z9hG4bK" + secrets.token_urlsafe(18)


def new_tag() -> str:
    """RFC 3261 §19.3: a tag with at least 32 bits of randomness."""
    return secrets.token_hex(8)


class Header:
    """One header line: the name as written, the unfolded value, and the original bytes."""

    __slots__ = ("key", "name", "raw", "value")

    def __init__(self, name: str, value: str, raw: bytes | None = None) -> None:
        self.name = name
        self.value = value
        self.raw = raw
        self.key = canonical_name(name)  # compact form expanded, lower-cased: what lookups compare

    def __repr__(self) -> str:
        return f"Header({self.name!r}, {self.value!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Header) and (self.name, self.value) == (other.name, other.value)

    def __hash__(self) -> int:
        return hash((self.name, self.value))


class SipMessage:
    """Headers and body shared by requests and responses."""

    def __init__(self, headers: list[Header] | None = None, body: bytes = b"") -> None:
        self._headers: list[Header] = headers if headers is not None else []
        self.body = body
        # Parsed header values, dropped whenever the header list changes. Parsed objects handed out
        # are snapshots: to change a header, change the object and write it back with set/add.
        self._parsed: dict[str, object] = {}

    @property
    def headers(self) -> list[Header]:
        self._parsed.clear()  # the caller may change the list in place
        return self._headers

    @headers.setter
    def headers(self, value: list[Header]) -> None:
        self._headers = value
        self._parsed.clear()

    def _cached(self, key: str, build: Callable[[], T]) -> T:
        try:
            return self._parsed[key]  # type: ignore[return-value]
        except KeyError:
            value = build()
            self._parsed[key] = value
            return value

    # -- access ---------------------------------------------------------------------------------

    def get(self, name: str) -> str | None:
        key = canonical_name(name)
        for h in self._headers:
            if h.key == key:
                return h.value
        return None

    def get_all(self, name: str) -> list[str]:
        key = canonical_name(name)
        return list(self._cached("values:" + key, lambda: self._values(key)))

    def _values(self, key: str) -> list[str]:
        out: list[str] = []
        for h in self._headers:
            if h.key == key:
                if key in MULTI_VALUE:
                    out.extend(split_values(h.value))
                else:
                    out.append(h.value)
        return out

    def has(self, name: str) -> bool:
        key = canonical_name(name)
        return any(h.key == key for h in self._headers)

    # -- changes --------------------------------------------------------------------------------

    def set(self, name: str, value: str) -> None:
        key = canonical_name(name)
        new = Header(pretty_name(key), value)
        for i, h in enumerate(self.headers):
            if h.key == key:
                self.headers[i] = new
                self.headers[i + 1 :] = [x for x in self.headers[i + 1 :] if x.key != key]
                return
        self.headers.append(new)

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        header = Header(pretty_name(canonical_name(name)), value)
        if first:
            self.headers.insert(0, header)
        else:
            self.headers.append(header)

    def insert_before(self, existing: str, name: str, value: str) -> None:
        key = canonical_name(existing)
        header = Header(pretty_name(canonical_name(name)), value)
        for i, h in enumerate(self.headers):
            if h.key == key:
                self.headers.insert(i, header)
                return
        self.headers.insert(0, header)

    def remove(self, name: str) -> int:
        key = canonical_name(name)
        before = len(self.headers)
        self.headers = [h for h in self.headers if h.key != key]
        return before - len(self.headers)

    def pop_first_value(self, name: str) -> str | None:
        key = canonical_name(name)
        for i, h in enumerate(self.headers):
            if h.key != key:
                continue
            values = split_values(h.value) if key in MULTI_VALUE else [h.value]
            if not values:
                del self.headers[i]
                continue
            first, rest = values[0], values[1:]
            if rest:
                self.headers[i] = Header(h.name, ", ".join(rest))
            else:
                del self.headers[i]
            return first
        return None

    def copy(self) -> Self:
        clone = _copy.copy(self)
        clone._parsed = {}
        clone.headers = [Header(h.name, h.value, h.raw) for h in self.headers]
        if isinstance(clone, SipRequest):
            assert isinstance(self, SipRequest)
            clone.uri = _copy.deepcopy(self.uri)
        return clone

    # -- typed accessors ------------------------------------------------------------------------

    def _required(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise SipParseError(f"Missing {pretty_name(name)} header")
        return value

    @property
    def call_id(self) -> str:
        return self._required("call-id")

    @property
    def cseq(self) -> tuple[int, str]:
        return self._cached("cseq", lambda: parse_cseq(self._required("cseq")))

    @property
    def from_(self) -> NameAddr:
        return self._cached("from", lambda: parse_name_addr(self._required("from"), header_name="From"))

    @property
    def to(self) -> NameAddr:
        return self._cached("to", lambda: parse_name_addr(self._required("to"), header_name="To"))

    @property
    def vias(self) -> list[Via]:
        return list(self._cached("vias", lambda: [parse_via(v) for v in self.get_all("via")]))

    @property
    def top_via(self) -> Via:
        return self._cached("top_via", self._top_via)

    def _top_via(self) -> Via:
        values = self.get_all("via")
        if not values:
            raise SipParseError("Missing Via header")
        return parse_via(values[0])

    @property
    def is_star_contact(self) -> bool:
        return any(v.strip() == "*" for v in self.get_all("contact"))

    @property
    def contacts(self) -> list[NameAddr]:
        return [parse_name_addr(v, header_name="Contact") for v in self.get_all("contact")]

    @property
    def max_forwards(self) -> int | None:
        """RFC 3261 §20.22: an integer 0-255 (leading zeros allowed, RFC 4475 §3.1.1.1)."""
        value = self.get("max-forwards")
        if value is None:
            return None
        digits = value.strip().lstrip("0") or "0"
        if not is_digits(value.strip()) or len(digits) > 3 or int(digits) > 255:
            raise SipParseError("Bad Max-Forwards header")
        return int(digits)

    @property
    def expires(self) -> int | None:
        """RFC 3261 §20.19 delta-seconds. Values beyond 2**32-1 read as 2**32-1: RFC 4475 §3.1.2.4
        leaves the choice to the element, and the registrar caps the result at its own maximum."""
        value = self.get("expires")
        if value is None:
            return None
        value = value.strip()
        if not is_digits(value):
            raise SipParseError("Bad Expires header")
        digits = value.lstrip("0") or "0"
        return MAX_DELTA_SECONDS if len(digits) > 10 else min(int(digits), MAX_DELTA_SECONDS)

    # -- serialization --------------------------------------------------------------------------

    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Start line, headers (original bytes when untouched), Content-Length, CRLF, body.

        Text is written back with the octets it was read from (`surrogateescape`), so a reason phrase
        or URI that is not valid UTF-8 is forwarded as received rather than failing the message."""
        parts = [_encode(self.start_line())]
        wrote_length = False
        for h in self.headers:
            if h.key == "content-length":
                if wrote_length:
                    continue
                parts.append(f"Content-Length: {len(self.body)}".encode())
                wrote_length = True
            elif h.raw is not None:
                parts.append(h.raw)
            else:
                parts.append(_encode(f"{h.name}: {h.value}"))
        if not wrote_length:
            parts.append(f"Content-Length: {len(self.body)}".encode())
        return b"\r\n".join(parts) + b"\r\n\r\n" + self.body


def _encode(text: str) -> bytes:
    """UTF-8 (RFC 3261 §7.3.1), giving back the original octets of text the parser could not decode."""
    return text.encode("utf-8", errors="surrogateescape")


class SipRequest(SipMessage):
    """A request: method, Request-URI, headers and body."""

    def __init__(
        self,
        method: str,
        uri: SipUri | str,
        headers: list[Header] | None = None,
        body: bytes = b"",
        version: str = "SIP/2.0",
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri if isinstance(uri, SipUri) else parse_uri(uri)
        self.raw_uri = str(uri)
        self.version = version

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def __repr__(self) -> str:
        return f"<SipRequest {self.method} {self.uri}>"


class SipResponse(SipMessage):
    """A response: status code, reason phrase, headers and body."""

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[Header] | None = None,
        body: bytes = b"",
        version: str = "SIP/2.0",
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason
        self.version = version

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<SipResponse {self.status} {self.reason}>"


def _has_tag(to_value: str) -> bool:
    """Whether a To value already carries a tag (RFC 3261 §8.2.6.2): a header parameter, not a `tag`
    parameter of the URI inside <>."""
    try:
        return parse_name_addr(to_value, header_name="To").tag is not None
    except SipParseError:
        return ";tag=" in to_value.replace(" ", "").lower()


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
) -> SipResponse:
    """RFC 3261 §8.2.6: a response copying Via (all, in order), From, To, Call-ID and CSeq."""
    out: list[Header] = []
    for h in request.headers:
        if h.key in ("via", "from", "call-id", "cseq"):
            out.append(Header(h.name, h.value, h.raw))
        elif h.key == "to":
            if to_tag is not None and not _has_tag(h.value):
                out.append(Header(h.name, f"{h.value};tag={to_tag}"))
            else:
                out.append(Header(h.name, h.value, h.raw))
    response = SipResponse(status, reason or REASON_PHRASES.get(status, "Unknown"), out)
    for name, value in headers:
        response.add(name, value)
    return response
