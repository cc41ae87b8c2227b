"""Properties of the SIP message layer, checked with hypothesis (STYLE.md 12).

- Any bytes give a message or a `SipParseError`, never another exception; a message that parses can be
  read through every typed accessor the edge uses without a non-SIP exception.
- Well-formed messages serialise and parse back to the same start line, header values and body.
- `StreamFramer` cuts the same messages out of a stream however the stream is chunked.
- Folded headers are written back byte for byte.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from softswitch.sip.errors import SipParseError
from softswitch.sip.headers import (
    MULTI_VALUE,
    is_token,
    parse_auth,
    parse_cseq,
    parse_name_addr,
    parse_via,
    quote,
    split_values,
    unquote,
)
from softswitch.sip.message import Header, SipRequest, SipResponse
from softswitch.sip.parser import StreamFramer, parse_message
from softswitch.sip.uri import SipUri, parse_uri

from .siputil import request_bytes

#: Examples per property: enough to find grammar holes in a few seconds, not minutes.
EXAMPLES = 300
FEWER = 150

pytestmark = pytest.mark.timeout(120)

TORTURE = Path(__file__).parent / "torture"
SEEDS = [p.read_bytes() for p in sorted(TORTURE.glob("*.dat"))] + [
    request_bytes("INVITE", "sip:1002@127.0.0.1", body="v=0\r\n", extra="Route: <sip:127.0.0.1;lr>")
]

fuzz_settings = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- strategies -----------------------------------------------------------------------------------------

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=12)
#: Characters a user part may hold unescaped (RFC 3261 §25.1 unreserved / user-unreserved), minus ":".
user_text = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.!~*'()&=+$,;?/", min_size=1, max_size=12)
loopback_hosts = st.sampled_from(["127.0.0.1", "127.0.0.2", "localhost", "edge.localhost", "[::1]"])
param_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
param_values = st.one_of(st.none(), st.text("abcdefghijklmnopqrstuvwxyz0123456789-.", max_size=8))
#: Header text: printable, no CR/LF, no leading or trailing whitespace (which unfolding trims).
header_text = st.text(
    st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="\r\n"), max_size=40
).map(str.strip)


@st.composite
def sip_uris(draw: st.DrawFn) -> SipUri:
    return SipUri(
        draw(st.sampled_from(["sip", "sips"])),
        draw(st.one_of(st.none(), user_text)),
        None,
        draw(loopback_hosts),
        draw(st.one_of(st.none(), st.integers(1, 65535))),
        draw(st.lists(st.tuples(param_names, param_values), max_size=3)),
    )


def name_addr(draw: st.DrawFn, tag: str | None) -> str:
    uri = draw(sip_uris())
    display = draw(st.one_of(st.none(), st.just(""), header_text, st.text(TOKEN_CHARS + " ", max_size=15)))
    out = "" if display is None else (quote(display) + " ")
    out += f"<{uri}>"
    return out + (f";tag={tag}" if tag else "")


@st.composite
def sip_messages(draw: st.DrawFn) -> SipRequest | SipResponse:
    """A well-formed request or response, as an edge or a phone would write it."""
    method = draw(st.one_of(st.sampled_from(["INVITE", "ACK", "BYE", "REGISTER", "OPTIONS"]), tokens))
    vias = draw(
        st.lists(
            st.tuples(st.sampled_from(["UDP", "TCP", "TLS"]), loopback_hosts, tokens), min_size=1, max_size=3
        )
    )
    headers = [Header("Via", f"SIP/2.0/{t} {h};branch=z9hG4bK{b}") for t, h, b in vias]
    headers += [
        Header("From", name_addr(draw, draw(tokens))),
        Header("To", name_addr(draw, draw(st.one_of(st.none(), tokens)))),
        Header("Call-ID", draw(st.text(TOKEN_CHARS + "@:<>()", min_size=1, max_size=30))),
        Header("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}"),
    ]
    if draw(st.booleans()):
        headers.append(Header("Contact", name_addr(draw, None)))
    extra = draw(st.lists(st.tuples(tokens.map(lambda t: "X-" + t), header_text), max_size=5))
    headers += [Header(name, value) for name, value in extra]
    draw(st.randoms()).shuffle(headers)
    body = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        headers.insert(0, Header("Max-Forwards", str(draw(st.integers(0, 255)))))
        return SipRequest(method, draw(sip_uris()), headers, body)
    reason = draw(st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=30))
    return SipResponse(draw(st.integers(100, 699)), reason, headers, body)


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    """A real message with a few octets replaced, inserted or deleted: reaches the header grammar,
    which random bytes almost never do."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    interesting = b'\x00\r\n \t:;,<>"\\%@?=/[]0123456789\xff\xc3\xa9'
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "duplicate"]))
        octet = draw(st.one_of(st.sampled_from(list(interesting)), st.integers(0, 255)))
        if kind == "replace" and at < len(data):
            data[at] = octet
        elif kind == "insert":
            data[at:at] = bytes([octet])
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 40))]
    return bytes(data)


