"""URI and header grammar (RFC 3261 §19.1, §20, §25) and the message operations the edge relies on."""

from __future__ import annotations

import pytest

from softswitch.sip.errors import SipParseError
from softswitch.sip.headers import (
    COMPACT_FORMS,
    canonical_name,
    format_auth,
    parse_auth,
    parse_cseq,
    parse_name_addr,
    parse_via,
    pretty_name,
    quote,
    split_values,
    unquote,
)
from softswitch.sip.message import MAX_DELTA_SECONDS, Header, SipRequest, SipResponse, make_response
from softswitch.sip.parser import parse_message
from softswitch.sip.uri import parse_uri

from .siputil import crlf, parse_request, request_bytes

pytestmark = pytest.mark.timeout(30)


def reason_of(call: object, *args: object) -> str:
    assert callable(call)
    with pytest.raises(SipParseError) as info:
        call(*args)
    return info.value.reason


# -- URIs (RFC 3261 §19.1.1) ----------------------------------------------------------------------------


def test_ipv6_hosts() -> None:
    uri = parse_uri("sip:1001@[::1]:5070;transport=tcp")
    assert (uri.user, uri.host, uri.port, uri.transport()) == ("1001", "[::1]", 5070, "TCP")
    assert str(uri) == "sip:1001@[::1]:5070;transport=tcp"
    secure = parse_uri("sips:[::ffff:127.0.0.1]")
    assert (secure.host, secure.port, secure.transport()) == ("[::ffff:127.0.0.1]", None, "TLS")
    assert reason_of(parse_uri, "sip:[::1") == "Bad URI host"
    assert reason_of(parse_uri, "sip:[::1]5060") == "Bad URI host"
    assert reason_of(parse_uri, "sip:[::1]:65536") == "Bad URI port"
    via = parse_via("SIP/2.0/TCP [::1]:5060;branch=z9hG4bK776;rport")
    assert (via.host, via.port, via.branch, via.params) == (
        "[::1]",
        5060,
        "z9hG4bK776",
        [("branch", "z9hG4bK776"), ("rport", None)],
    )


def test_uri_parameters_keep_their_order() -> None:
    text = "sip:1001@127.0.0.1:5070;lr;transport=udp;maddr=127.0.0.2;x-custom=A"
    uri = parse_uri(text)
    assert uri.params == [("lr", None), ("transport", "udp"), ("maddr", "127.0.0.2"), ("x-custom", "A")]
    assert str(uri) == text
    assert uri.param("LR") == "" and uri.has_param("Transport") and uri.param("ttl") is None
    uri.set_param("TRANSPORT", "tcp")  # changed in place, original spelling of the name kept
    uri.set_param("ob", None)
    assert str(uri) == "sip:1001@127.0.0.1:5070;lr;transport=tcp;maddr=127.0.0.2;x-custom=A;ob"


def test_escaped_users_are_kept_escaped() -> None:
    uri = parse_uri("sip:%61lice%40home@127.0.0.1")
    assert uri.user == "%61lice%40home" and str(uri) == "sip:%61lice%40home@127.0.0.1"
    semi = parse_uri("sip:user;par=u%40localhost@127.0.0.1;lr")
    assert (semi.user, semi.host, semi.params) == ("user;par=u%40localhost", "127.0.0.1", [("lr", None)])


def test_userinfo_may_hold_question_marks_and_a_password() -> None:
    uri = parse_uri("sip:a?b;c:pass,word@127.0.0.1?subject=x")
    assert (uri.user, uri.password, uri.host, uri.headers) == ("a?b;c", "pass,word", "127.0.0.1", "subject=x")
    assert str(uri) == "sip:a?b;c:pass,word@127.0.0.1?subject=x"
    no_user = parse_uri("sip:127.0.0.1;method=REGISTER?to=alice%40localhost")
    assert (no_user.user, no_user.params, no_user.headers) == (
        None,
        [("method", "REGISTER")],
        "to=alice%40localhost",
    )


