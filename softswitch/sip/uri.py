"""SIP and tel URIs (RFC 3261 §19.1, RFC 3966), parsed and serialized without loss of order."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from softswitch.sip.errors import SipParseError

Params = list[tuple[str, str | None]]

#: Characters that may not appear in an unbracketed URI part of a SIP message at all.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>\"]")
#: RFC 3261 §25.1 host: IPv6reference, hostname or IPv4address (ASCII digits only).
_HOST = re.compile(
    r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\.?|[0-9]{1,3}(?:\.[0-9]{1,3}){3})$"
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
_PORT = re.compile(r"^[0-9]{1,5}$")


def split_params(text: str) -> Params:
    """';a=b;c' (leading ';' optional) → [('a', 'b'), ('c', None)], order kept."""
    out: Params = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        out.append((name.strip(), value.strip() if eq else None))
    return out


def join_params(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def _find_param(params: Params, name: str) -> str | None:
    lname = name.lower()
    for k, v in params:
        if k.lower() == lname:
            return "" if v is None else v
    return None


@dataclass
class SipUri:
    """A sip:, sips: or tel: URI."""

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None
    params: Params = field(default_factory=list)
    headers: str = ""

    def param(self, name: str) -> str | None:
        """Value of a URI parameter ("" for a flag such as `lr`), None when absent."""
        return _find_param(self.params, name)

    def has_param(self, name: str) -> bool:
        return self.param(name) is not None

    def set_param(self, name: str, value: str | None) -> None:
        lname = name.lower()
        for i, (k, _) in enumerate(self.params):
            if k.lower() == lname:
                self.params[i] = (k, value)
                return
        self.params.append((name, value))

    @property
    def host_port(self) -> tuple[str, int | None]:
        return (self.host, self.port)

    def transport(self) -> str:
        value = self.param("transport")
        if value:
            return value.upper()
        return "TLS" if self.scheme == "sips" else "UDP"

    def __str__(self) -> str:
        if self.scheme == "tel":
            return f"tel:{self.user or ''}{join_params(self.params)}"
        if self.scheme not in ("sip", "sips"):
            return f"{self.scheme}:{self.user or ''}"  # absoluteURI kept opaque
        userinfo = ""
        if self.user is not None:
            userinfo = self.user + (f":{self.password}" if self.password is not None else "") + "@"
        port = f":{self.port}" if self.port is not None else ""
        headers = f"?{self.headers}" if self.headers else ""
        return f"{self.scheme}:{userinfo}{self.host}{port}{join_params(self.params)}{headers}"


def parse_uri(text: str) -> SipUri:
    """RFC 3261 §19.1.1 (and tel: of RFC 3966). Raises SipParseError naming the fault."""
    text = text.strip()
    if not text or _FORBIDDEN.search(text):
        raise SipParseError("Bad URI")
    scheme, colon, rest = text.partition(":")
    if not colon or not _SCHEME.match(scheme):
        raise SipParseError("Bad URI scheme")
    scheme_l = scheme.lower()
    if scheme_l == "tel":
        number, _, params = rest.partition(";")
        if not number:
            raise SipParseError("Bad tel URI")
        return SipUri("tel", number, None, "", None, split_params(params))
    if scheme_l not in ("sip", "sips"):
        # Other absolute URIs (e.g. im:, mailto:) are carried as opaque user text.
        return SipUri(scheme_l, rest, None, "", None, [])
    user: str | None = None
    password: str | None = None
    if "@" in rest:
        # user and password never hold a raw "@" (§25.1 user-unreserved), but may hold ";", "?" and ":"
        # (RFC 4475 §3.1.1.2): the first "@" ends the userinfo.
        userinfo, _, rest = rest.partition("@")
        user, pcolon, pw = userinfo.partition(":")
        password = pw if pcolon else None
        if not user:
            raise SipParseError("Bad URI user part")
    rest, _, headers = rest.partition("?")
    hostport, _, params = rest.partition(";")
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise SipParseError("Bad URI host")
        host, after = hostport[: end + 1], hostport[end + 1 :]
        port_text = after[1:] if after.startswith(":") else None
        if after and port_text is None:
            raise SipParseError("Bad URI host")
    else:
        host, pcolon, port_text_raw = hostport.partition(":")
        port_text = port_text_raw if pcolon else None
    if not host or not _HOST.match(host):
        raise SipParseError("Bad URI host")
    port: int | None = None
    if port_text is not None:
        if not _PORT.match(port_text) or not 0 < int(port_text) < 65536:
            raise SipParseError("Bad URI port")
        port = int(port_text)
    parsed = split_params(params)
    for k, _ in parsed:
        if not k:
            raise SipParseError("Bad URI parameter")
    return SipUri(scheme_l, user, password, host, port, parsed, headers)
