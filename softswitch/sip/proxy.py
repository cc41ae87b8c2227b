"""Proxy rules of RFC 3261 §16 as pure functions: what the edge does to a request it forwards.

Also the flow tokens the edge puts in its Record-Route URI (in the manner of RFC 5626 §5.3), so that an
in-dialog request that comes back through the edge leaves over the flow the dialog was set up on, and
the edge never relays to an address it did not learn from an authenticated peer (it is not an open relay).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from softswitch.sip.errors import SipError
from softswitch.sip.flow import Flow
from softswitch.sip.headers import NameAddr, parse_name_addr
from softswitch.sip.message import SipRequest
from softswitch.sip.uri import SipUri

#: RFC 3261 §8.1.1.6: the Max-Forwards value a request gets when it arrives without one.
DEFAULT_MAX_FORWARDS = 70
#: Magic cookie of RFC 3261 branches, followed by our own marker so that we recognise our branches.
BRANCH_PREFIX = "z9hG4bKss"
#: URI parameter of our Record-Route entries that carries the flow tokens.
FLOW_TOKEN_PARAM = "ft"
#: Bytes of HMAC kept in a flow token: forging one is as hard as guessing 64 random bits.
TOKEN_MAC_BYTES = 8
#: Internal identity header: stripped from everything phones send, added toward trusted peers only.
IDENTITY_HEADER = "X-Softswitch-Identity"
#: Headers a phone may not set because the edge asserts identity with them (RFC 3325 §5).
UNTRUSTED_IDENTITY_HEADERS = ("x-softswitch-identity", "p-asserted-identity")
#: Methods whose dialogs the edge record-routes (dialog-creating requests, RFC 3261 §16.6 step 4).
RECORD_ROUTE_METHODS = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FlowTokens:
    """Encodes flows as tamper-proof tokens (HMAC-SHA256 with the node's secret)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def encode(self, flow: Flow) -> str:
        conn = "" if flow.conn_id is None else str(flow.conn_id)
        body = f"{flow.transport}|{flow.host}|{flow.port}|{conn}".encode()
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()[:TOKEN_MAC_BYTES]
        return _b64(body + mac)

    def decode(self, token: str) -> Flow | None:
        """The flow of a token we made, or None for anything else (forged, truncated, garbage)."""
        try:
            raw = _unb64(token)
        except (ValueError, TypeError):
            return None
        if len(raw) <= TOKEN_MAC_BYTES:
            return None
        body, mac = raw[:-TOKEN_MAC_BYTES], raw[-TOKEN_MAC_BYTES:]
        good = hmac.new(self._secret, body, hashlib.sha256).digest()[:TOKEN_MAC_BYTES]
        if not hmac.compare_digest(mac, good):
            return None
        try:
            transport, host, port, conn = body.decode().split("|")
            return Flow(transport, host, int(port), int(conn) if conn else None)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class RouteTokens:
    """The flows recorded in one of our Record-Route entries: the caller's side and the callee's."""

    caller: Flow | None
    callee: Flow | None


def loop_hash(request: SipRequest) -> str:
    """RFC 3261 §16.6 step 8: a hash of what identifies the request at this hop, for loop detection."""
    parts = [
        str(request.uri),
        request.from_.tag or "",
        request.to.tag or "",
        request.call_id,
        str(request.cseq[0]),
        request.get("Proxy-Require") or "",
    ]
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:16]


def branch_for(request: SipRequest, index: int) -> str:
    """Branch of our Via on forwarded copy `index` (§16.6 step 8: unique per branch, hash-based)."""
    return f"{BRANCH_PREFIX}{loop_hash(request)}.{index}"


def stateless_branch(request: SipRequest) -> str:
    """Branch for a request forwarded statelessly (the ACK of a 2xx): the same every retransmission."""
    top = request.top_via
    seed = f"{top.branch}|{top.host}|{top.port}|{request.call_id}|{request.cseq[0]}"
    return f"{BRANCH_PREFIX}{hashlib.sha1(seed.encode()).hexdigest()[:16]}.s"


def check_max_forwards(request: SipRequest) -> None:
    """RFC 3261 §16.3 step 3."""
    value = request.max_forwards
    if value is not None and value <= 0:
        raise SipError(483, "Too Many Hops")