def test_tel_and_opaque_uris() -> None:
    tel = parse_uri("tel:+15551234567;phone-context=localhost")
    assert (tel.scheme, tel.user, tel.params) == ("tel", "+15551234567", [("phone-context", "localhost")])
    assert str(tel) == "tel:+15551234567;phone-context=localhost"
    urn = parse_uri("urn:service:sos")
    assert (urn.scheme, urn.user, str(urn)) == ("urn", "service:sos", "urn:service:sos")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "Bad URI"),
        ("sip:a b@127.0.0.1", "Bad URI"),
        ("<sip:127.0.0.1>", "Bad URI"),
        ("nocolon", "Bad URI scheme"),
        ("1sip:127.0.0.1", "Bad URI scheme"),
        ("sip:@127.0.0.1", "Bad URI user part"),
        ("sip::secret@127.0.0.1", "Bad URI user part"),
        ("sip:1001@", "Bad URI host"),
        ("sip:1001@-bad-", "Bad URI host"),
        ("sip:127.0.0.1:0", "Bad URI port"),
        ("sip:127.0.0.1:５０６０", "Bad URI port"),  # full-width digits are not DIGIT
        ("sip:127.0.0.1:5060x", "Bad URI port"),
        ("sip:127.0.0.1;=x", "Bad URI parameter"),
        ("tel:", "Bad tel URI"),
    ],
)
def test_bad_uris(text: str, reason: str) -> None:
    assert reason_of(parse_uri, text) == reason


# -- name-addr, display names, parameters (RFC 3261 §20.10, §25.1) --------------------------------------


def test_quoted_display_names_with_escapes() -> None:
    na = parse_name_addr(r'"A \"quoted\" \\ name" <sip:1001@127.0.0.1>;tag=x1', header_name="From")
    assert na.display_name == 'A "quoted" \\ name' and na.tag == "x1" and na.bracketed
    again = parse_name_addr(str(na))
    assert (again.display_name, again.uri, again.params) == (na.display_name, na.uri, na.params)
    assert parse_name_addr('"" <sip:1001@127.0.0.1>').display_name == ""
    assert parse_name_addr("Alice   Smith <sip:1001@127.0.0.1>").display_name == "Alice Smith"
    assert parse_name_addr("<sip:1001@127.0.0.1>").display_name is None


def test_quote_escapes_what_a_quoted_string_cannot_hold() -> None:
    text = 'say "hi" \\ bell\x07 nul\x00'
    assert quote(text) == '"say \\"hi\\" \\\\ bell\\\x07 nul\\\x00"'
    assert unquote(quote(text)) == text
    assert quote("two\r\nlines") == '"two  lines"'  # no quoted-pair carries CR or LF
    assert parse_name_addr(quote(text) + " <sip:1001@127.0.0.1>").display_name == text


def test_header_parameters_versus_uri_parameters() -> None:
    addr_spec = parse_name_addr("sip:1001@127.0.0.1;expires=60;q=0.5")
    assert addr_spec.uri.params == [] and addr_spec.params == [("expires", "60"), ("q", "0.5")]
    assert not addr_spec.bracketed and str(addr_spec) == "sip:1001@127.0.0.1;expires=60;q=0.5"
    addr_spec.uri.set_param("transport", "tcp")  # now only <> can tell URI from header parameters
    assert str(addr_spec) == "<sip:1001@127.0.0.1;transport=tcp>;expires=60;q=0.5"
    name_addr = parse_name_addr('<sip:1001@127.0.0.1;transport=tcp>;+sip.instance="<urn:uuid:1>";reg-id=1')
    assert name_addr.uri.params == [("transport", "tcp")]
    assert name_addr.params == [("+sip.instance", '"<urn:uuid:1>"'), ("reg-id", "1")]
    quoted_angle = parse_name_addr('sip:1001@127.0.0.1;+sip.instance="<urn:uuid:1>"')
    assert quoted_angle.uri.host == "127.0.0.1" and quoted_angle.param("+SIP.INSTANCE") == '"<urn:uuid:1>"'
    name_addr.set_param("expires", "30")
    name_addr.set_param("REG-ID", "2")
    assert name_addr.params[-2:] == [("reg-id", "2"), ("expires", "30")]


