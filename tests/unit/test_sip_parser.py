"""The SIP parser against the RFC 4475 torture messages, its size limits and TCP framing (RFC 3261 §18.3).

The messages live in `torture/` as the exact bytes of RFC 4475 (CRLF line ends, raw control octets),
with every address rewritten to loopback (see `torture/README.md`). Valid messages must parse with the
fields the RFC describes; invalid ones must raise `SipParseError` with the reason phrase the edge puts
in its 400, and, for requests, still carry enough of the message (a readable Via) to address that 400.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from softswitch.sip.errors import SipParseError
from softswitch.sip.headers import parse_auth, parse_name_addr
from softswitch.sip.message import (
    MAX_HEADER_COUNT,
    MAX_HEADER_LINE,
    MAX_MESSAGE_SIZE,
    MAX_VIA_COUNT,
    SipRequest,
    SipResponse,
    make_response,
)
from softswitch.sip.parser import StreamFramer, parse_message

from .siputil import crlf, request_bytes

pytestmark = pytest.mark.timeout(30)

TORTURE = Path(__file__).parent / "torture"


def torture(name: str) -> bytes:
    return (TORTURE / f"{name}.dat").read_bytes()


def parse_request(name: str) -> SipRequest:
    message = parse_message(torture(name))
    assert isinstance(message, SipRequest)
    return message


def parse_response(name: str) -> SipResponse:
    message = parse_message(torture(name))
    assert isinstance(message, SipResponse)
    return message


def rejection(data: bytes) -> SipParseError:
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    return info.value


# -- the corpus itself --------------------------------------------------------------------------------

#: RFC 4475 §3.1.1: well-formed messages every parser must accept.
VALID = (
    "wsinv", "intmeth", "esc01", "escnull", "esc02", "lwsdisp", "longreq", "dblreq", "semiuri",
    "transports", "mpart01", "unreason", "noreason",
)  # fmt: skip

#: Messages the parser rejects: name → (status, reason phrase, whether a response can be addressed).
#: Responses are never answered (RFC 3261 §18.1.2 drops them); requests get the status and reason.
INVALID: dict[str, tuple[int, str, bool]] = {
    # RFC 4475 §3.1.2
    "badinv01": (400, "Bad Via header", True),
    "clerr": (400, "Content-Length exceeds body", True),
    "ncl": (400, "Bad Content-Length header", True),
    "scalar02": (400, "Bad CSeq header", True),
    "scalarlg": (400, "Bad CSeq header", False),
    "quotbal": (400, "Bad To header", True),
    "ltgtruri": (400, "Bad Request-URI", True),
    "lwsruri": (400, "Bad request line", True),
    "lwsstart": (400, "Bad request line", True),
    "trws": (400, "Bad request line", True),
    "escruri": (400, "Headers not allowed in Request-URI", True),
    "regbadct": (400, "Bad Contact header", True),
    "badaspec": (400, "Bad To header", True),
    "baddn": (400, "Bad From header", True),
    "badvers": (505, "Version Not Supported", True),
    "mismatch01": (400, "CSeq method does not match the request method", True),
    "mismatch02": (400, "CSeq method does not match the request method", True),
    "bigcode": (400, "Bad status line", False),
    # RFC 4475 §3.3: application-layer faults that are also syntax faults for a parser
    "insuf": (400, "Missing From header", True),
    "multi01": (400, "Multiple From headers", True),
    "mcl01": (400, "Conflicting Content-Length headers", True),
}

#: RFC 4475 §3.1.2.12, §3.2 and §3.3 messages that are syntactically acceptable: the parser lets them
#: through and the layer above (transaction layer, proxy, registrar, UA) decides what to answer.
ACCEPTED = (
    "baddate", "badbranch", "unkscm", "novelsc", "unksm2", "bext01", "invut", "regaut01", "bcast",
    "zeromf", "cparam01", "cparam02", "regescrt", "sdp01", "inv2543",
)  # fmt: skip


def test_every_torture_file_is_classified() -> None:
    names = {p.stem for p in TORTURE.glob("*.dat")}
    assert names == set(VALID) | set(INVALID) | set(ACCEPTED)
    assert not set(VALID) & set(INVALID) and not set(ACCEPTED) & set(INVALID)


def _hosts(message: SipRequest | SipResponse) -> list[str]:
    hosts = [v.host for v in message.vias]
    if isinstance(message, SipRequest) and message.uri.scheme in ("sip", "sips"):
        hosts.append(message.uri.host)
    for name in ("From", "To", "Contact", "Route", "Record-Route"):
        for value in message.get_all(name):
            if value.strip() != "*":
                uri = parse_name_addr(value).uri
                if uri.scheme in ("sip", "sips"):
                    hosts.append(uri.host)
    return hosts


@pytest.mark.parametrize("name", sorted(p.stem for p in TORTURE.glob("*.dat")))
def test_torture_messages_name_only_loopback(name: str) -> None:
    """TESTING.md: every address in a test message is loopback, so nothing can ever be sent elsewhere."""
    data = torture(name)
    assert b"example." not in data
    for quad in re.findall(rb"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])", data):
        assert ipaddress.ip_address(quad.decode()).is_loopback, quad
    try:
        message: SipRequest | SipResponse | None = parse_message(data)
    except SipParseError:
        message = None
    if message is not None:
        for host in _hosts(message):
            assert (
                host == "localhost" or host.endswith(".localhost") or ipaddress.ip_address(host).is_loopback
            )


# -- RFC 4475 §3.1.1 valid messages ---------------------------------------------------------------------


def test_wsinv_short_tortuous_invite() -> None:
    """§3.1.1.1: folding everywhere, LWS around every separator, escaped quotes, compact forms."""
    m = parse_request("wsinv")
    assert m.method == "INVITE"
    assert (m.uri.user, m.uri.host, m.uri.params) == (
        "vivekg",
        "chair-dnrc.com.localhost",
        [("unknownparam", None)],
    )
    assert m.to.tag == "1918181833n" and m.to.uri.user == "vivekg"
    assert m.from_.display_name == 'J Rosenberg \\"' and m.from_.tag == "98asjd8"
    assert m.max_forwards == 68
    assert m.cseq == (9, "INVITE")
    assert m.call_id == "wsinv.ndaksdj@127.0.0.1"
    assert [(v.transport, v.host, v.branch) for v in m.vias] == [
        ("UDP", "127.0.0.2", "390skdjuw"),
        ("TCP", "spindle.com.localhost", "z9hG4bK9ikj8"),
        ("UDP", "127.0.0.111", "z9hG4bK30239"),
    ]
    assert m.get("Subject") == ""
    assert m.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert m.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    route = parse_name_addr(m.get_all("Route")[0], header_name="Route")
    assert route.uri.params == [("lr", None), ("unknownwith", "value"), ("unknown-no-value", None)]
    (contact,) = m.contacts
    assert contact.display_name == 'Quoted string ""'
    assert contact.params == [("newparam", "newvalue"), ("secondparam", None), ("q", "0.33")]
    assert len(m.body) == 150 and m.body.startswith(b"v=0\r\n") and m.body.endswith(b"a=rtpmap:31 LPC\r\n")


def test_intmeth_wide_range_of_valid_characters() -> None:
    """§3.1.1.2: every token character in the method, `?` `;` `:` in the userinfo, quoted NUL/BEL/DEL."""
    method = "!interesting-Method0123456789_*+`.%indeed'~"
    m = parse_request("intmeth")
    assert m.method == method
    assert m.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert m.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert m.uri.host == "com.localhost" and m.uri.headers == ""
    assert m.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert m.to.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert m.from_.display_name == "token1~` token2'+_ token3*%!.-"
    assert m.from_.param("fromParam''~+*_!.-%") == '"работающий"'
    assert m.from_.tag == "_token~1'+`*%!-."
    assert m.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert m.cseq == (139122385, method)
    assert m.max_forwards == 255
    assert m.vias[0].branch == "z9hG4bK-.!%66*_+`'~"
    assert m.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"
    assert m.start_line() == torture("intmeth").split(b"\r\n")[0].decode()


def test_esc01_escapes_are_kept_as_written() -> None:
    """§3.1.1.3: escaped characters are compared unescaped but forwarded exactly as received."""
    m = parse_request("esc01")
    assert (m.uri.user, m.uri.host) == ("sips%3Auser%40com.localhost", "net.localhost")
    assert m.to.uri.user == "%75se%72"
    assert m.from_.uri.user == "I%20have%20spaces" and m.from_.tag == "938"
    assert m.call_id == "esc01.239409asdfakjkn23onasd0-3234"  # compact i:
    assert m.get("Content-Type") == "application/sdp"  # compact c:
    (contact,) = m.contacts
    assert contact.uri.user == "cal%6Cer"
    assert contact.uri.params == [("%6C%72", None), ("n%61me", "v%61lue%25%34%31")]
    out = m.to_bytes()
    assert b"INVITE sip:sips%3Auser%40com.localhost@net.localhost SIP/2.0\r\n" in out
    assert b"<sip:cal%6Cer@host5.net.localhost;%6C%72;n%61me=v%61lue%25%34%31>" in out


def test_escnull_escaped_nulls_stay_escaped() -> None:
    """§3.1.1.4: %00 is data, not the end of a string; two distinct contacts are registered."""
    m = parse_request("escnull")
    assert m.to.uri.user == "null-%00-null" and m.from_.uri.user == "null-%00-null"
    assert [c.uri.user for c in m.contacts] == ["%00", "%00%00"]
    assert m.get("Content-Length") == "0"  # compact L:
    assert b"\x00" not in m.to_bytes()


def test_esc02_percent_is_not_an_escape_outside_uris() -> None:
    """§3.1.1.5: RE%47IST%45R is an unknown method, not REGISTER; C%6Fntact is not Contact."""
    m = parse_request("esc02")
    assert m.method == "RE%47IST%45R" and m.cseq == (29344, "RE%47IST%45R")
    assert m.to.display_name == "%Z%45" and m.from_.display_name == "%Z%45"
    assert [c.uri.user for c in m.contacts] == ["alias1", "alias3"]
    assert m.get("C%6Fntact") == "<sip:alias2@host2.com.localhost>"
    assert m.vias[0].branch == "z9hG4bK209%fzsnel234"


def test_lwsdisp_no_space_before_the_angle_bracket() -> None:
    """§3.1.1.6: `caller<sip:…>` is accepted although RFC 3261's grammar wants LWS there."""
    m = parse_request("lwsdisp")
    assert m.from_.display_name == "caller" and m.from_.uri.user == "caller" and m.from_.tag == "323"


