"""Header grammar (RFC 3261 §7.3, §20, §25): names, comma lists, Via, name-addr, auth, CSeq."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from softswitch.sip.errors import SipParseError
from softswitch.sip.uri import Params, SipUri, join_params, parse_uri

#: RFC 3261 §7.3.3 and the registry of compact forms.
COMPACT_FORMS: dict[str, str] = {
    "v": "Via", "f": "From", "t": "To", "i": "Call-ID", "m": "Contact", "l": "Content-Length",
    "c": "Content-Type", "e": "Content-Encoding", "k": "Supported", "s": "Subject", "o": "Event",
    "r": "Refer-To", "b": "Referred-By", "u": "Allow-Events", "x": "Session-Expires",
    "a": "Accept-Contact", "j": "Reject-Contact", "d": "Request-Disposition", "y": "Identity",
    "n": "Identity-Info",
}  # fmt: skip

#: Headers whose values may be comma-separated lists (RFC 3261 §7.3.1).
MULTI_VALUE: frozenset[str] = frozenset(
    {
        "via", "contact", "route", "record-route", "allow", "supported", "require", "proxy-require",
        "unsupported", "accept", "accept-encoding", "accept-language", "allow-events",
        "content-encoding", "in-reply-to", "path", "service-route",
    }
)  # fmt: skip

_PRETTY: dict[str, str] = {
    "call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version", "rack": "RAck", "rseq": "RSeq", "sip-etag": "SIP-ETag",
    "sip-if-match": "SIP-If-Match",
    "p-asserted-identity": "P-Asserted-Identity",
}  # fmt: skip

_TOKEN = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
#: RFC 3261 §25.1 quoted-string: DQUOTE *(qdtext / quoted-pair) DQUOTE.
_QUOTED_STRING = re.compile(r'^"(?:[^"\\]|\\.)*"$', re.S)
#: Linear white space separating the parts of a CSeq value or an auth scheme from its parameters.
_LWS = re.compile(r"[ \t]+")
#: Digits of a CSeq sequence number: RFC 3261 §8.1.1.5 keeps it below 2**31, ten digits at most.
MAX_CSEQ_DIGITS = 10


@functools.lru_cache(maxsize=1024)  # header names repeat: a few dozen distinct ones in practice
def canonical_name(name: str) -> str:
    """Compact form → long form, lower-cased: the key headers are compared by."""
    name = name.strip()
    if len(name) == 1:
        name = COMPACT_FORMS.get(name.lower(), name)
    return name.lower()


def pretty_name(canonical: str) -> str:
    """Conventional spelling of a header name for headers we write."""
    key = canonical_name(canonical)
    if key in _PRETTY:
        return _PRETTY[key]
    return "-".join(p[:1].upper() + p[1:] for p in key.split("-"))


def is_token(text: str) -> bool:
    return bool(_TOKEN.match(text))


def is_digits(text: str) -> bool:
    """1*DIGIT of RFC 3261 §25.1: ASCII digits only (str.isdigit also accepts other scripts' digits)."""
    return text.isascii() and text.isdigit()


def _split_outside(value: str, sep: str, *, angle: bool) -> list[str]:
    """Split on `sep` outside quoted strings (and outside <...> when `angle`)."""
    if '"' not in value and (not angle or "<" not in value):
        return value.split(sep)  # the common case, without the character loop
    parts: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    start = 0
    for i, ch in enumerate(value):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif angle and ch == "<":
            depth += 1
        elif angle and ch == ">":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    if quoted:
        raise SipParseError("Unbalanced quotes")
    parts.append(value[start:])
    return parts


def split_values(value: str) -> list[str]:
    """Values of a comma-separated header (commas in quotes or <> do not split)."""
    return [p.strip() for p in _split_outside(value, ",", angle=True) if p.strip()]


def parse_params(text: str) -> Params:
    """';a=b;c' → [('a','b'), ('c', None)]; quoted values keep their quotes."""
    out: Params = []
    for part in _split_outside(text, ";", angle=False):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not name or not is_token(name):
            raise SipParseError("Bad header parameter")
        out.append((name, value.strip() if eq else None))
    return out


def _find(params: Params, name: str) -> str | None:
    lname = name.lower()
    for k, v in params:
        if k.lower() == lname:
            return "" if v is None else v
    return None


def _set(params: Params, name: str, value: str | None) -> None:
    lname = name.lower()
    for i, (k, _) in enumerate(params):
        if k.lower() == lname:
            params[i] = (k, value)
            return
    params.append((name, value))


@dataclass
class Via:
    """One Via value (RFC 3261 §20.42)."""

    protocol: str
    transport: str
    host: str
    port: int | None
    params: Params = field(default_factory=list)

    def param(self, name: str) -> str | None:
        return _find(self.params, name)

    def has_param(self, name: str) -> bool:
        return _find(self.params, name) is not None

    def set_param(self, name: str, value: str | None) -> None:
        _set(self.params, name, value)

    @property
    def branch(self) -> str | None:
        return self.param("branch")

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.protocol}/{self.transport} {self.host}{port}{join_params(self.params)}"


_VIA = re.compile(
    r"^[ \t]*([A-Za-z0-9.!%*_+`'~-]+)[ \t]*/[ \t]*([0-9.]+)[ \t]*/[ \t]*([A-Za-z0-9.!%*_+`'~-]+)[ \t]+"
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?[ \t]*(;.*)?$",
    re.S,
)


def parse_via(value: str) -> Via:
    """One Via value, not a list (RFC 3261 §20.42, §25.1 via-parm)."""
    m = _VIA.match(value)
    if not m:
        raise SipParseError("Bad Via header")
    name, version, transport, host, port, params = m.groups()
    if port is not None and not 0 < int(port) < 65536:
        raise SipParseError("Bad Via header")
    try:
        parsed = parse_params(params or "")
    except SipParseError:
        raise SipParseError("Bad Via header") from None
    return Via(f"{name.upper()}/{version}", transport.upper(), host, int(port) if port else None, parsed)