@pytest.mark.parametrize(
    "value",
    [
        '"unterminated <sip:1001@127.0.0.1>',
        "<sip:1001@127.0.0.1",
        "< sip:1001@127.0.0.1>",
        "<sip:1001@127.0.0.1 >",
        "Bell, Alexander <sip:1001@127.0.0.1>",
        '"a" b <sip:1001@127.0.0.1>',
        "<sip:1001@127.0.0.1> junk",
        "sip:1001@127.0.0.1?Route=%3Csip:127.0.0.2%3E",
        "sip:a,b@127.0.0.1",
        "sip:1001 @127.0.0.1",
        "<sip:1001@127.0.0.1>;=x",
        "",
    ],
)
def test_bad_name_addrs_name_the_header(value: str) -> None:
    assert reason_of(lambda v: parse_name_addr(v, header_name="Refer-To"), value) == "Bad Refer-To header"


# -- header names and compact forms (RFC 3261 §7.3.3) ---------------------------------------------------


def test_compact_forms() -> None:
    for short, long in COMPACT_FORMS.items():
        assert canonical_name(short) == canonical_name(short.upper()) == long.lower()
    assert pretty_name("i") == "Call-ID" and pretty_name("cseq") == "CSeq" and pretty_name("x-a-b") == "X-A-B"
    m = parse_message(
        crlf(
            "REGISTER sip:127.0.0.1 SIP/2.0\nv: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKc\n"
            "f: <sip:1001@127.0.0.1>;tag=a\nt: <sip:1001@127.0.0.1>\ni: compact\nCSeq: 1 REGISTER\n"
            "m: <sip:1001@127.0.0.1:5070>\nContact: <sip:1001@127.0.0.1:5071>\nk: path, gruu\nl: 0\n\n"
        )
    )
    assert m.call_id == "compact" and m.top_via.branch == "z9hG4bKc" and m.from_.tag == "a"
    assert [c.uri.port for c in m.contacts] == [5070, 5071]
    assert m.get_all("Supported") == ["path", "gruu"]
    assert m.get("content-length") == m.get("L") == "0"


# -- comma-separated values (RFC 3261 §7.3.1) -----------------------------------------------------------


def test_multi_value_splitting_respects_quotes_and_angle_brackets() -> None:
    value = '"Doe, John" <sip:a@127.0.0.1>;q=0.5, <sip:b@127.0.0.1;x=1,2>,sip:c@127.0.0.1;p="a,b" ,  '
    assert split_values(value) == [
        '"Doe, John" <sip:a@127.0.0.1>;q=0.5',
        "<sip:b@127.0.0.1;x=1,2>",
        'sip:c@127.0.0.1;p="a,b"',
    ]
    assert split_values(r'"escaped \" quote, still quoted" <sip:a@127.0.0.1>, <sip:b@127.0.0.1>') == [
        r'"escaped \" quote, still quoted" <sip:a@127.0.0.1>',
        "<sip:b@127.0.0.1>",
    ]
    assert reason_of(split_values, '"unbalanced, <sip:a@127.0.0.1>') == "Unbalanced quotes"


def test_only_list_headers_are_split() -> None:
    m = parse_request(request_bytes("MESSAGE", "sip:1002@127.0.0.1", extra="Subject: one, two\nAllow: A, B"))
    assert m.get_all("Subject") == ["one, two"]
    assert m.get_all("Allow") == ["A", "B"]


def test_unbalanced_quotes_in_a_list_header_name_the_header() -> None:
    data = request_bytes("OPTIONS", "sip:127.0.0.1", extra='Record-Route: "x <sip:127.0.0.2;lr>')
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.reason == "Bad Record-Route header" and isinstance(info.value.message, SipRequest)


def test_star_contact() -> None:
    m = parse_request(request_bytes("REGISTER", "sip:127.0.0.1", contact="*", extra="Expires: 0"))
    assert m.is_star_contact and m.get_all("Contact") == ["*"] and m.expires == 0


# -- auth parameters (RFC 3261 §25.1, RFC 7616) ---------------------------------------------------------