def test_longreq_long_values_and_many_vias() -> None:
    """§3.1.1.7: long display names, parameters, tags and 34 Via headers in every spelling."""
    m = parse_request("longreq")
    vias = m.vias
    assert len(vias) == 34 < MAX_VIA_COUNT
    assert [v.host for v in vias[:3]] == ["sip33.com.localhost", "sip32.com.localhost", "sip31.com.localhost"]
    assert vias[-1].param("received") == "127.0.0.5"
    assert vias[-1].branch == "very" + "long" * 50 + "branchvalue"
    assert m.to.display_name == "I have a user name of " + "extreme" * 10 + " proportion"
    assert m.to.uri.port == 6000 and len(m.to.uri.params) == 3 and m.to.uri.params[2][1] is None
    assert m.from_.tag == "12" + "982" * 50 + "424"
    assert m.call_id == "longreq.one" + "really" * 20 + "longcallid"
    assert (m.get("Unknown-" + "Long" * 20 + "-Name") or "").startswith("unknown-long")
    assert len(m.body) == 150


def test_dblreq_trailing_octets_of_a_datagram_are_ignored() -> None:
    """§3.1.1.8: after Content-Length octets the rest of a UDP datagram is noise (RFC 3261 §18.3)."""
    m = parse_request("dblreq")
    assert m.method == "REGISTER" and m.body == b""
    assert m.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"
    assert m.contacts[0].uri.host == "host.com.localhost" and not m.contacts[0].bracketed
    assert b"INVITE" not in m.to_bytes()


