"""Malformed SIP against the running edge: it answers what it can, drops the rest, and keeps serving.

RFC 3261 §16.3 / §8.2.2 (a request that cannot be processed gets 400 with a reason phrase naming the
problem; responses follow the Via, so without a readable Via nothing can be sent, §18.2.2), §21.5.26
(505 for another SIP version), §18.3 (Content-Length framing, and resynchronising a TCP stream).
Every datagram goes from and to 127.0.0.1 and carries only loopback addresses.
"""

from __future__ import annotations

import functools
import random
import re
import socket
import time
from dataclasses import dataclass

import pytest

from tests.integration.conftest import DEMO_PASSWORDS
from tests.integration.helpers import RunningSoftswitch
from tests.integration.peers import LOOPBACK, Sipp

pytestmark = pytest.mark.integration

BURST_SIZE = 300  # malformed datagrams in one burst
SOCKET_BUFFER = 4_194_304  # our receive buffer: the whole burst's answers fit without loss
ANSWER_TIMEOUT_S = 10.0  # for every expected 400 to arrive after the burst
QUIET_PERIOD_S = 1.0  # after the last expected answer, how long unexpected answers are waited for
OPTIONS_TIMEOUT_S = 5.0  # a valid request after the burst is answered at once
TCP_READ_TIMEOUT_S = 5.0
HUGE_HEADER_BYTES = 9_000  # one header line longer than the edge's 8 KiB line limit, in one datagram
TOO_MANY_VIAS = 80  # above the edge's Via limit (a 70-hop path is already a loop)
RANDOM_SEED = 3261  # the burst's random garbage is the same on every run


@dataclass(frozen=True)
class Case:
    """One kind of malformed message and what the edge must do with it."""

    name: str
    expect: tuple[int, ...]  # acceptable statuses of the answer; () when nothing may come back
    keyword: str | None = None  # regex (case-insensitive) the reason phrase must match


def _request(
    token: str,
    local_port: int,
    edge_port: int,
    *,
    transport: str = "UDP",
    method: str = "OPTIONS",
    start_line: str | None = None,
    drop: tuple[str, ...] = (),
    replace: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    body: str = "",
    content_length: str | None = None,
) -> bytes:
    """An OPTIONS to the edge (RFC 3261 §11) with headers dropped, replaced or added as asked; ``token``
    goes into the branch and the Call-ID so answers can be matched."""
    headers = {
        "Via": f"SIP/2.0/{transport} {LOOPBACK}:{local_port};branch=z9hG4bK{token};rport",
        "Max-Forwards": "70",
        "From": f"<sip:probe@{LOOPBACK}>;tag={token}",
        "To": f"<sip:{LOOPBACK}:{edge_port}>",
        "Call-ID": f"{token}@{LOOPBACK}",
        "CSeq": f"1 {method}",
        "Content-Length": content_length if content_length is not None else str(len(body.encode())),
    }
    headers.update(replace or {})
    lines = [start_line or f"{method} sip:{LOOPBACK}:{edge_port} SIP/2.0"]
    lines += [f"{name}: {value}" for name, value in headers.items() if name not in drop]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


CASES_WITH_VIA = [
    Case("missing Call-ID", (400,), r"call-id"),
    Case("missing From", (400,), r"\bfrom\b"),
    Case("missing To", (400,), r"\bto\b"),
    Case("missing CSeq", (400,), r"cseq"),
    Case("bad CSeq number", (400,), r"cseq"),
    Case("CSeq method mismatch", (400,), r"cseq"),
    Case("bad From", (400,), r"\bfrom\b"),
    Case("bad To", (400,), r"\bto\b"),
    Case("Content-Length beyond body", (400,), r"content-length"),
    Case("non-numeric Content-Length", (400,), r"content-length"),
    Case("bad Max-Forwards", (400,), r"max-forwards"),
    Case("bad Request-URI", (400,), r"uri"),
    Case("too many Via headers", (400,), r"\bvia"),
    # RFC 3261 §21.5.14 513 Message Too Large is as good an answer as 400 here.
    Case("huge header", (400, 513), r"header|long|large|size"),
    Case("SIP version 3.0", (505,), r"version"),
]
CASES_WITHOUT_ANSWER = [
    Case("no Via", ()),
    Case("unreadable Via", ()),
    Case("Via without a host", ()),
    Case("random printable garbage", ()),
    Case("random binary garbage", ()),
    Case("request line only", ()),
    Case("truncated in the request line", ()),
    Case("CRLF keep-alive", ()),
    Case("malformed response", ()),
    Case("malformed ACK", ()),
]
ALL_CASES = CASES_WITH_VIA + CASES_WITHOUT_ANSWER