# -- any bytes → message or SipParseError ---------------------------------------------------------------


def assert_parses_or_rejects(data: bytes) -> None:
    try:
        message = parse_message(data)
    except SipParseError as e:
        assert e.reason and 100 <= e.status <= 699
        assert "\r" not in e.reason and "\n" not in e.reason  # it becomes a reason phrase
        return
    # What the edge reads from every message that got through (RFC 3261 §8.1.1 headers):
    assert message.vias and message.top_via == message.vias[0]
    _ = (message.from_, message.to, message.call_id, message.cseq, message.max_forwards, message.expires)
    for name in MULTI_VALUE:
        message.get_all(name)
    if not message.is_star_contact:
        _ = message.contacts
    reparsed = parse_message(message.to_bytes())
    assert reparsed.start_line() == message.start_line() and reparsed.body == message.body


@fuzz_settings
@given(st.binary(max_size=2000))
@example(b"SIP/2.0 4294967301 x\r\n\r\n")
@example(b"INVITE sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: \xd9\xa3\r\n\r\n")
def test_any_bytes_give_a_message_or_a_parse_error(data: bytes) -> None:
    assert_parses_or_rejects(data)


@fuzz_settings
@given(mutated_seeds())
@example((TORTURE / "noreason.dat").read_bytes().replace(b"100 \r\n", b"100 Tr\xffing\r\n"))
@example((TORTURE / "lwsdisp.dat").read_bytes().replace(b"sip:user@", b"sip:us\xe9r@", 1))
def test_mutated_messages_give_a_message_or_a_parse_error(data: bytes) -> None:
    assert_parses_or_rejects(data)


@fuzz_settings
@given(st.text(max_size=200))
def test_header_grammar_functions_raise_only_parse_errors(text: str) -> None:
    for parse in (parse_uri, parse_name_addr, parse_via, parse_auth, parse_cseq, split_values):
        with contextlib.suppress(SipParseError):
            parse(text)


# -- round trip -----------------------------------------------------------------------------------------


@fuzz_settings
@given(sip_messages())
def test_well_formed_messages_round_trip(message: SipRequest | SipResponse) -> None:
    data = message.to_bytes()
    parsed = parse_message(data)
    assert type(parsed) is type(message)
    assert parsed.start_line() == message.start_line()
    assert [(h.name, h.value) for h in parsed.headers if h.key != "content-length"] == [
        (h.name, h.value) for h in message.headers
    ]
    assert parsed.body == message.body
    assert parsed.to_bytes() == data  # and writing it again changes nothing


@fuzz_settings
@given(st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=40))
def test_display_names_round_trip_through_quoting(name: str) -> None:
    assert unquote(quote(name)) == name
    parsed = parse_name_addr(f"{quote(name)} <sip:1001@127.0.0.1>;tag=1", header_name="From")
    assert parsed.display_name == name and parsed.tag == "1"


# -- stream framing -------------------------------------------------------------------------------------


@settings(max_examples=FEWER, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(sip_messages().map(lambda m: m.to_bytes()), st.just(b"\r\n\r\n")), min_size=1, max_size=5
    ),
    st.lists(st.integers(0, 4000), max_size=12),
)
def test_stream_framer_finds_the_same_messages_however_chunked(items: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(items)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    framer = StreamFramer()
    out: list[bytes | SipParseError] = []
    for chunk in chunks:
        out += framer.feed(chunk)
    assert out == items


@fuzz_settings
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_stream_framer_never_raises(chunks: list[bytes]) -> None:
    framer = StreamFramer()
    for chunk in chunks:
        for item in framer.feed(chunk):
            assert isinstance(item, bytes | SipParseError)
            if isinstance(item, bytes) and item != b"\r\n\r\n":
                assert_parses_or_rejects(item)


# -- folded headers pass through ------------------------------------------------------------------------


@fuzz_settings
@given(
    tokens.map(lambda t: "X-" + t),
    st.lists(
        st.tuples(st.text(" \t", min_size=1, max_size=4), header_text.filter(bool)),
        min_size=1,
        max_size=4,
    ),
    header_text.filter(bool),
)
def test_folded_headers_pass_through_byte_for_byte(
    name: str, continuations: list[tuple[str, str]], first: str
) -> None:
    """RFC 3261 §7.3.1: the edge reads the unfolded value but forwards the lines as they came."""
    assert is_token(name)
    raw = f"{name}: {first}".encode() + b"".join(b"\r\n" + (ws + text).encode() for ws, text in continuations)
    data = request_bytes("OPTIONS", "sip:127.0.0.1").replace(
        b"\r\nContent-Length", b"\r\n" + raw + b"\r\nContent-Length"
    )
    message = parse_message(data)
    assert message.get(name) == " ".join([first] + [text for _, text in continuations])
    out = message.to_bytes()
    assert b"\r\n" + raw + b"\r\n" in out
    assert out == data