def test_auth_params() -> None:
    value = (
        'Digest username="1001", realm="127.0.0.1",\tnonce="a,b\\"c", uri="sip:127.0.0.1",'
        ' response="0123abcd", algorithm=SHA-256, QOP=auth, nc=00000001, cnonce="c0ffee", opaque=""'
    )
    scheme, params = parse_auth(value)
    assert scheme == "Digest"
    assert params == {
        "username": "1001", "realm": "127.0.0.1", "nonce": 'a,b"c', "uri": "sip:127.0.0.1",
        "response": "0123abcd", "algorithm": "SHA-256", "qop": "auth", "nc": "00000001",
        "cnonce": "c0ffee", "opaque": "",
    }  # fmt: skip
    assert parse_auth("Digest\trealm=x") == ("Digest", {"realm": "x"})
    written = format_auth(
        "Digest", [("realm", "127.0.0.1", True), ("nonce", 'n"1', True), ("stale", "true", False)]
    )
    assert written == 'Digest realm="127.0.0.1", nonce="n\\"1", stale=true'
    assert parse_auth(written) == ("Digest", {"realm": "127.0.0.1", "nonce": 'n"1', "stale": "true"})


@pytest.mark.parametrize(
    "value", ["", "Di gest", "Digest realm", 'Digest realm="x', "Digest =x", "@ realm=x"]
)
def test_bad_auth_headers(value: str) -> None:
    assert reason_of(parse_auth, value) == "Bad Authorization header"


# -- scalar headers -------------------------------------------------------------------------------------


def test_cseq() -> None:
    assert parse_cseq("0009 \t INVITE") == (9, "INVITE")
    assert parse_cseq(f"{2**31 - 1} ACK") == (2**31 - 1, "ACK")
    for bad in (
        f"{2**31} INVITE",
        "1 INVITE extra",
        "INVITE",
        "-1 INVITE",
        "１ INVITE",
        "1" * 5000 + " BYE",
        "1 INV@TE",
    ):
        assert reason_of(parse_cseq, bad) == "Bad CSeq header", bad


@pytest.mark.parametrize(
    ("value", "expected"),
    [("70", 70), ("0068", 68), ("0", 0), ("255", 255), ("000000000255", 255)],
)
def test_max_forwards(value: str, expected: int) -> None:
    m = parse_request(
        request_bytes("OPTIONS", "sip:127.0.0.1").replace(
            b"Max-Forwards: 70", f"Max-Forwards: {value}".encode()
        )
    )
    assert m.max_forwards == expected


@pytest.mark.parametrize("value", ["256", "-1", "seventy", "٣", "9" * 5000, ""])
def test_bad_max_forwards(value: str) -> None:
    data = request_bytes("OPTIONS", "sip:127.0.0.1").replace(
        b"Max-Forwards: 70", f"Max-Forwards: {value}".encode()
    )
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.reason == "Bad Max-Forwards header"


def test_expires() -> None:
    def expires(value: str) -> int | None:
        return parse_request(request_bytes("REGISTER", "sip:127.0.0.1", extra=f"Expires: {value}")).expires

    assert expires("3600") == 3600 and expires("0") == 0 and expires("007") == 7
    assert expires(str(2**32 - 1)) == MAX_DELTA_SECONDS
    assert expires("1" + "0" * 5000) == MAX_DELTA_SECONDS  # no int() of a 5000-digit string
    for bad in ("-1", "soon", "٣", "1.5"):
        with pytest.raises(SipParseError) as info:
            parse_message(request_bytes("REGISTER", "sip:127.0.0.1", extra=f"Expires: {bad}"))
        assert info.value.reason == "Bad Expires header"


def test_content_length_must_be_ascii_digits() -> None:
    for bad in ("٣", "+3", "3 4", "1" * 20):
        data = request_bytes("OPTIONS", "sip:127.0.0.1").replace(
            b"Content-Length: 0", f"Content-Length: {bad}".encode()
        )
        with pytest.raises(SipParseError) as info:
            parse_message(data + b"abc")
        assert info.value.reason == "Bad Content-Length header", bad


