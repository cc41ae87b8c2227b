"""SHA-256 digest (RFC 7616) over a real socket, and bindings that survive a restart of the node."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from softswitch.sip.digest import compute_response
from tests.integration.helpers import running_softswitch

RECV_TIMEOUT_S = 3.0


def _register(
    sock: socket.socket, port: int, user: str, cseq: int, auth: str = "", expires: int = 300
) -> str:
    local = sock.getsockname()[1]
    msg = (
        f"REGISTER sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bKsha{time.time_ns()};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{user}@127.0.0.1>;tag=sha1\r\nTo: <sip:{user}@127.0.0.1>\r\n"
        f"Call-ID: sha-{local}@127.0.0.1\r\nCSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:{user}@127.0.0.1:{local}>\r\nExpires: {expires}\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    sock.sendto(msg.encode(), ("127.0.0.1", port))
    while True:
        data = sock.recv(65535).decode()
        if not data.startswith("SIP/2.0 1"):
            return data


def _answer(challenge: str, algorithm: str, port: int, user: str, password: str) -> str:
    values = re.findall(r"^WWW-Authenticate: (.*)$", challenge, re.M)
    chosen = next(v for v in values if f"algorithm={algorithm}" in v)
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', chosen))
    uri = f"sip:127.0.0.1:{port}"
    response = compute_response(
        algorithm=algorithm, username=user, realm=params["realm"], password=password, method="REGISTER",
        uri=uri, nonce=params["nonce"], qop="auth", nc="00000001", cnonce="abcdef",
    )  # fmt: skip
    return (
        f'Authorization: Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", '
        f'uri="{uri}", response="{response}", algorithm={algorithm}, qop=auth, nc=00000001, '
        f'cnonce="abcdef", opaque="{params.get("opaque", "")}"\r\n'
    )


def test_sha256_digest_registers_and_the_binding_survives_a_restart(tmp_path: Path) -> None:
    extra = '[sip]\ndigest_algorithms = ["SHA-256", "MD5"]\n'
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(RECV_TIMEOUT_S)
    sock.bind(("127.0.0.1", 0))
    try:
        with running_softswitch(tmp_path / "a", extra) as node:
            challenge = _register(sock, node.sip_port, "1001", 1)
            assert challenge.startswith("SIP/2.0 401")
            algorithms = re.findall(r"algorithm=([\w-]+)", challenge)
            assert algorithms == ["SHA-256", "MD5"]  # strongest first (RFC 7616 §3.7)
            auth = _answer(challenge, "SHA-256", node.sip_port, "1001", "demo1001")
            final = _register(sock, node.sip_port, "1001", 2, auth)
            assert final.startswith("SIP/2.0 200"), final
            assert f"<sip:1001@127.0.0.1:{sock.getsockname()[1]}>;expires=" in final
            data_dir = node.data_dir
            time.sleep(0.6)  # bindings are written behind every 0.25 s
        # A new node on the same data_dir still knows the binding: a query REGISTER lists it.
        with running_softswitch(tmp_path / "b", f'data_dir = "{data_dir}"\n{extra}') as node:
            challenge = _register(sock, node.sip_port, "1001", 3)
            auth = _answer(challenge, "MD5", node.sip_port, "1001", "demo1001")
            local = sock.getsockname()[1]
            query = _register_query(sock, node.sip_port, "1001", 4, auth)
            assert query.startswith("SIP/2.0 200"), query
            assert f"<sip:1001@127.0.0.1:{local}>;expires=" in query
    finally:
        sock.close()


def _register_query(sock: socket.socket, port: int, user: str, cseq: int, auth: str) -> str:
    """A REGISTER without Contact lists the current bindings (RFC 3261 §10.2.3)."""
    local = sock.getsockname()[1]
    msg = (
        f"REGISTER sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bKq{time.time_ns()};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{user}@127.0.0.1>;tag=q1\r\nTo: <sip:{user}@127.0.0.1>\r\n"
        f"Call-ID: query-{local}@127.0.0.1\r\nCSeq: {cseq} REGISTER\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    sock.sendto(msg.encode(), ("127.0.0.1", port))
    while True:
        data = sock.recv(65535).decode()
        if not data.startswith("SIP/2.0 1"):
            return data