def _build(case: Case, token: str, local_port: int, edge_port: int, rng: random.Random) -> bytes:
    req = functools.partial(_request, token, local_port, edge_port)

    match case.name:
        case "missing Call-ID":
            return req(drop=("Call-ID",))
        case "missing From":
            return req(drop=("From",))
        case "missing To":
            return req(drop=("To",))
        case "missing CSeq":
            return req(drop=("CSeq",))
        case "bad CSeq number":
            return req(replace={"CSeq": "abc OPTIONS"})
        case "CSeq method mismatch":
            return req(replace={"CSeq": "1 INVITE"})
        case "bad From":
            return req(replace={"From": "<<<sip:probe@127.0.0.1"})
        case "bad To":
            return req(replace={"To": "<<<sip:edge@127.0.0.1"})
        case "Content-Length beyond body":
            return req(body="v=0\r\n", content_length="500")
        case "non-numeric Content-Length":
            return req(content_length="many")
        case "bad Max-Forwards":
            return req(replace={"Max-Forwards": "seventy"})
        case "bad Request-URI":
            return req(start_line="OPTIONS not-a-uri SIP/2.0")
        case "too many Via headers":
            vias = tuple(
                f"Via: SIP/2.0/UDP {LOOPBACK}:{5000 + i};branch=z9hG4bKhop{i}" for i in range(TOO_MANY_VIAS)
            )
            return req(extra=vias)
        case "SIP version 3.0":
            return req(start_line=f"OPTIONS sip:{LOOPBACK}:{edge_port} SIP/3.0")
        case "no Via":
            return req(drop=("Via",))
        case "unreadable Via":
            return req(replace={"Via": f"garbage;branch=z9hG4bK{token}"})
        case "Via without a host":
            return req(replace={"Via": f"SIP/2.0/UDP ;branch=z9hG4bK{token}"})
        case "random printable garbage":
            return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz :;<>@\r\n") for _ in range(200)).encode()
        case "random binary garbage":
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600)))
        case "request line only":
            return f"OPTIONS sip:{LOOPBACK}:{edge_port} SIP/2.0\r\n\r\n".encode()
        case "truncated in the request line":
            return f"OPTIONS sip:{LOOPBACK}:{edge_port} SI".encode()
        case "CRLF keep-alive":
            return b"\r\n\r\n"
        case "malformed response":
            return (
                f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP {LOOPBACK}:{local_port};branch=z9hG4bK{token}\r\n"
                f"From: <sip:probe@{LOOPBACK}>;tag={token}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            ).encode()
        case "malformed ACK":
            return req(method="ACK", drop=("Call-ID",))
        case "huge header":
            return req(extra=("X-Padding: " + "a" * HUGE_HEADER_BYTES,))
    raise AssertionError(f"no builder for {case.name}")


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.bind((LOOPBACK, 0))
    return sock


def _status_line(data: bytes) -> tuple[int, str] | None:
    match = re.match(rb"SIP/2\.0 (\d{3}) ([^\r\n]*)\r?\n", data)
    if match is None:
        return None
    return int(match.group(1)), match.group(2).decode(errors="replace")


def _options_ok(sock: socket.socket, edge_port: int, token: str) -> bytes:
    """Send a valid OPTIONS to the edge and return its answer (RFC 3261 §11.2: 200)."""
    local_port = sock.getsockname()[1]
    sock.sendto(_request(token, local_port, edge_port), (LOOPBACK, edge_port))
    deadline = time.monotonic() + OPTIONS_TIMEOUT_S
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, _ = sock.recvfrom(65_535)
        except TimeoutError:
            break
        if token.encode() in data:
            return data
    raise AssertionError(f"no answer to a valid OPTIONS within {OPTIONS_TIMEOUT_S} s")


@pytest.mark.timeout(90)
def test_udp_burst_of_malformed_datagrams(edge: RunningSoftswitch, sipp: Sipp) -> None:
    rng = random.Random(RANDOM_SEED)
    sock = _udp_socket()
    local_port = sock.getsockname()[1]
    sent: dict[str, Case] = {}
    try:
        for i in range(BURST_SIZE):
            case = ALL_CASES[i % len(ALL_CASES)]
            token = f"malf{i:04d}x"
            sent[token] = case
            sock.sendto(_build(case, token, local_port, edge.sip_port, rng), (LOOPBACK, edge.sip_port))

        expected = {t for t, c in sent.items() if c.expect}
        answers: dict[str, list[tuple[int, str]]] = {}
        unmatched: list[bytes] = []
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        quiet_until: float | None = None
        while True:
            now = time.monotonic()
            if expected <= answers.keys() and quiet_until is None:
                quiet_until = now + QUIET_PERIOD_S
            stop = min(deadline, quiet_until) if quiet_until is not None else deadline
            if now >= stop:
                break
            sock.settimeout(stop - now)
            try:
                data, source = sock.recvfrom(65_535)
            except TimeoutError:
                break
            assert source == (LOOPBACK, edge.sip_port), source
            if not data.strip():
                continue  # a CRLF keep-alive pong (RFC 5626 §4.4.1) is harmless even over UDP
            tokens = set(re.findall(rb"malf\d{4}x", data))
            status = _status_line(data)
            if len(tokens) != 1 or status is None:
                unmatched.append(data[:300])
                continue
            answers.setdefault(tokens.pop().decode(), []).append(status)

        problems: list[str] = []
        for token, case in sent.items():
            got = answers.get(token, [])
            if not case.expect:
                if got:
                    problems.append(f"{case.name} ({token}): expected no answer, got {got}")
                continue
            if not got:
                problems.append(f"{case.name} ({token}): no answer, expected {case.expect}")
                continue
            code, reason = got[0]
            if code not in case.expect:
                problems.append(f"{case.name} ({token}): got {code} {reason}, expected {case.expect}")
            elif case.keyword and not re.search(case.keyword, reason, re.IGNORECASE):
                problems.append(f"{case.name} ({token}): reason {reason!r} does not name the problem")
        problems += [f"answer matching no datagram: {data!r}" for data in unmatched]
        # One line per kind of problem is enough to act on.
        distinct = sorted({re.sub(r" \(malf\d{4}x\)", "", p) for p in problems})
        assert not problems, "\n".join(distinct)

        # The edge still serves: OPTIONS, then a full digest registration, and the process is alive.
        ok = _status_line(_options_ok(sock, edge.sip_port, "afterburst01x"))
        assert ok is not None and ok[0] == 200, ok
    finally:
        sock.close()
    registered = sipp.run(
        "register_digest",
        edge.sip_port,
        users=[("1001", DEMO_PASSWORDS["1001"])],
        sets={"expires": "300"},
        timeout_s=20,
    )
    assert registered.ok, registered.describe()
    assert edge.process.poll() is None, edge.log_tail()


def _read_answers(conn: socket.socket, wanted: bytes, timeout_s: float) -> list[bytes]:
    """Read SIP messages from a TCP connection (framed by Content-Length) until one contains ``wanted``."""
    buffer = b""
    messages: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while True:
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                break
            length = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", buffer[:head_end])
            total = head_end + 4 + (int(length.group(1)) if length else 0)
            if len(buffer) < total:
                break
            messages.append(buffer[:total])
            buffer = buffer[total:]
            if wanted in messages[-1]:
                return messages
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"nothing containing {wanted!r} within {timeout_s} s; got {messages!r}")
        conn.settimeout(remaining)
        try:
            data = conn.recv(65_536)
        except TimeoutError:
            continue
        if not data:
            raise AssertionError(f"the edge closed the connection; got {messages!r}")
        buffer += data