@pytest.mark.parametrize(
    "value",
    [
        "SIP/2.0 UDP 127.0.0.1",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP 127.0.0.1:70000",
        "SIP/2.0/UDP 127.0.0.1:５０６０",
        "SIP/2.0/UDP 127.0.0.1;=x",
        "SIP/2.0/UDP 127.0.0.1 junk",
    ],
)
def test_bad_via(value: str) -> None:
    assert reason_of(parse_via, value) == "Bad Via header"


def test_via_with_lws_everywhere() -> None:
    via = parse_via("SIP  /  2.0 / udp   127.0.0.1 : 5070 ; branch = z9hG4bKx ; received=127.0.0.2;rport")
    assert (via.protocol, via.transport, via.host, via.port) == ("SIP/2.0", "UDP", "127.0.0.1", 5070)
    assert via.params == [("branch", "z9hG4bKx"), ("received", "127.0.0.2"), ("rport", None)]
    via.set_param("rport", "5070")
    assert str(via) == "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKx;received=127.0.0.2;rport=5070"


# -- changing messages ----------------------------------------------------------------------------------

THREE_VIAS = (
    "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKtop, SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bKmid\n"
    "Via: SIP/2.0/TCP 127.0.0.3:5060;branch=z9hG4bKlow"
)


def three_via_request() -> SipRequest:
    data = request_bytes("INVITE", "sip:1002@127.0.0.1", via_host="127.0.0.9:5070")
    data = data.replace(
        b"Via: SIP/2.0/UDP 127.0.0.9:5070",
        THREE_VIAS.replace("\n", "\r\n").encode() + b"\r\nVia: SIP/2.0/UDP 127.0.0.9:5070",
    )
    return parse_request(data)


def test_pop_first_value_on_comma_lists() -> None:
    m = three_via_request()
    assert [v.branch for v in m.vias][:3] == ["z9hG4bKtop", "z9hG4bKmid", "z9hG4bKlow"]
    assert m.pop_first_value("v") == "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKtop"
    assert m.headers[0] == Header("Via", "SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bKmid")
    assert m.headers[0].raw is None  # rewritten, no longer the bytes that arrived
    assert m.pop_first_value("Via") == "SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bKmid"
    assert m.pop_first_value("Via") == "SIP/2.0/TCP 127.0.0.3:5060;branch=z9hG4bKlow"
    assert len(m.vias) == 1 and m.top_via.host == "127.0.0.9"
    assert m.pop_first_value("Via") is not None and m.pop_first_value("Via") is None
    quoted = parse_request(
        request_bytes(
            "REGISTER", "sip:127.0.0.1", contact='"a, b" <sip:1001@127.0.0.1>, <sip:1001@127.0.0.2>'
        )
    )
    assert quoted.pop_first_value("Contact") == '"a, b" <sip:1001@127.0.0.1>'
    assert quoted.get_all("Contact") == ["<sip:1001@127.0.0.2>"]
    single = parse_request(request_bytes("MESSAGE", "sip:1002@127.0.0.1", extra="Subject: a, b"))
    assert single.pop_first_value("Subject") == "a, b" and not single.has("Subject")


def test_set_remove_insert_before_add() -> None:
    m = three_via_request()
    keys = [h.key for h in m.headers]
    m.set("v", "SIP/2.0/UDP 127.0.0.7;branch=z9hG4bKnew")  # replaces the first, removes the others
    assert m.get_all("Via") == ["SIP/2.0/UDP 127.0.0.7;branch=z9hG4bKnew"]
    assert m.headers[0].name == "Via" and [h.key for h in m.headers] == ["via"] + [
        k for k in keys if k != "via"
    ]
    m.set("X-New", "1")
    assert m.headers[-1] == Header("X-New", "1")
    m.insert_before("Via", "Record-Route", "<sip:127.0.0.1;lr>")
    assert m.headers[0] == Header("Record-Route", "<sip:127.0.0.1;lr>") and m.headers[1].key == "via"
    m.insert_before("Route", "X-Top", "t")  # no Route: goes on top
    assert m.headers[0] == Header("X-Top", "t")
    m.add("Via", "SIP/2.0/UDP 127.0.0.8;branch=z9hG4bKfirst", first=True)
    assert m.top_via.host == "127.0.0.8"
    m.add("x-last", "z")
    assert m.headers[-1] == Header("X-Last", "z")
    assert m.remove("VIA") == 2 and m.remove("Via") == 0 and not m.has("v")
    assert m.remove("i") == 1 and not m.has("Call-ID")