def check_proxy_require(request: SipRequest) -> None:
    """RFC 3261 §16.3 step 5: we support no extension that a proxy would have to."""
    values = request.get_all("Proxy-Require")
    if values:
        raise SipError(420, "Bad Extension", [("Unsupported", ", ".join(values))])


def check_loop(request: SipRequest, is_us: IsUs) -> None:
    """RFC 3261 §16.3 step 4: a Via of ours carrying this request's own hash means a loop."""
    expected = f"{BRANCH_PREFIX}{loop_hash(request)}."
    for via in request.vias:
        if is_us(via.host, via.port) and (via.branch or "").startswith(expected):
            raise SipError(482, "Loop Detected")


class IsUs:
    """Whether a host/port names this edge (its address, the domain, configured aliases)."""

    def __init__(self, hosts: set[str], port: int, domain_hosts: set[str]) -> None:
        self.hosts = {h.lower() for h in hosts}
        self.domain_hosts = {h.lower() for h in domain_hosts}
        self.port = port

    def __call__(self, host: str, port: int | None) -> bool:
        h = host.lower()
        if port is None:
            return h in self.domain_hosts or (h in self.hosts and self.port == 5060)
        return (h in self.hosts or h in self.domain_hosts) and port == self.port

    def uri(self, uri: SipUri) -> bool:
        return self(uri.host, uri.port)


def decrement_max_forwards(request: SipRequest) -> None:
    """RFC 3261 §16.6 step 3."""
    value = request.max_forwards
    request.set("Max-Forwards", str((value if value is not None else DEFAULT_MAX_FORWARDS) - 1))


def strip_untrusted_identity(request: SipRequest) -> int:
    """Remove identity headers a phone could use to impersonate someone (RFC 3325 §5)."""
    return sum(request.remove(name) for name in UNTRUSTED_IDENTITY_HEADERS)


def pop_our_route(request: SipRequest, is_us: IsUs) -> SipUri | None:
    """RFC 3261 §16.4: remove the top Route when it names us; returns its URI."""
    routes = request.get_all("Route")
    if not routes:
        return None
    top = parse_name_addr(routes[0], header_name="Route")
    if not is_us.uri(top.uri):
        return None
    request.pop_first_value("Route")
    return top.uri


def record_route_value(host: str, port: int, transport: str, tokens: list[tuple[str, str]]) -> str:
    """Our Record-Route entry: loose-routing, with the transport the recipient should use to reach us."""
    params = "" if transport == "UDP" else f";transport={transport.lower()}"
    extra = "".join(f";{k}={v}" for k, v in tokens)
    return f"<sip:{host}:{port}{params};lr{extra}>"


def find_our_record_route(values: list[str], is_us: IsUs) -> int | None:
    """Index of our entry in a list of Record-Route values (the one carrying our token)."""
    for i, value in enumerate(values):
        try:
            na: NameAddr = parse_name_addr(value, header_name="Record-Route")
        except SipError:
            continue
        if is_us.uri(na.uri) and na.uri.has_param(FLOW_TOKEN_PARAM):
            return i
    return None


#: Key presses an `application/dtmf` body may carry (RFC 4733 §3.2 events 0-15).
DTMF_KEYS = frozenset("0123456789*#ABCD")
#: Duration given to a key that arrived without one (`application/dtmf` carries none), in milliseconds.
DTMF_INFO_DURATION_MS = 250


def dtmf_info_as_relay(request: SipRequest) -> bool:
    """Rewrite an INFO whose body is `application/dtmf` (the key alone, as some phones send it) into the
    `application/dtmf-relay` form (`Signal=` / `Duration=`) the media workers read; True when it did.
    Any other INFO is left as it is."""
    content_type = (request.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if request.method != "INFO" or content_type != "application/dtmf":
        return False
    key = request.body.decode("ascii", "replace").strip().upper()
    if key not in DTMF_KEYS:
        raise SipError(400, "Bad Request (application/dtmf body is not one key)")
    request.set("Content-Type", "application/dtmf-relay")
    request.body = f"Signal={key}\r\nDuration={DTMF_INFO_DURATION_MS}\r\n".encode()
    return True
