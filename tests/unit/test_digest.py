"""Digest authentication (RFC 7616, RFC 2617, RFC 3261 §22): vectors, challenge/verify round trips."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softswitch.sip.digest import (
    ALGORITHMS,
    NONCE_TTL_S,
    AuthOutcome,
    AuthResult,
    DigestAuthenticator,
    compute_response,
)

pytestmark = pytest.mark.timeout(30)

REALM = "softswitch.test"
SECRET = b"0123456789abcdef0123456789abcdef"
USERS = {"1001": "demo1001", "1002": "demo1002", 'we"ird\\user': "pa ss"}
URI = "sip:softswitch.test"
T0 = 1_000.0


def lookup(username: str) -> str | None:
    return USERS.get(username)


# -- RFC vectors -------------------------------------------------------------------------------------------

RFC7616_EXAMPLE = {
    "username": "Mufasa",
    "realm": "http-auth@example.org",
    "password": "Circle of Life",
    "method": "GET",
    "uri": "/dir/index.html",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "qop": "auth",
    "nc": "00000001",
    "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
}


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_section_3_9_1_example(algorithm: str, expected: str) -> None:
    assert compute_response(algorithm=algorithm, **RFC7616_EXAMPLE) == expected


def test_rfc2617_section_3_5_example() -> None:
    response = compute_response(
        algorithm="MD5",
        username="Mufasa",
        realm="testrealm@host.com",
        password="Circle Of Life",
        method="GET",
        uri="/dir/index.html",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
    )
    assert response == "6629fae49393a05397450978507c4ef1"


def test_rfc2069_example_without_qop() -> None:
    # RFC 2069 §2.4 example (the response printed there is wrong; this is the value of its erratum),
    # the RFC 2617 §3.2.2.1 compatibility form: H(H(A1):nonce:H(A2)).
    response = compute_response(
        algorithm="MD5",
        username="Mufasa",
        realm="testrealm@host.com",
        password="CircleOfLife",
        method="GET",
        uri="/dir/index.html",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
    )
    assert response == "1949323746fe6a43ef61f9606e7febea"


def test_algorithm_name_is_case_insensitive() -> None:
    lower = compute_response(algorithm="sha-256", **RFC7616_EXAMPLE)
    assert lower == "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithm": "SHA-512-256"},
        {"algorithm": "MD5-sess"},
        {"algorithm": "MD5", "qop": "auth-int", "nc": "00000001", "cnonce": "x"},
        {"algorithm": "MD5", "qop": "auth", "nc": None, "cnonce": "x"},
        {"algorithm": "MD5", "qop": "auth", "nc": "00000001", "cnonce": None},
    ],
)
def test_compute_response_rejects_what_it_cannot_compute(kwargs: dict[str, str | None]) -> None:
    base: dict[str, str | None] = {
        "username": "u",
        "realm": "r",
        "password": "p",
        "method": "REGISTER",
        "uri": URI,
        "nonce": "n",
    }
    with pytest.raises(ValueError):
        compute_response(**{**base, **kwargs})  # type: ignore[arg-type]


def test_rfc7616_example_credentials_are_judged_against_our_nonces() -> None:
    # The RFC's own credentials: the password is right, but the nonce is not one this server issued.
    server = DigestAuthenticator("http-auth@example.org", SECRET)
    ex = RFC7616_EXAMPLE
    header = (
        f'Digest username="{ex["username"]}", realm="{ex["realm"]}", uri="{ex["uri"]}", '
        f'algorithm=SHA-256, nonce="{ex["nonce"]}", nc={ex["nc"]}, cnonce="{ex["cnonce"]}", qop=auth, '
        'response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1", '
        'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
    )

    def mufasa(username: str) -> str | None:
        return "Circle of Life" if username == "Mufasa" else None

    # The RFC's opaque is not ours either: still only a stale nonce, since the password is right.
    result = server.verify(method="GET", headers=[header], now=T0, lookup_password=mufasa)
    assert result == AuthResult(AuthOutcome.STALE, "Mufasa", result.detail)
    wrong = server.verify(method="GET", headers=[header], now=T0, lookup_password=lambda _: "Circle Of Life")
    assert wrong.outcome is AuthOutcome.WRONG_CREDENTIALS


# -- helpers: a client built on the RFC text, not on the module's parser ---------------------------------

_PARAM_RE = re.compile(r'([A-Za-z0-9_-]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))')


def parse_challenge(value: str) -> dict[str, str]:
    assert value.startswith("Digest ")
    return {
        name.lower(): (re.sub(r"\\(.)", r"\1", quoted) if quoted or not bare else bare)
        for name, quoted, bare in _PARAM_RE.findall(value[len("Digest ") :])
    }


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def answer(
    challenge_value: str,
    *,
    username: str = "1001",
    password: str | None = None,
    method: str = "REGISTER",
    uri: str = URI,
    qop: bool = True,
    nc: int = 1,
    cnonce: str = "0a4f113b",
    send_algorithm: bool = True,
    realm: str | None = None,
) -> str:
    """Authorization header value answering one challenge header (RFC 7616 §3.4)."""
    chal = parse_challenge(challenge_value)
    algorithm = chal["algorithm"]
    password = USERS[username] if password is None else password
    nc_text = f"{nc:08x}"
    response = compute_response(
        algorithm=algorithm,
        username=username,
        realm=chal["realm"],
        password=password,
        method=method,
        uri=uri,
        nonce=chal["nonce"],
        qop="auth" if qop else None,
        nc=nc_text if qop else None,
        cnonce=cnonce if qop else None,
    )
    parts = [
        f"username={quote(username)}",
        f"realm={quote(realm if realm is not None else chal['realm'])}",
        f"nonce={quote(chal['nonce'])}",
        f"uri={quote(uri)}",
        f"response={quote(response)}",
        f"opaque={quote(chal['opaque'])}",
    ]
    if send_algorithm:
        parts.append(f"algorithm={algorithm}")
    if qop:
        parts += [f"qop=auth, nc={nc_text}", f"cnonce={quote(cnonce)}"]
    return "Digest " + ", ".join(parts)


def challenge_for(server: DigestAuthenticator, algorithm: str, now: float = T0) -> str:
    for _name, value in server.challenge(now, proxy=False):
        if parse_challenge(value)["algorithm"] == algorithm:
            return value
    raise AssertionError(f"no {algorithm} challenge")


@pytest.fixture
def server() -> DigestAuthenticator:
    return DigestAuthenticator(REALM, SECRET)


def verify(
    server: DigestAuthenticator, header: str | list[str], now: float = T0, method: str = "REGISTER"
) -> AuthResult:
    headers = [header] if isinstance(header, str) else header
    return server.verify(method=method, headers=headers, now=now, lookup_password=lookup)


# -- challenges --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("proxy", "name"), [(False, "WWW-Authenticate"), (True, "Proxy-Authenticate")])
def test_challenge_offers_each_algorithm_strongest_first_with_one_nonce(
    server: DigestAuthenticator, proxy: bool, name: str
) -> None:
    headers = server.challenge(T0, proxy=proxy)
    assert [header_name for header_name, _ in headers] == [name, name]
    params = [parse_challenge(value) for _, value in headers]
    assert [p["algorithm"] for p in params] == list(ALGORITHMS) == ["SHA-256", "MD5"]
    assert {p["nonce"] for p in params} == {params[0]["nonce"]}
    for p in params:
        assert p["realm"] == REALM
        assert p["qop"] == "auth"
        assert p["opaque"]
        assert "stale" not in p
    assert re.fullmatch(
        r'Digest realm="softswitch\.test", nonce="[A-Za-z0-9_-]+", opaque="[0-9a-f]+", '
        r'algorithm=SHA-256, qop="auth"',
        headers[0][1],
    )


def test_stale_challenge_says_so(server: DigestAuthenticator) -> None:
    for _, value in server.challenge(T0, proxy=True, stale=True):
        assert value.endswith(", stale=true")
        assert parse_challenge(value)["stale"] == "true"


def test_every_challenge_has_a_fresh_nonce(server: DigestAuthenticator) -> None:
    nonces = {parse_challenge(server.challenge(T0, proxy=False)[0][1])["nonce"] for _ in range(200)}
    assert len(nonces) == 200


def test_configured_algorithms_and_their_order() -> None:
    server = DigestAuthenticator(REALM, SECRET, algorithms=("md5", "SHA-256"))
    assert [parse_challenge(v)["algorithm"] for _, v in server.challenge(T0, proxy=False)] == [
        "MD5",
        "SHA-256",
    ]


def test_realm_with_quote_is_escaped() -> None:
    server = DigestAuthenticator('odd "realm"', SECRET)
    value = server.challenge(T0, proxy=False)[0][1]
    assert value.startswith('Digest realm="odd \\"realm\\"", ')
    assert parse_challenge(value)["realm"] == 'odd "realm"'
    assert verify(server, answer(value)).ok


@pytest.mark.parametrize(
    "kwargs",
    [
        {"realm": "", "secret": SECRET},
        {"realm": REALM, "secret": SECRET, "nonce_ttl_s": 0},
        {"realm": REALM, "secret": SECRET, "algorithms": ()},
        {"realm": REALM, "secret": SECRET, "algorithms": ("SHA-512-256",)},
        {"realm": REALM, "secret": SECRET, "max_tracked_nonces": 0},
    ],
)
def test_invalid_configuration_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DigestAuthenticator(**kwargs)  # type: ignore[arg-type]


# -- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("qop", [True, False])
def test_round_trip(server: DigestAuthenticator, algorithm: str, qop: bool) -> None:
    header = answer(challenge_for(server, algorithm), qop=qop)
    result = verify(server, header, now=T0 + 1)
    assert result.ok
    assert result.outcome is AuthOutcome.OK
    assert result.username == "1001"


def test_absent_algorithm_means_md5(server: DigestAuthenticator) -> None:
    header = answer(challenge_for(server, "MD5"), send_algorithm=False)
    assert verify(server, header).ok
    # An SHA-256 response without the algorithm parameter is judged as MD5, and fails.
    header = answer(challenge_for(server, "SHA-256"), send_algorithm=False)
    assert verify(server, header).outcome is AuthOutcome.WRONG_CREDENTIALS


def test_invite_round_trip_uses_method(server: DigestAuthenticator) -> None:
    value = challenge_for(server, "SHA-256")
    header = answer(value, method="INVITE", uri="sip:1002@softswitch.test")
    assert verify(server, header, method="INVITE").ok
    # The same credentials for another method do not match (A2 = method:uri).
    other = answer(value, method="INVITE", uri="sip:1002@softswitch.test", nc=2)
    assert verify(server, other, method="MESSAGE").outcome is AuthOutcome.WRONG_CREDENTIALS


def test_digest_uri_is_used_as_given(server: DigestAuthenticator) -> None:
    header = answer(challenge_for(server, "MD5"), uri="sip:somewhere-else.invalid")
    assert verify(server, header).ok


def test_username_with_quotes_and_backslashes(server: DigestAuthenticator) -> None:
    header = answer(challenge_for(server, "SHA-256"), username='we"ird\\user')
    result = verify(server, header)
    assert result.ok
    assert result.username == 'we"ird\\user'


def test_uppercase_response_and_scheme_accepted(server: DigestAuthenticator) -> None:
    header = answer(challenge_for(server, "SHA-256"))
    response = re.search(r'response="([0-9a-f]+)"', header)
    assert response is not None
    header = header.replace(response.group(1), response.group(1).upper()).replace("Digest ", "DIGEST ", 1)
    assert verify(server, header).ok


def test_opaque_may_be_omitted(server: DigestAuthenticator) -> None:
    header = re.sub(r'opaque="[^"]*", ', "", answer(challenge_for(server, "MD5")))
    assert "opaque" not in header
    assert verify(server, header).ok


# -- failures ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("qop", [True, False])
def test_wrong_password(server: DigestAuthenticator, algorithm: str, qop: bool) -> None:
    header = answer(challenge_for(server, algorithm), password="demo1002", qop=qop)
    result = verify(server, header)
    assert result.outcome is AuthOutcome.WRONG_CREDENTIALS
    assert not result.ok
    assert result.username == "1001"
    assert "demo" not in result.detail


def test_unknown_user(server: DigestAuthenticator) -> None:
    header = answer(challenge_for(server, "SHA-256"), username="1001", password="x").replace(
        'username="1001"', 'username="9999"'
    )
    result = verify(server, header)
    assert result == AuthResult(AuthOutcome.UNKNOWN_USER, "9999", result.detail)


def test_missing(server: DigestAuthenticator) -> None:
    assert verify(server, []).outcome is AuthOutcome.MISSING


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_stale_after_ttl_only_for_correct_responses(server: DigestAuthenticator, algorithm: str) -> None:
    value = challenge_for(server, algorithm, now=T0)
    good = answer(value)
    bad = answer(value, password="wrong")
    # Still fresh at exactly the TTL.
    assert verify(server, good, now=T0 + NONCE_TTL_S).ok
    late = T0 + NONCE_TTL_S + 0.001
    assert verify(server, answer(value, nc=2), now=late).outcome is AuthOutcome.STALE
    assert verify(server, bad, now=late).outcome is AuthOutcome.WRONG_CREDENTIALS
    unknown = answer(value).replace('username="1001"', 'username="nobody"')
    assert verify(server, unknown, now=late).outcome is AuthOutcome.UNKNOWN_USER
    # After a stale answer, the client retries on a fresh challenge and succeeds.
    fresh = server.challenge(late, proxy=False, stale=True)
    assert verify(server, answer(fresh[0][1]), now=late).ok


def test_custom_ttl() -> None:
    server = DigestAuthenticator(REALM, SECRET, nonce_ttl_s=5)
    value = challenge_for(server, "MD5")
    assert verify(server, answer(value), now=T0 + 5).ok
    assert verify(server, answer(value, nc=2), now=T0 + 5.5).outcome is AuthOutcome.STALE


def test_nonce_from_the_future_is_stale(server: DigestAuthenticator) -> None:
    header = answer(challenge_for(server, "MD5", now=T0 + 100))
    assert verify(server, header, now=T0).outcome is AuthOutcome.STALE


def test_nc_must_increase(server: DigestAuthenticator) -> None:
    value = challenge_for(server, "SHA-256")
    first = answer(value, nc=1)
    assert verify(server, first).ok
    replay = verify(server, first, now=T0 + 1)
    assert replay.outcome is AuthOutcome.REPLAY
    assert replay.username == "1001"
    assert verify(server, answer(value, nc=2, cnonce="other"), now=T0 + 2).ok
    assert verify(server, answer(value, nc=7), now=T0 + 3).ok  # gaps are allowed
    assert verify(server, answer(value, nc=5), now=T0 + 4).outcome is AuthOutcome.REPLAY
    assert verify(server, answer(value, nc=7), now=T0 + 4).outcome is AuthOutcome.REPLAY
    assert verify(server, answer(value, nc=8), now=T0 + 5).ok
    # A replay with a wrong password is just wrong credentials.
    assert verify(server, answer(value, nc=8, password="x")).outcome is AuthOutcome.WRONG_CREDENTIALS


def test_nc_zero_is_never_accepted(server: DigestAuthenticator) -> None:
    assert verify(server, answer(challenge_for(server, "MD5"), nc=0)).outcome is AuthOutcome.REPLAY


def test_nc_is_tracked_per_nonce(server: DigestAuthenticator) -> None:
    first = challenge_for(server, "MD5")
    second = challenge_for(server, "MD5")
    assert verify(server, answer(first, nc=3)).ok
    assert verify(server, answer(second, nc=1)).ok
    assert verify(server, answer(first, nc=3)).outcome is AuthOutcome.REPLAY


def test_nonce_without_qop_is_good_once(server: DigestAuthenticator) -> None:
    value = challenge_for(server, "MD5")
    header = answer(value, qop=False)
    assert verify(server, header).ok
    # RFC 2617 form has no nc: a second use could be a replay, so the client is sent for a fresh nonce.
    assert verify(server, header, now=T0 + 1).outcome is AuthOutcome.STALE
    assert verify(server, answer(value, nc=5), now=T0 + 1).outcome is AuthOutcome.REPLAY


def _flip_nonce_char(header: str, index: int) -> str:
    match = re.search(r'nonce="([^"]+)"', header)
    assert match is not None
    nonce = match.group(1)
    replacement = "A" if nonce[index] != "A" else "B"
    return header.replace(nonce, nonce[:index] + replacement + nonce[index + 1 :])


@pytest.mark.parametrize("index", [0, 5, 12, 20, -1])
def test_forged_nonce_is_rejected(server: DigestAuthenticator, index: int) -> None:
    # The client computes its response over the altered nonce, so only the HMAC can tell.
    value = _flip_nonce_char(challenge_for(server, "SHA-256"), index)
    result = verify(server, answer(value))
    assert result.outcome is AuthOutcome.STALE  # right password, nonce not ours: fresh challenge
    assert not result.ok
    assert verify(server, answer(value, password="x")).outcome is AuthOutcome.WRONG_CREDENTIALS


def test_nonce_of_another_secret_or_realm_is_rejected(server: DigestAuthenticator) -> None:
    other_secret = DigestAuthenticator(REALM, b"another secret of sixteen bytes+")
    assert verify(server, answer(challenge_for(other_secret, "MD5"))).outcome is AuthOutcome.STALE
    other_realm = DigestAuthenticator("elsewhere.test", SECRET)
    header = answer(challenge_for(other_realm, "MD5"), realm=REALM)  # response computed for elsewhere
    assert verify(server, header).outcome is AuthOutcome.WRONG_CREDENTIALS
    # Even computed for our realm, that nonce is not ours.
    nonce = parse_challenge(challenge_for(other_realm, "MD5"))["nonce"]
    ours = challenge_for(server, "MD5")
    forged = ours.replace(parse_challenge(ours)["nonce"], nonce)
    assert verify(server, answer(forged)).outcome is AuthOutcome.STALE


def test_nonces_do_not_survive_a_restart(server: DigestAuthenticator) -> None:
    # Same realm and secret, but the nc table is gone: accepting old nonces would let a captured request
    # be replayed. They are stale (no password prompt), and a fresh challenge works.
    header = answer(challenge_for(server, "SHA-256"))
    assert verify(server, header).ok
    restarted = DigestAuthenticator(REALM, SECRET)
    assert verify(restarted, header).outcome is AuthOutcome.STALE
    assert verify(restarted, answer(challenge_for(server, "SHA-256"))).outcome is AuthOutcome.STALE
    assert verify(restarted, answer(challenge_for(restarted, "SHA-256"))).ok


def test_opaque_is_stable_for_a_realm_and_secret(server: DigestAuthenticator) -> None:
    restarted = DigestAuthenticator(REALM, SECRET)
    other = DigestAuthenticator(REALM, b"another secret")
    opaque = parse_challenge(challenge_for(server, "MD5"))["opaque"]
    assert parse_challenge(challenge_for(restarted, "MD5"))["opaque"] == opaque
    assert parse_challenge(challenge_for(other, "MD5"))["opaque"] != opaque


@pytest.mark.parametrize(
    "nonce",
    ["", "short", "A" * 43, "!" * 43, "A" * 44, "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"],
)
def test_garbage_nonce_never_ok(server: DigestAuthenticator, nonce: str) -> None:
    value = challenge_for(server, "MD5")
    forged = value.replace(parse_challenge(value)["nonce"], nonce)
    assert verify(server, answer(forged)).outcome is AuthOutcome.STALE
    assert verify(server, answer(forged, password="x")).outcome is AuthOutcome.WRONG_CREDENTIALS


def test_non_canonical_nonce_spelling_is_not_ours(server: DigestAuthenticator) -> None:
    # 43 base64 characters carry 258 bits for 256: the last character has two unused bits. Setting them
    # decodes to the same bytes, but must not count as the same (or another valid) nonce.
    value = challenge_for(server, "MD5")
    nonce = parse_challenge(value)["nonce"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(nonce[-1])
    assert last % 4 == 0
    twin = nonce[:-1] + alphabet[last + 1]
    assert verify(server, answer(value.replace(nonce, twin))).outcome is AuthOutcome.STALE


def test_opaque_of_another_server_is_stale(server: DigestAuthenticator) -> None:
    value = challenge_for(server, "MD5")
    header = answer(value).replace(parse_challenge(value)["opaque"], "0123456789abcdef")
    assert verify(server, header).outcome is AuthOutcome.STALE


def test_wrong_realm(server: DigestAuthenticator) -> None:
    header = answer(challenge_for(server, "MD5"), realm="other.test")
    result = verify(server, header)
    assert result.outcome is AuthOutcome.REALM_MISMATCH
    assert result.username == "1001"


def test_credentials_for_our_realm_are_picked_among_several(server: DigestAuthenticator) -> None:
    ours = answer(challenge_for(server, "SHA-256"))
    theirs = 'Digest username="x", realm="upstream.test", nonce="n", uri="sip:a", response="00"'
    assert verify(server, [theirs, "Basic dXNlcjpwYXNz", ours]).ok
    assert verify(server, [theirs]).outcome is AuthOutcome.REALM_MISMATCH


def test_credentials_with_an_offered_algorithm_are_preferred(server: DigestAuthenticator) -> None:
    ours = answer(challenge_for(server, "MD5"))
    unsupported = ours.replace("algorithm=MD5", "algorithm=MD5-sess")
    assert verify(server, [unsupported, ours]).ok


@pytest.mark.parametrize("algorithm", ["MD5-sess", "SHA-256-sess", "SHA-512-256", "SHA"])
def test_unsupported_algorithm(server: DigestAuthenticator, algorithm: str) -> None:
    header = answer(challenge_for(server, "MD5")).replace("algorithm=MD5", f"algorithm={algorithm}")
    result = verify(server, header)
    assert result.outcome is AuthOutcome.ALGORITHM_UNSUPPORTED
    assert result.username == "1001"


def test_algorithm_not_configured_is_unsupported() -> None:
    sha_only = DigestAuthenticator(REALM, SECRET, algorithms=("SHA-256",))
    assert len(sha_only.challenge(T0, proxy=False)) == 1
    md5 = DigestAuthenticator(REALM, SECRET, algorithms=("MD5",))
    header = answer(challenge_for(md5, "MD5"))  # the algorithm is judged before the nonce
    assert verify(md5, header).ok
    assert verify(sha_only, header).outcome is AuthOutcome.ALGORITHM_UNSUPPORTED
    no_algorithm = answer(challenge_for(md5, "MD5"), send_algorithm=False)
    assert verify(sha_only, no_algorithm).outcome is AuthOutcome.ALGORITHM_UNSUPPORTED


def _valid(server: DigestAuthenticator) -> str:
    return answer(challenge_for(server, "MD5"))


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda h: "Basic dXNlcjpwYXNz", "not Digest"),
        (lambda h: "Digest", "no params"),
        (lambda h: "", "empty"),
        (lambda h: "   ", "blank"),
        (lambda h: "=", "no scheme"),
        (lambda h: h.replace("Digest ", "Digest; "), "bad scheme char"),
        (lambda h: h[:-3], "cut in the middle of a quoted value"),
        (lambda h: h + ', x="unterminated', "unterminated quote"),
        (lambda h: h + ', x="ends in backslash\\', "dangling backslash"),
        (lambda h: h + ", justaname", "param without value"),
        (lambda h: h + ", =value", "value without name"),
        (lambda h: h + ', qop="auth"', "repeated param"),
        (lambda h: h.replace('", ', '" ', 1), "missing comma"),
        (lambda h: re.sub(r'username="[^"]*", ', "", h), "no username"),
        (lambda h: re.sub(r'username="[^"]*"', "username*=UTF-8''%C3%A4", h), "username* only"),
        (lambda h: re.sub(r'nonce="[^"]*", ', "", h), "no nonce"),
        (lambda h: re.sub(r'uri="[^"]*", ', "", h), "no uri"),
        (lambda h: re.sub(r'response="[^"]*", ', "", h), "no response"),
        (lambda h: re.sub(r'realm="[^"]*", ', "", h), "no realm"),
        (lambda h: re.sub(r'response="[^"]*"', 'response="zz"', h), "response not hex"),
        (lambda h: re.sub(r'response="[^"]*"', 'response="é"', h), "response not ascii"),
        (lambda h: re.sub(r'response="[^"]*"', 'response=""', h), "empty response"),
        (lambda h: h.replace("nc=00000001", "nc=1"), "short nc"),
        (lambda h: h.replace("nc=00000001", "nc=0000000g"), "nc not hex"),
        (lambda h: h.replace("nc=00000001, ", ""), "qop without nc"),
        (lambda h: re.sub(r'cnonce="[^"]*"', "", h), "qop without cnonce"),
        (lambda h: h.replace("qop=auth", "qop=auth-int"), "auth-int not offered"),
        (lambda h: h + ", userhash=true", "userhash not offered"),
        (lambda h: h + "\x00", "nul byte"),
        (lambda h: h + ', x-pad="' + "x" * 10_000 + '"', "too long"),
    ],
)
def test_malformed_credentials(server: DigestAuthenticator, mutate: Callable[[str], str], why: str) -> None:
    header = mutate(_valid(server))
    result = verify(server, header)
    assert result.outcome is AuthOutcome.MALFORMED, why
    assert result.detail


def test_userhash_false_and_unknown_params_are_accepted(server: DigestAuthenticator) -> None:
    header = _valid(server) + ', userhash=false, charset=UTF-8, x-extension="a, b"'
    assert verify(server, header).ok


def test_sloppy_but_readable_credentials(server: DigestAuthenticator) -> None:
    # Unquoted URI (some phones), extra whitespace and empty list elements (RFC 9110 §5.6.1).
    value = challenge_for(server, "MD5")
    header = answer(value, uri="sip:softswitch.test;transport=tcp")
    header = header.replace(
        'uri="sip:softswitch.test;transport=tcp"', "uri=sip:softswitch.test;transport=tcp"
    )
    header = header.replace(", ", " ,  , \t").replace("Digest ", "  Digest\t ")
    assert verify(server, header).ok


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=4))
def test_arbitrary_text_never_raises_nor_passes(headers: list[str]) -> None:
    server = DigestAuthenticator(REALM, SECRET)
    result = server.verify(method="REGISTER", headers=headers, now=T0, lookup_password=lookup)
    assert isinstance(result.outcome, AuthOutcome)
    assert not result.ok


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=40), st.text(max_size=20))
def test_mangled_credentials_never_raise(position: int, cut: int, insert: str) -> None:
    server = DigestAuthenticator(REALM, SECRET)
    header = _valid(server)
    position %= len(header) + 1
    mangled = header[:position] + insert + header[position + cut :]
    result = server.verify(method="REGISTER", headers=[mangled], now=T0, lookup_password=lookup)
    assert isinstance(result.outcome, AuthOutcome)
    if result.ok:
        # Only harmless edits (whitespace, unknown parameters, the uri's quoting...) may still pass; the
        # parameters the response covers must be intact.
        assert "response=" in mangled
        assert "nonce=" in mangled


def test_lookup_sees_the_username_exactly(server: DigestAuthenticator) -> None:
    seen: list[str] = []

    def recording(username: str) -> str | None:
        seen.append(username)
        return USERS.get(username)

    header = answer(challenge_for(server, "MD5"), username='we"ird\\user')
    assert server.verify(method="REGISTER", headers=[header], now=T0, lookup_password=recording).ok
    assert seen == ['we"ird\\user']


# -- bounded nc table --------------------------------------------------------------------------------------


def test_tracked_nonces_are_bounded_and_forgotten_ones_are_stale() -> None:
    server = DigestAuthenticator(REALM, SECRET, max_tracked_nonces=10)
    first = challenge_for(server, "SHA-256", now=T0)
    assert verify(server, answer(first), now=T0).ok
    for i in range(1, 50):
        now = T0 + i * 0.01
        assert verify(server, answer(challenge_for(server, "SHA-256", now=now)), now=now).ok
        assert server.tracked_nonces <= 10
    assert server.tracked_nonces == 10
    # The first nonce's nc was forgotten while it was still live: a replay of nc=1 (or anything else)
    # cannot be told from a new use, so it is answered as stale, never accepted.
    later = T0 + 1
    assert verify(server, answer(first), now=later).outcome is AuthOutcome.STALE
    assert verify(server, answer(first, nc=2), now=later).outcome is AuthOutcome.STALE
    # Nonces issued after the forgotten ones still work, and so do fresh ones.
    assert verify(server, answer(challenge_for(server, "MD5", now=later)), now=later).ok


def test_expired_nonces_leave_the_table_first() -> None:
    server = DigestAuthenticator(REALM, SECRET, nonce_ttl_s=10, max_tracked_nonces=1000)
    held = challenge_for(server, "MD5", now=T0 + 95)  # issued, answered only at the end
    for i in range(100):
        assert verify(server, answer(challenge_for(server, "MD5", now=T0 + i)), now=T0 + i).ok
    # Entries older than the TTL are dropped as new ones arrive: the table holds the live ones only.
    assert server.tracked_nonces <= 11
    assert verify(server, answer(held), now=T0 + 100).ok