def test_make_response_copies_vias_in_order_and_adds_the_to_tag_once() -> None:
    m = three_via_request()
    response = make_response(m, 180, to_tag="t1")
    assert response.start_line() == "SIP/2.0 180 Ringing"
    assert response.get_all("Via") == m.get_all("Via") and len(response.get_all("Via")) == 4
    assert [h.raw for h in response.headers if h.key == "via"] == [h.raw for h in m.headers if h.key == "via"]
    assert [h.key for h in response.headers] == ["via", "via", "via", "from", "to", "call-id", "cseq"]
    assert response.to.tag == "t1" and response.from_.tag == "from1001"
    again = parse_message(response.to_bytes())
    assert isinstance(again, SipResponse) and again.to.tag == "t1"
    tagged = parse_request(
        response.to_bytes()
        .replace(b"SIP/2.0 180 Ringing", b"BYE sip:1002@127.0.0.1 SIP/2.0")
        .replace(b"CSeq: 1 INVITE", b"CSeq: 2 BYE")
    )
    assert make_response(tagged, 200, to_tag="t2").to.tag == "t1"  # already has one: untouched
    assert make_response(m, 100).to.tag is None
    uri_tag = parse_request(
        request_bytes("INVITE", "sip:1002@127.0.0.1", to_uri="sip:1002@127.0.0.1;tag=uri")
    )
    assert make_response(uri_tag, 200, to_tag="t3").to.tag == "t3"  # a `tag` URI parameter is no To tag
    assert make_response(m, 299).reason == "Unknown" and make_response(m, 486).reason == "Busy Here"
    extra = make_response(m, 423, headers=[("Min-Expires", "60")])
    assert extra.get("Min-Expires") == "60" and extra.headers[-1].name == "Min-Expires"


def test_content_length_is_rewritten_on_serialize() -> None:
    data = request_bytes("MESSAGE", "sip:1002@127.0.0.1", body="hello", extra="l: 5\nX-After: 1")
    m = parse_request(data)
    assert m.body == b"hello"
    m.body = b"hello, world"
    out = m.to_bytes()
    assert out.count(b"Content-Length") == 1 and b"\r\nl: " not in out
    assert out.index(b"Content-Length: 12\r\n") < out.index(b"X-After: 1")  # where the first one was
    assert out.endswith(b"\r\n\r\nhello, world")
    m.remove("Content-Length")
    assert m.to_bytes().endswith(b"Content-Length: 12\r\n\r\nhello, world")
    built = SipResponse(200, "OK", [Header("Via", "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx")])
    assert (
        built.to_bytes()
        == b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx\r\nContent-Length: 0\r\n\r\n"
    )


def test_untouched_headers_pass_through_byte_for_byte() -> None:
    folded = "X-Folded: first part\r\n\tsecond part\r\n   third"
    data = request_bytes("OPTIONS", "sip:127.0.0.1", extra="Subject:   spaced out  \nX-Case: v").replace(
        b"X-Case: v", folded.encode() + b"\r\nx-CASE  :v"
    )
    m = parse_request(data)
    assert m.get("X-Folded") == "first part second part third"
    assert m.get("x-case") == "v" and m.get("Subject") == "spaced out"
    out = m.to_bytes()
    assert (
        folded.encode() in out and b"\r\nx-CASE  :v\r\n" in out and b"\r\nSubject:   spaced out  \r\n" in out
    )
    m.set("Subject", "new")
    assert b"\r\nSubject: new\r\n" in m.to_bytes()


def test_copy_is_independent() -> None:
    m = three_via_request()
    clone = m.copy()
    clone.pop_first_value("Via")
    clone.uri.set_param("lr", None)
    assert len(m.vias) == 4 and not m.uri.has_param("lr")
    assert clone.to_bytes() != m.to_bytes()
