"""Builders of SIP test messages for the sans-IO unit tests."""

from __future__ import annotations

import itertools

from softswitch.sip.digest import compute_response
from softswitch.sip.headers import parse_auth
from softswitch.sip.message import SipRequest, SipResponse
from softswitch.sip.parser import parse_message

_counter = itertools.count(1)


def crlf(text: str) -> bytes:
    """Test messages are written with \\n; SIP wants CRLF."""
    head, sep, body = text.partition("\n\n")
    return (head.replace("\n", "\r\n") + ("\r\n\r\n" if sep else "") + body).encode()


def request_bytes(
    method: str,
    uri: str,
    *,
    via_host: str = "127.0.0.1:5070",
    transport: str = "UDP",
    branch: str | None = None,
    from_user: str = "1001",
    to_uri: str | None = None,
    to_tag: str | None = None,
    call_id: str | None = None,
    cseq: int = 1,
    cseq_method: str | None = None,
    contact: str | None = "<sip:1001@127.0.0.1:5070>",
    extra: str = "",
    body: str = "",
    domain: str = "127.0.0.1",
) -> bytes:
    branch = branch or f"z9hG4bKtest{next(_counter)}"
    call_id = call_id or f"call-{next(_counter)}@test"
    to = to_uri or uri
    to_hdr = f"<{to}>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/{transport} {via_host};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <sip:{from_user}@{domain}>;tag=from{from_user}",
        f"To: {to_hdr}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
    ]
    if contact:
        lines.append(f"Contact: {contact}")
    if extra:
        lines.extend(extra.strip("\n").split("\n"))
    lines.append(f"Content-Length: {len(body.encode())}")
    return crlf("\n".join(lines) + "\n\n" + body)


def parse_request(data: bytes) -> SipRequest:
    msg = parse_message(data)
    assert isinstance(msg, SipRequest)
    return msg


def parse_response(data: bytes) -> SipResponse:
    msg = parse_message(data)
    assert isinstance(msg, SipResponse)
    return msg


def response_bytes(
    request: SipRequest, status: int, reason: str, *, to_tag: str | None = None, extra: str = ""
) -> bytes:
    """A UAS's response to `request` (as the far end would build it)."""
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in request.get_all("Via")]
    lines += [f"Record-Route: {v}" for v in request.get_all("Record-Route")]
    to = request.get("To") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines += [
        f"From: {request.get('From')}",
        f"To: {to}",
        f"Call-ID: {request.call_id}",
        f"CSeq: {request.get('CSeq')}",
    ]
    if extra:
        lines.extend(extra.strip("\n").split("\n"))
    lines.append("Content-Length: 0")
    return crlf("\n".join(lines) + "\n\n")


def authorization(
    challenge_response: SipResponse,
    *,
    method: str,
    uri: str,
    user: str,
    password: str,
    algorithm: str = "MD5",
    proxy: bool = False,
    nc: int = 1,
) -> str:
    """The Authorization (or Proxy-Authorization) header line answering a challenge."""
    name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
    chosen = None
    for value in challenge_response.get_all(name):
        _, params = parse_auth(value)
        if params.get("algorithm", "MD5").upper() == algorithm.upper():
            chosen = params
    assert chosen is not None, f"no {algorithm} challenge"
    ncs = f"{nc:08x}"
    cnonce = "c0ffee"
    resp = compute_response(
        algorithm=algorithm,
        username=user,
        realm=chosen["realm"],
        password=password,
        method=method,
        uri=uri,
        nonce=chosen["nonce"],
        qop="auth",
        nc=ncs,
        cnonce=cnonce,
    )
    header = "Proxy-Authorization" if proxy else "Authorization"
    opaque = f', opaque="{chosen["opaque"]}"' if "opaque" in chosen else ""
    return (
        f'{header}: Digest username="{user}", realm="{chosen["realm"]}", nonce="{chosen["nonce"]}", '
        f'uri="{uri}", response="{resp}", algorithm={algorithm}, qop=auth, nc={ncs}, '
        f'cnonce="{cnonce}"{opaque}'
    )