def unquote(text: str) -> str:
    """The content of a quoted-string with its quoted-pairs resolved (RFC 3261 §25.1)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1], flags=re.S)
    return text


def quote(text: str) -> str:
    """A quoted-string for `text` (RFC 3261 §25.1): `"` and `\\` and control characters become
    quoted-pairs; CR and LF, which no quoted-pair can carry, become spaces so that a value can never
    end the header line."""
    text = text.replace("\r", " ").replace("\n", " ")
    return '"' + re.sub(r'(["\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f])', r"\\\1", text) + '"'


@dataclass
class NameAddr:
    """name-addr / addr-spec with header parameters (From, To, Contact, Route, Refer-To …)."""

    display_name: str | None
    uri: SipUri
    params: Params = field(default_factory=list)
    bracketed: bool = True

    def param(self, name: str) -> str | None:
        return _find(self.params, name)

    def has_param(self, name: str) -> bool:
        return _find(self.params, name) is not None

    def set_param(self, name: str, value: str | None) -> None:
        _set(self.params, name, value)

    @property
    def tag(self) -> str | None:
        return self.param("tag")

    def __str__(self) -> str:
        uri = str(self.uri)
        needs_brackets = (
            self.bracketed or self.display_name is not None or bool(self.uri.params) or bool(self.uri.headers)
        )
        out = ""
        if self.display_name is not None:
            out = (
                self.display_name
                if is_token(self.display_name.replace(" ", "")) and self.display_name
                else quote(self.display_name)
            ) + " "
        out += f"<{uri}>" if needs_brackets else uri
        return out + join_params(self.params)


def parse_name_addr(value: str, *, header_name: str = "Contact") -> NameAddr:
    """RFC 3261 §20.10 / §25.1 name-addr or addr-spec, with header parameters.

    Strict where the grammar leaves no doubt: no LWS inside `<...>` (LAQUOT/RAQUOT, RFC 4475
    §3.1.2.14), a display name is tokens or one quoted-string (§3.1.2.15), and an addr-spec holding a
    `,` or `?` must have been written as a name-addr (§20.10; RFC 4475 §3.1.2.13).
    """
    bad = f"Bad {header_name} header"
    text = value.strip()
    if not text:
        raise SipParseError(bad)
    try:
        lt = _angle_start(text)
        if lt >= 0:
            display = text[:lt].strip()
            gt = text.find(">", lt)
            if gt < 0:
                raise SipParseError(bad)
            inner = text[lt + 1 : gt]
            if inner != inner.strip(" \t"):
                raise SipParseError(bad)
            uri = parse_uri(inner)
            after = text[gt + 1 :].strip()
            if after and not after.startswith(";"):
                raise SipParseError(bad)
            params = parse_params(after)
            name: str | None
            if display.startswith('"'):
                if not _QUOTED_STRING.match(display):
                    raise SipParseError(bad)
                name = unquote(display)
            elif display:
                if not all(is_token(t) for t in display.split()):
                    raise SipParseError(bad)
                name = " ".join(display.split())
            else:
                name = None
            return NameAddr(name, uri, params, True)
        # addr-spec: parameters after the URI belong to the header (RFC 3261 §20.10).
        uri_text, _, params_text = text.partition(";")
        uri_text = uri_text.strip()
        if any(c in uri_text for c in ' \t",?'):
            raise SipParseError(bad)
        uri = parse_uri(uri_text)
        return NameAddr(None, uri, parse_params(params_text), False)
    except SipParseError as e:
        if e.reason == bad:
            raise
        raise SipParseError(bad) from None


def _angle_start(text: str) -> int:
    """Index of the first `<` outside a quoted string, -1 when there is none."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            return i
    if quoted:
        raise SipParseError("Unbalanced quotes")
    return -1


def parse_auth(value: str) -> tuple[str, dict[str, str]]:
    """'Digest a="b", c=d' → ('Digest', {'a': 'b', 'c': 'd'}) (RFC 3261 §25.1 auth grammar)."""
    text = value.strip()
    scheme, rest = [*_LWS.split(text, maxsplit=1), ""][:2]
    if not scheme or not is_token(scheme):
        raise SipParseError("Bad Authorization header")
    params: dict[str, str] = {}
    try:
        parts = _split_outside(rest, ",", angle=False)
    except SipParseError:
        raise SipParseError("Bad Authorization header") from None
    for part in parts:
        part = part.strip()
        if not part:
            continue
        name, eq, val = part.partition("=")
        name = name.strip().lower()
        if not eq or not is_token(name):
            raise SipParseError("Bad Authorization header")
        params[name] = unquote(val)
    return scheme, params


def format_auth(scheme: str, params: list[tuple[str, str, bool]]) -> str:
    body = ", ".join(f"{n}={quote(v) if q else v}" for n, v, q in params)
    return f"{scheme} {body}"


def parse_cseq(value: str) -> tuple[int, str]:
    """RFC 3261 §20.16: sequence number (< 2**31, §8.1.1.5) and method."""
    parts = _LWS.split(value.strip(" \t"))
    if len(parts) != 2 or not is_digits(parts[0]) or not is_token(parts[1]):
        raise SipParseError("Bad CSeq header")
    if len(parts[0]) > MAX_CSEQ_DIGITS:
        raise SipParseError("Bad CSeq header")
    number = int(parts[0])
    if number >= 2**31:
        raise SipParseError("Bad CSeq header")
    return number, parts[1]