@pytest.mark.timeout(60)
def test_tcp_stream_resynchronises_after_garbage(edge: RunningSoftswitch) -> None:
    """Garbage on a TCP connection does not desynchronise it for good (RFC 3261 §18.3): a valid request
    after it, on the same connection, is answered."""
    with socket.create_connection((LOOPBACK, edge.sip_port), timeout=TCP_READ_TIMEOUT_S) as conn:
        local_port = conn.getsockname()[1]

        def tcp_request(token: str, drop: tuple[str, ...] = ()) -> bytes:
            return _request(token, local_port, edge.sip_port, transport="TCP", drop=drop)

        # A framed but malformed request is answered on the connection, naming the problem.
        conn.sendall(tcp_request("tcpbad01x", drop=("Call-ID",)))
        answers = _read_answers(conn, b"tcpbad01x", TCP_READ_TIMEOUT_S)
        status = _status_line(answers[-1])
        assert status is not None and status[0] == 400, answers[-1][:300]
        assert re.search("call-id", status[1], re.IGNORECASE), status

        # Garbage lines, a header block without a start line, and binary junk (no line breaks inside), each
        # ended by an empty line, then a valid OPTIONS right behind them in the same segment.
        junk = bytes(b for b in random.Random(RANDOM_SEED).randbytes(2_048) if b not in b"\r\n")[:512]
        garbage = (
            b"this is not SIP at all\r\n\r\n"
            b"Via: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bKorphan\r\nCSeq: 1 OPTIONS\r\n\r\n"
            + junk
            + b"\r\n\r\n"
        )
        conn.sendall(garbage + tcp_request("tcpgood01x"))
        answers = _read_answers(conn, b"tcpgood01x", TCP_READ_TIMEOUT_S)
        status = _status_line(answers[-1])
        assert status is not None and status[0] == 200, answers[-1][:300]
        for answer in answers[:-1]:
            earlier = _status_line(answer)
            assert earlier is None or earlier[0] >= 400, answer[:300]

        # The stream stays in step for the next request too.
        conn.sendall(tcp_request("tcpgood02x"))
        answers = _read_answers(conn, b"tcpgood02x", TCP_READ_TIMEOUT_S)
        status = _status_line(answers[-1])
        assert status is not None and status[0] == 200, answers[-1][:300]
    assert edge.process.poll() is None, edge.log_tail()