def test_semiuri_semicolon_in_the_user_part() -> None:
    """§3.1.1.9: the user part is `user;par=u%40net.localhost`; the URI has no parameters."""
    m = parse_request("semiuri")
    assert (m.uri.user, m.uri.host, m.uri.params) == ("user;par=u%40net.localhost", "com.localhost", [])
    assert m.get_all("Accept") == [
        "application/sdp", "application/pkcs7-mime", "multipart/mixed", "multipart/signed",
        "message/sip", "message/sipfrag",
    ]  # fmt: skip


def test_transports_every_via_transport_is_accepted() -> None:
    """§3.1.1.10: SCTP, TLS and unknown transports are just tokens to a parser."""
    m = parse_request("transports")
    assert [v.transport for v in m.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert m.call_id == "transports.kijh4akdnaqjkwendsasfdj"


def test_mpart01_binary_body_is_framed_by_content_length() -> None:
    """§3.1.1.11: a multipart body with NUL octets (and here a CRLFCRLF) is framed only by length."""
    data = torture("mpart01")
    m = parse_request("mpart01")
    assert m.get("Content-Type") == "multipart/mixed;boundary=7a9cbec02ceef655"
    assert len(m.body) == int(m.get("Content-Length") or "") == 545
    assert b"\x00" in m.body and b"\r\n\r\n" in m.body[100:]
    assert data.endswith(m.body) and m.body.endswith(b"--7a9cbec02ceef655--\r\n")
    assert StreamFramer().feed(data) == [data]


def test_unreason_utf8_reason_phrase() -> None:
    """§3.1.1.12: a reason phrase may be any UTF-8 text."""
    m = parse_response("unreason")
    assert m.status == 200 and m.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    assert len(m.body) == 154


def test_noreason_empty_reason_phrase() -> None:
    """§3.1.1.13: the SP after the code is required; a liberal receiver also accepts it missing."""
    m = parse_response("noreason")
    assert (m.status, m.reason) == (100, "")
    liberal = parse_message(torture("noreason").replace(b"SIP/2.0 100 \r\n", b"SIP/2.0 100\r\n"))
    assert isinstance(liberal, SipResponse) and (liberal.status, liberal.reason) == (100, "")


@pytest.mark.parametrize("name", VALID + ACCEPTED)
def test_accepted_messages_survive_a_round_trip(name: str) -> None:
    """Serialising a parsed message and parsing it again changes nothing but Content-Length's spelling;
    every header line is written back with the bytes it arrived with."""
    first = parse_message(torture(name))
    data = first.to_bytes()
    second = parse_message(data)
    assert second.start_line() == first.start_line()
    assert [(h.name, h.value) for h in second.headers if h.key != "content-length"] == [
        (h.name, h.value) for h in first.headers if h.key != "content-length"
    ]
    assert second.body == first.body
    for h in first.headers:
        if h.key != "content-length":
            assert h.raw is not None and b"\r\n" + h.raw + b"\r\n" in data


# -- RFC 4475 §3.1.2 invalid messages -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_messages_are_rejected_with_a_precise_reason(name: str) -> None:
    status, reason, answerable = INVALID[name]
    error = rejection(torture(name))
    assert (error.status, error.reason) == (status, reason)
    if answerable:
        # What the edge does with it (EdgeCore.reject_unparsable): answer from the partial request.
        request = error.message
        assert isinstance(request, SipRequest)
        response = make_response(request, error.status, error.reason)
        assert response.start_line() == f"SIP/2.0 {status} {reason}"
        assert response.get_all("Via") == request.get_all("Via") != []
        assert response.get("Call-ID") == request.get("Call-ID")
        assert response.to_bytes().startswith(f"SIP/2.0 {status} {reason}\r\n".encode())
    else:
        assert not isinstance(error.message, SipRequest)


def test_clerr_on_a_stream_waits_for_the_missing_octets() -> None:
    """§3.1.2.2: over TCP a Content-Length beyond the data means more is coming, not an error."""
    framer = StreamFramer()
    assert framer.feed(torture("clerr")) == []
    assert framer.feed(b"x" * 100) == []


def test_ncl_on_a_stream_is_a_framing_error_and_the_stream_resyncs() -> None:
    """§3.1.2.3: a negative Content-Length cannot frame anything; the next message is still found."""
    following = request_bytes("OPTIONS", "sip:127.0.0.1")
    framer = StreamFramer()
    out = framer.feed(torture("ncl") + following)
    assert len(out) == 2 and isinstance(out[0], SipParseError) and out[1] == following
    assert out[0].reason == "Bad Content-Length header"
    assert isinstance(out[0].message, SipRequest)  # so that a 400 can be sent on the connection


def test_lwsstart_on_a_stream_is_answered_then_skipped() -> None:
    """§3.1.2.9 over TCP: not a start line, but the request can still be answered 400."""
    following = request_bytes("OPTIONS", "sip:127.0.0.1")
    out = StreamFramer().feed(torture("lwsstart") + following)
    assert isinstance(out[0], SipParseError) and out[-1] == following
    assert isinstance(out[0].message, SipRequest) and out[0].message.method == "INVITE"


def test_scalar02_only_the_cseq_makes_it_fatal() -> None:
    """§3.1.2.4: with a valid CSeq, Max-Forwards 300 is the next fault; oversized expiries are capped."""
    fixed_cseq = torture("scalar02").replace(b"CSeq: 36893488147419103232", b"CSeq: 1")
    assert rejection(fixed_cseq).reason == "Bad Max-Forwards header"
    fixed_both = fixed_cseq.replace(b"Max-Forwards: 300", b"Max-Forwards: 70")
    m = parse_message(fixed_both)
    assert m.expires == 2**32 - 1


# -- leniency decisions ---------------------------------------------------------------------------------


def test_baddate_is_forwarded_unchanged() -> None:
    """§3.1.2.12: a non-GMT Date is invalid, but the edge never reads Date: it accepts the request and
    forwards the header byte for byte rather than fail a call over a clock string."""
    m = parse_request("baddate")
    assert m.get("Date") == "Fri, 01 Jan 2010 16:00:00 EST"
    assert b"\r\nDate: Fri, 01 Jan 2010 16:00:00 EST\r\n" in m.to_bytes()


def test_regbadct_is_rejected_rather_than_guessed() -> None:
    """§3.1.2.13 allows inferring the missing <>. The edge is also the registrar: a binding whose URI
    carries headers would later become a Request-URI with headers (escruri, rejected), so 400."""
    error = rejection(torture("regbadct"))
    assert error.reason == "Bad Contact header"
    # The same contact written as a name-addr (regescrt, §3.3.14) is well formed; what the registrar
    # does with its headers is the registrar's business.
    (contact,) = parse_request("regescrt").contacts
    assert contact.uri.headers == "Route=%3Csip:sip.com.localhost%3E"


def test_badaspec_spaces_inside_angle_brackets_are_rejected() -> None:
    """§3.1.2.14 lets an element ignore them; RFC 3261's LAQUOT/RAQUOT allow none, no phone sends
    them, and a proxy must not propagate the error, so the edge answers 400."""
    assert rejection(torture("badaspec")).reason == "Bad To header"
    fixed = torture("badaspec").replace(b"< sip:t.watson@org.localhost >", b"<sip:t.watson@org.localhost>")
    assert parse_message(fixed).to.display_name == "Watson, Thomas"


def test_lwsstart_and_trws_are_rejected_not_repaired() -> None:
    """§3.1.2.9-10 allow ignoring extra SP; the edge answers 400 instead, naming the request line."""
    for name in ("lwsstart", "trws", "lwsruri"):
        error = rejection(torture(name))
        assert isinstance(error.message, SipRequest) and error.message.get("Call-ID") is not None


def test_mismatch02_is_400_not_501() -> None:
    """§3.1.2.18 prefers 501 but accepts 400: the parser cannot know which methods the edge
    implements, and a CSeq naming another method is a malformed message whatever the method."""
    error = rejection(torture("mismatch02"))
    assert (error.status, error.reason) == (400, "CSeq method does not match the request method")


def test_bigcode_is_not_read_as_a_429() -> None:
    """§3.1.2.19: `4294967301` must not be parsed as status 429 followed by a reason."""
    error = rejection(torture("bigcode"))
    assert error.reason == "Bad status line" and error.message is None


def test_application_layer_messages_parse() -> None:
    """§3.2, §3.3, §3.4: syntactically valid; the layers above answer them (416, 420, 483, 415 …)."""
    assert parse_request("badbranch").vias[0].branch == "z9hG4bK"
    unkscm = parse_request("unkscm")
    assert str(unkscm.uri) == "nobodyknowsthisscheme:totallyopaquecontent"
    assert str(parse_request("novelsc").uri) == "soap.beep://127.0.0.103:3002"
    unksm2 = parse_request("unksm2")
    assert (unksm2.to.uri.scheme, unksm2.from_.uri.scheme, unksm2.contacts[0].uri.scheme) == (
        "isbn",
        "http",
        "name",
    )
    bext01 = parse_request("bext01")
    assert bext01.get_all("Proxy-Require") == ["noProxiesSupportThis", "norDoAnyProxiesSupportThis"]
    assert bext01.get_all("Require") == ["nothingSupportsThis", "nothingSupportsThisEither"]
    invut = parse_request("invut")
    assert invut.get("Content-Type") == "application/unknownformat"
    assert invut.body == b'<audio>\r\n <pcmu port="443"/>\r\n</audio>\r\n'
    assert parse_auth(parse_request("regaut01").get("Authorization") or "") == (
        "NoOneKnowsThisScheme",
        {"opaque-data": "here"},
    )
    assert [v.host for v in parse_response("bcast").vias] == ["127.0.0.198", "127.255.255.255"]
    assert parse_request("zeromf").max_forwards == 0
    (cparam01,) = parse_request("cparam01").contacts
    assert cparam01.params == [("unknownparam", None)] and cparam01.uri.params == []
    (cparam02,) = parse_request("cparam02").contacts
    assert cparam02.params == [] and cparam02.uri.params == [("unknownparam", None)]
    assert parse_request("sdp01").get("Accept") == "text/nobodyKnowsThis"


def test_inv2543_rfc2543_request_without_content_length() -> None:
    """§3.4.1: no branch, no Max-Forwards, no From tag and, over UDP, no Content-Length."""
    m = parse_request("inv2543")
    assert m.vias[0].branch is None and m.max_forwards is None and m.from_.tag is None
    assert m.to.params == [("user", "phone")] and m.to.uri.params == []
    assert m.from_.uri.params == [("user", "phone")]
    assert m.body == torture("inv2543").split(b"\r\n\r\n", 1)[1] and len(m.body) == 105


# -- size limits ----------------------------------------------------------------------------------------


def _with_extra(extra_lines: list[str], body: bytes = b"") -> bytes:
    """A MESSAGE of known length: branch and Call-ID fixed, so equal arguments give equal bytes."""
    head = request_bytes(
        "MESSAGE",
        "sip:1002@127.0.0.1",
        branch="z9hG4bKlimits",
        call_id="limits@127.0.0.1",
        contact=None,
        extra="\n".join(extra_lines),
    )
    head = head.replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
    return head + body


def test_message_size_limit() -> None:
    """MAX_MESSAGE_SIZE: a message of exactly the limit parses; one octet more is a 513."""
    probe = _with_extra([], b"")
    body_len = MAX_MESSAGE_SIZE - len(probe) - (len(str(MAX_MESSAGE_SIZE)) - 1)
    at_limit = _with_extra([], b"x" * body_len)
    assert len(at_limit) == MAX_MESSAGE_SIZE
    assert len(parse_message(at_limit).body) == body_len
    over = _with_extra([], b"x" * (body_len + 1))
    error = rejection(over)
    assert (error.status, error.reason) == (513, "Message Too Large")
    assert isinstance(error.message, SipRequest) and error.message.top_via.host == "127.0.0.1"


def test_header_count_limit() -> None:
    base = len(parse_message(_with_extra([])).headers)
    ok = _with_extra([f"X-Pad-{i}: {i}" for i in range(MAX_HEADER_COUNT - base)])
    assert len(parse_message(ok).headers) == MAX_HEADER_COUNT
    error = rejection(_with_extra([f"X-Pad-{i}: {i}" for i in range(MAX_HEADER_COUNT - base + 1)]))
    assert (error.status, error.reason) == (400, "Too many headers")
    assert isinstance(error.message, SipRequest) and error.message.top_via is not None


def test_via_count_limit_counts_values_not_lines() -> None:
    via = "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKpad"
    own = 1
    ok = _with_extra([f"Via: {via}"] * (MAX_VIA_COUNT - own))
    assert len(parse_message(ok).vias) == MAX_VIA_COUNT
    error = rejection(_with_extra([f"Via: {via}"] * (MAX_VIA_COUNT - own + 1)))
    assert error.reason == "Too many Via headers"
    one_line = _with_extra(["Via: " + ", ".join([via] * (MAX_VIA_COUNT - own + 1))])
    assert rejection(one_line).reason == "Too many Via headers"


def test_header_line_limit_applies_to_the_unfolded_line() -> None:
    prefix = "X-Long: "
    ok = _with_extra([prefix + "a" * (MAX_HEADER_LINE - len(prefix))])
    assert parse_message(ok).get("X-Long") == "a" * (MAX_HEADER_LINE - len(prefix))
    error = rejection(_with_extra([prefix + "a" * (MAX_HEADER_LINE - len(prefix) + 1)]))
    assert (error.status, error.reason) == (400, "Header line too long")
    folded = [prefix + "a" * 100] + [" " + "b" * 1000] * (MAX_HEADER_LINE // 1000 + 1)
    assert rejection(_with_extra(folded)).reason == "Header line too long"


def test_stream_limits() -> None:
    """On TCP the same limit bounds what the framer buffers: an endless head or a huge
    Content-Length is dropped with 'Message Too Large' rather than buffered."""
    framer = StreamFramer()
    out = framer.feed(b"INVITE sip:127.0.0.1 SIP/2.0\r\nX-Pad: " + b"a" * MAX_MESSAGE_SIZE)
    assert [e.reason for e in out if isinstance(e, SipParseError)] == ["Message Too Large"]
    huge = request_bytes("OPTIONS", "sip:127.0.0.1").replace(b"Content-Length: 0", b"Content-Length: 99999")
    following = request_bytes("OPTIONS", "sip:127.0.0.1")
    out = StreamFramer().feed(huge + following)
    assert isinstance(out[0], SipParseError) and out[0].reason == "Message Too Large" and out[1] == following


# -- TCP framing (RFC 3261 §18.3) -----------------------------------------------------------------------


def test_stream_missing_content_length_is_an_error_then_resync() -> None:
    without = crlf(
        "OPTIONS sip:127.0.0.1 SIP/2.0\nVia: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bKa\n"
        "From: <sip:1001@127.0.0.1>;tag=a\nTo: <sip:127.0.0.1>\nCall-ID: nolength\nCSeq: 1 OPTIONS\n\n"
    )
    following = request_bytes("OPTIONS", "sip:127.0.0.1", transport="TCP")
    out = StreamFramer().feed(without + following)
    assert len(out) == 2 and out[1] == following
    assert isinstance(out[0], SipParseError) and out[0].reason == "Missing Content-Length header"
    assert isinstance(out[0].message, SipRequest) and out[0].message.call_id == "nolength"


def test_stream_garbage_then_a_valid_message() -> None:
    message = request_bytes("OPTIONS", "sip:127.0.0.1", transport="TCP")
    for garbage in (b"hello\r\n", b"\x00\xff junk junk\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        out = StreamFramer().feed(garbage + message)
        assert out[-1] == message, garbage
        assert all(isinstance(e, SipParseError) and e.reason == "Bad start line" for e in out[:-1])
        assert len(out) == 2


def test_stream_garbage_split_across_reads_then_a_message() -> None:
    message = request_bytes("OPTIONS", "sip:127.0.0.1", transport="TCP")
    framer = StreamFramer()
    out = framer.feed(b"garbage without end " * 10 + b"\r\n\r\n")
    out += framer.feed(message[:30])
    out += framer.feed(message[30:])
    assert out[-1] == message and isinstance(out[0], SipParseError)


def test_stream_crlf_keepalives() -> None:
    """RFC 5626 §3.5.1: CRLFCRLF is a ping (the transport answers CRLF); a lone CRLF is skipped."""
    message = request_bytes("OPTIONS", "sip:127.0.0.1", transport="TCP")
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == [b"\r\n\r\n"]
    assert framer.feed(b"\r\n") == []  # could be half a ping
    assert framer.feed(message) == [message]  # it was a lone CRLF before a message
    assert framer.feed(b"\r\n\r") == []
    assert framer.feed(b"\n" + message + b"\r\n\r\n") == [b"\r\n\r\n", message, b"\r\n\r\n"]


def test_stream_message_fed_one_octet_at_a_time() -> None:
    message = torture("wsinv")
    framer = StreamFramer()
    out: list[bytes | SipParseError] = []
    for i in range(len(message)):
        out += framer.feed(message[i : i + 1])
    assert out == [message]


def test_stream_frames_extension_methods_and_other_versions() -> None:
    """Any token method is a start line on a stream; SIP/7.0 is framed so the parser can say 505."""
    for name in ("esc02", "intmeth"):
        assert StreamFramer().feed(torture(name)) == [torture(name)]
    (badvers,) = StreamFramer().feed(torture("badvers"))
    assert isinstance(badvers, bytes) and rejection(badvers).status == 505


def test_stream_conflicting_content_lengths() -> None:
    """mcl01 (§3.3.9) over TCP: no way to know where the message ends."""
    out = StreamFramer().feed(torture("mcl01"))
    assert isinstance(out[0], SipParseError) and out[0].reason == "Bad Content-Length header"
