"""HTTP Digest authentication for SIP (RFC 3261 §22, RFC 8760, RFC 7616, RFC 2617 §3.2.2 compatibility).

Sans-IO: `DigestAuthenticator.challenge(now, …)` returns the challenge headers of a 401/407 and
`DigestAuthenticator.verify(…, now, …)` judges the credentials of a request. Nothing here touches a socket
or a clock; the caller passes `now` and maps the `AuthOutcome` to a response (RFC 3261 §22.2, §22.3).

Nonces are stateless (RFC 7616 §3.3 suggests this construction): each one carries its issue time and a
random part, authenticated with an HMAC, so any nonce can be checked for authenticity and age without a
table. The only state is the last nonce count (`nc`) accepted per nonce, kept for replay protection
(RFC 7616 §3.4) in a bounded table; see `MAX_TRACKED_NONCES`. The HMAC key is derived from the server
secret and a random value drawn when the authenticator is built, so nonces survive nothing: after a
restart, which empties the `nc` table, the old nonces no longer verify and a captured request cannot be
replayed; a client holding one gets `stale=true` and retries without asking its user.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Algorithms offered, strongest first: RFC 7616 §3.7 (and RFC 8760 §2.3 for SIP) has the server send one
#: challenge per algorithm in order of preference, and the client use the first one it supports. Not every
#: deployed client follows that: baresip 1.0.0 fails to register when any challenge names SHA-256,
#: whatever the order, and SIPp 3.6.1 reads only the first challenge and knows only MD5. Where such
#: clients must work, build the authenticator with `algorithms=("MD5",)`.
ALGORITHMS: tuple[str, ...] = ("SHA-256", "MD5")

#: Default nonce lifetime in seconds. Long enough for a phone to answer the challenge and reuse the nonce
#: for the next few requests (RFC 7616 §3.3 lets a client reuse a nonce with a higher `nc`), short enough
#: that a captured nonce is soon useless; an expired nonce costs a legitimate client one extra round trip
#: (`stale=true`, RFC 7616 §3.3), never a password prompt.
NONCE_TTL_S = 300.0

#: Nonces whose last accepted `nc` is remembered. An entry is added only after a request proved knowledge
#: of a password, so the table grows with legitimate traffic, not with attacker input; the bound is there
#: so that even that cannot exhaust memory (about 200 bytes per entry: 20 MB at the limit). At 300 s of
#: nonce lifetime it holds the nonces of ~330 authentications per second. When it is full the entry first
#: seen longest ago is dropped and every nonce issued no later than a dropped live one is answered as stale
#: (a fresh challenge) rather than accepted with a forgotten `nc`: memory stays bounded without reopening
#: replay.
MAX_TRACKED_NONCES = 100_000

#: Longest credentials header value examined. Real Digest credentials (a long SIP URI, a 64-digit
#: SHA-256 response, nonce, cnonce) stay well under 1 KiB; refusing longer ones bounds the work per header.
MAX_CREDENTIALS_LENGTH = 8192

#: Authorization/Proxy-Authorization headers examined per request. A request carries one set of
#: credentials per realm on its path (RFC 3261 §22.3); 32 realms is far beyond any real path, and the cap
#: bounds the parsing work a single request can cause.
MAX_CREDENTIAL_HEADERS = 32

# RFC 7616 §3.2 algorithm names -> hashlib names.
_HASHES: dict[str, str] = {"MD5": "md5", "SHA-256": "sha256"}

# Nonce layout (before base64url without padding): issue time (IEEE double, big-endian), random bytes,
# truncated HMAC-SHA-256 of both and the realm, under the authenticator's nonce key.
_NONCE_TIME = struct.Struct(">d")
#: 64 random bits: two nonces issued at the same instant collide with probability 2^-64.
_NONCE_RANDOM_BYTES = 8
#: 128-bit MAC: a forged nonce is accepted with probability 2^-128 per attempt.
_NONCE_MAC_BYTES = 16
#: Random salt of the nonce key, drawn per authenticator: 128 bits, so no two runs share a key.
_NONCE_KEY_SALT_BYTES = 16
_NONCE_RAW_BYTES = _NONCE_TIME.size + _NONCE_RANDOM_BYTES + _NONCE_MAC_BYTES
_NONCE_TEXT_LENGTH = (_NONCE_RAW_BYTES * 8 + 5) // 6
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]+")

_NC_RE = re.compile(r"[0-9A-Fa-f]{8}")  # RFC 7616 §3.4: nc is exactly 8 hex digits
_HEX_RE = re.compile(r"[0-9A-Fa-f]+")

# RFC 9110 §5.6.2 token characters (auth-scheme and auth-param names).
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OWS = " \t"

# `nc` recorded for a nonce used once without qop (RFC 2617 form): higher than any real nc, so neither
# form may use that nonce again.
_NC_USED_WITHOUT_QOP = 1 << 32


class AuthOutcome(enum.Enum):
    """Verdict of `DigestAuthenticator.verify` (RFC 3261 §22, RFC 7616 §3.4-§3.5)."""

    OK = "ok"
    MISSING = "missing"  # no credentials header at all: challenge
    MALFORMED = "malformed"  # unparseable, wrong scheme, missing or invalid parameters
    STALE = "stale"  # correct response for a nonce that expired or is not ours: challenge with stale=true
    WRONG_CREDENTIALS = "wrong_credentials"  # the response does not match the password
    UNKNOWN_USER = "unknown_user"  # no password for the username (treat like WRONG_CREDENTIALS)
    REPLAY = "replay"  # correct response whose nc does not exceed the last accepted for its nonce
    REALM_MISMATCH = "realm_mismatch"  # credentials only for other realms: challenge (RFC 3261 §22.3)
    ALGORITHM_UNSUPPORTED = "algorithm_unsupported"  # algorithm not offered (e.g. MD5-sess)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Outcome of one verification.

    `username` is the username of the credentials examined (None when none could be read); `detail`
    says in a few words why the outcome is what it is, for logs. It never contains a secret.
    """

    outcome: AuthOutcome
    username: str | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.outcome is AuthOutcome.OK


class _Malformed(Exception):
    """A credentials header that cannot be parsed (private: `verify` never lets it escape)."""


def _encode(text: str) -> bytes:
    """UTF-8 of `text`; undecodable bytes kept as the parser escaped them (RFC 7616 §4: UTF-8)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _hash_hex(algorithm: str, text: str) -> str:
    return hashlib.new(_HASHES[algorithm], _encode(text)).hexdigest()


def _canonical_algorithm(algorithm: str) -> str | None:
    upper = algorithm.upper()
    return upper if upper in _HASHES else None


def compute_response(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
) -> str:
    """The `response` of Digest credentials (RFC 7616 §3.4.1; without qop, RFC 2617 §3.2.2.1).

    A1 = username:realm:password, A2 = method:uri; with qop=auth the response is
    H(H(A1):nonce:nc:cnonce:qop:H(A2)), without qop H(H(A1):nonce:H(A2)). Only qop "auth" is supported
    (auth-int would need the body). Raises ValueError for an unknown algorithm or incomplete qop fields.
    """
    canonical = _canonical_algorithm(algorithm)
    if canonical is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    ha1 = _hash_hex(canonical, f"{username}:{realm}:{password}")
    ha2 = _hash_hex(canonical, f"{method}:{uri}")
    if qop is None:
        return _hash_hex(canonical, f"{ha1}:{nonce}:{ha2}")
    if qop.lower() != "auth":
        raise ValueError(f"unsupported qop {qop!r}")
    if nc is None or cnonce is None:
        raise ValueError("qop=auth needs nc and cnonce")
    return _hash_hex(canonical, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def _parse_credentials(value: str) -> tuple[str, dict[str, str]]:
    """Split `scheme param=value, …` (RFC 9110 §11.4, RFC 7616 §3.4).

    Parameter names are lower-cased, quoted values unquoted (backslash escapes removed). Tolerant where
    clients are sloppy: an unquoted value may contain any character but a comma, and empty list elements
    are skipped. Raises `_Malformed` on anything else: a missing "=", an unterminated quoted string,
    text after a value without a comma, a repeated parameter.
    """
    if len(value) > MAX_CREDENTIALS_LENGTH:
        raise _Malformed(f"credentials longer than {MAX_CREDENTIALS_LENGTH} characters")
    text = value.strip(_OWS)
    end = len(text)
    pos = 0
    while pos < end and text[pos] in _TCHARS:
        pos += 1
    scheme = text[:pos]
    if not scheme:
        raise _Malformed("no auth scheme")
    if pos < end and text[pos] not in _OWS:
        raise _Malformed(f"invalid character {text[pos]!r} in auth scheme")
    params: dict[str, str] = {}
    while True:
        while pos < end and (text[pos] in _OWS or text[pos] == ","):
            pos += 1
        if pos >= end:
            return scheme, params
        start = pos
        while pos < end and text[pos] in _TCHARS:
            pos += 1
        name = text[start:pos].lower()
        if not name:
            raise _Malformed(f"invalid character {text[pos]!r} where a parameter name was expected")
        while pos < end and text[pos] in _OWS:
            pos += 1
        if pos >= end or text[pos] != "=":
            raise _Malformed(f"parameter {name!r} has no value")
        pos += 1
        while pos < end and text[pos] in _OWS:
            pos += 1
        if pos < end and text[pos] == '"':
            pos += 1
            chars: list[str] = []
            while True:
                if pos >= end:
                    raise _Malformed(f"unterminated quoted value of {name!r}")
                char = text[pos]
                if char == "\\":
                    if pos + 1 >= end:
                        raise _Malformed(f"unterminated quoted value of {name!r}")
                    chars.append(text[pos + 1])
                    pos += 2
                elif char == '"':
                    pos += 1
                    break
                else:
                    chars.append(char)
                    pos += 1
            param = "".join(chars)
            while pos < end and text[pos] in _OWS:
                pos += 1
            if pos < end and text[pos] != ",":
                raise _Malformed(f"text after the quoted value of {name!r}")
        else:
            comma = text.find(",", pos)
            stop = end if comma < 0 else comma
            param = text[pos:stop].rstrip(_OWS)
            pos = stop
        if name in params:
            raise _Malformed(f"parameter {name!r} repeated")
        params[name] = param


def _quote(text: str) -> str:
    """A quoted-string (RFC 9110 §5.6.4)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class _NonceCheck:
    issued: float | None  # issue time when the nonce is authentic, else None
    problem: str | None  # why the nonce cannot be used now, or None


class DigestAuthenticator:
    """Digest challenges and verification for one realm (RFC 3261 §22.1-§22.4, RFC 7616 §3.3-§3.5).

    `secret` keys the opaque value and, with a random value drawn here, the nonce HMAC: nonces verify
    only on the authenticator that issued them (see the module docstring).
    `algorithms` are offered in the order given, one challenge header each (RFC 7616 §3.7).
    """

    def __init__(
        self,
        realm: str,
        secret: bytes,
        *,
        nonce_ttl_s: float = NONCE_TTL_S,
        algorithms: Sequence[str] = ALGORITHMS,
        max_tracked_nonces: int = MAX_TRACKED_NONCES,
    ) -> None:
        if not realm:
            raise ValueError("realm must not be empty")
        if nonce_ttl_s <= 0:
            raise ValueError("nonce_ttl_s must be positive")
        if max_tracked_nonces < 1:
            raise ValueError("max_tracked_nonces must be at least 1")
        canonical: list[str] = []
        for algorithm in algorithms:
            name = _canonical_algorithm(algorithm)
            if name is None:
                raise ValueError(f"unsupported digest algorithm {algorithm!r}; supported: {ALGORITHMS}")
            if name not in canonical:
                canonical.append(name)
        if not canonical:
            raise ValueError("at least one algorithm is needed")
        self.realm = realm
        self.nonce_ttl_s = float(nonce_ttl_s)
        self.algorithms: tuple[str, ...] = tuple(canonical)
        self._nonce_key = hmac.new(
            secret, b"nonce-key\0" + secrets.token_bytes(_NONCE_KEY_SALT_BYTES), hashlib.sha256
        ).digest()
        self._realm_bytes = _encode(realm)
        self._opaque = hmac.new(secret, b"opaque\0" + self._realm_bytes, hashlib.sha256).hexdigest()[:32]
        self._max_tracked = max_tracked_nonces
        # nonce -> (issue time, last nc accepted), in order of first acceptance.
        self._nonce_counts: OrderedDict[str, tuple[float, int]] = OrderedDict()
        # Latest issue time of a live nonce dropped from `_nonce_counts`: untracked nonces issued no later
        # than this may have been used already, so they are answered as stale.
        self._forgotten_until = float("-inf")

    @property
    def tracked_nonces(self) -> int:
        """Nonces whose last `nc` is currently remembered (bounded by `max_tracked_nonces`)."""
        return len(self._nonce_counts)

    # -- challenge ---------------------------------------------------------------------------------------

    def _mac(self, body: bytes) -> bytes:
        message = b"nonce\0" + self._realm_bytes + b"\0" + body
        return hmac.new(self._nonce_key, message, hashlib.sha256).digest()[:_NONCE_MAC_BYTES]

    def _new_nonce(self, now: float) -> str:
        body = _NONCE_TIME.pack(now) + secrets.token_bytes(_NONCE_RANDOM_BYTES)
        return base64.urlsafe_b64encode(body + self._mac(body)).rstrip(b"=").decode("ascii")

    def challenge(self, now: float, *, proxy: bool, stale: bool = False) -> list[tuple[str, str]]:
        """Challenge headers for a 401 (`proxy=False`) or 407 (`proxy=True`) (RFC 3261 §22.1, §22.3).

        One header per algorithm, strongest first, all with the same fresh nonce (RFC 7616 §3.7);
        `stale=True` tells the client its password was right but the nonce was not (RFC 7616 §3.3).
        """
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        nonce = self._new_nonce(now)
        suffix = ", stale=true" if stale else ""
        return [
            (
                name,
                f"Digest realm={_quote(self.realm)}, nonce={_quote(nonce)}, opaque={_quote(self._opaque)}, "
                f'algorithm={algorithm}, qop="auth"{suffix}',
            )
            for algorithm in self.algorithms
        ]

    # -- verification ------------------------------------------------------------------------------------

    def _check_nonce(self, nonce: str, opaque: str | None, now: float) -> _NonceCheck:
        """Authenticity and age of a nonce (RFC 7616 §3.3)."""
        if opaque is not None and not hmac.compare_digest(_encode(opaque), self._opaque.encode("ascii")):
            return _NonceCheck(None, "opaque is not ours")
        if len(nonce) != _NONCE_TEXT_LENGTH or _NONCE_RE.fullmatch(nonce) is None:
            return _NonceCheck(None, "nonce is not ours")
        raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        # Reject non-canonical spellings (unused low bits of the last character set) so one nonce has
        # exactly one text, which keys the nc table.
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != nonce:
            return _NonceCheck(None, "nonce is not ours")
        body, mac = raw[:-_NONCE_MAC_BYTES], raw[-_NONCE_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return _NonceCheck(None, "nonce is not ours")
        (issued,) = _NONCE_TIME.unpack_from(body)
        if issued > now:
            return _NonceCheck(issued, "nonce issued in the future")
        if now - issued > self.nonce_ttl_s:
            return _NonceCheck(issued, "nonce expired")
        return _NonceCheck(issued, None)

    def _select(self, headers: Sequence[str]) -> dict[str, str] | AuthResult:
        """The credentials for our realm among the request's headers (RFC 3261 §22.3), or the reason
        there are none: the first problem met, in header order."""
        first_problem: AuthResult | None = None
        ours: list[dict[str, str]] = []
        for value in headers[:MAX_CREDENTIAL_HEADERS]:
            try:
                scheme, params = _parse_credentials(value)
            except _Malformed as exc:
                first_problem = first_problem or AuthResult(AuthOutcome.MALFORMED, None, str(exc))
                continue
            username = params.get("username")
            if scheme.lower() != "digest":
                first_problem = first_problem or AuthResult(
                    AuthOutcome.MALFORMED, username, f"auth scheme {scheme!r} is not Digest"
                )
                continue
            realm = params.get("realm")
            if realm is None:
                first_problem = first_problem or AuthResult(AuthOutcome.MALFORMED, username, "no realm")
                continue
            if realm != self.realm:
                first_problem = first_problem or AuthResult(
                    AuthOutcome.REALM_MISMATCH, username, f"credentials for realm {realm!r}"
                )
                continue
            ours.append(params)
        if not ours:
            return first_problem or AuthResult(AuthOutcome.MISSING, None, "no credentials")
        # Prefer credentials whose algorithm we offer, when a client sent several for our realm.
        for params in ours:
            if _canonical_algorithm(params.get("algorithm", "MD5")) in self.algorithms:
                return params
        return ours[0]

    def verify(
        self,
        *,
        method: str,
        headers: Sequence[str],
        now: float,
        lookup_password: Callable[[str], str | None],
    ) -> AuthResult:
        """Judge the Authorization (or Proxy-Authorization) headers of a request (RFC 3261 §22.2-§22.3,
        RFC 7616 §3.4-§3.5, RFC 2617 §3.2.2 without qop).

        `headers` are the values of every such header of the request; the one for our realm is used.
        The `uri` parameter is taken as given (comparing it with the Request-URI is the caller's
        business). Never raises on malformed input.
        """
        if not headers:
            return AuthResult(AuthOutcome.MISSING, None, "no credentials")
        params = self._select(headers)
        if isinstance(params, AuthResult):
            return params
        username = params.get("username")
        if username is None:
            detail = "username* is not supported" if "username*" in params else "no username"
            return AuthResult(AuthOutcome.MALFORMED, None, detail)
        for required in ("nonce", "uri", "response"):
            if required not in params:
                return AuthResult(AuthOutcome.MALFORMED, username, f"no {required}")
        if params.get("userhash", "false").lower() != "false":
            return AuthResult(AuthOutcome.MALFORMED, username, "userhash was not offered")
        algorithm = _canonical_algorithm(params.get("algorithm", "MD5"))  # RFC 7616 §3.3: absent = MD5
        if algorithm is None or algorithm not in self.algorithms:
            return AuthResult(
                AuthOutcome.ALGORITHM_UNSUPPORTED,
                username,
                f"algorithm {params.get('algorithm')!r} was not offered",
            )
        qop = params.get("qop")
        nc_text = params.get("nc")
        cnonce = params.get("cnonce")
        nc = 0
        if qop is not None:
            if qop.lower() != "auth":
                return AuthResult(AuthOutcome.MALFORMED, username, f"qop {qop!r} was not offered")
            if nc_text is None or cnonce is None:
                return AuthResult(AuthOutcome.MALFORMED, username, "qop=auth without nc or cnonce")
            if _NC_RE.fullmatch(nc_text) is None:
                return AuthResult(AuthOutcome.MALFORMED, username, "nc is not 8 hex digits")
            nc = int(nc_text, 16)
        response = params["response"]
        if _HEX_RE.fullmatch(response) is None:
            return AuthResult(AuthOutcome.MALFORMED, username, "response is not hexadecimal")

        password = lookup_password(username)
        expected = compute_response(
            algorithm=algorithm,
            username=username,
            realm=self.realm,
            # Same work for an unknown user, so timing does not tell which usernames exist.
            password=password if password is not None else "",
            method=method,
            uri=params["uri"],
            nonce=params["nonce"],
            qop=qop,
            nc=nc_text,
            cnonce=cnonce,
        )
        if password is None:
            return AuthResult(AuthOutcome.UNKNOWN_USER, username, "no such user")
        if not hmac.compare_digest(expected.encode("ascii"), response.lower().encode("ascii")):
            return AuthResult(AuthOutcome.WRONG_CREDENTIALS, username, "response does not match")

        # The password is right. Whatever is wrong with the nonce from here on is cured by a fresh one.
        nonce = params["nonce"]
        check = self._check_nonce(nonce, params.get("opaque"), now)
        if check.problem is not None or check.issued is None:
            return AuthResult(AuthOutcome.STALE, username, check.problem or "nonce is not ours")
        tracked = self._nonce_counts.get(nonce)
        if tracked is None:
            if check.issued <= self._forgotten_until:
                return AuthResult(AuthOutcome.STALE, username, "nonce no longer tracked")
            last = 0
        else:
            last = tracked[1]
        if qop is None:
            # RFC 2617 form: no nc, so a reused nonce could be a replay; one use each, then a fresh one.
            if tracked is not None:
                return AuthResult(AuthOutcome.STALE, username, "nonce already used without qop")
            self._remember(nonce, check.issued, _NC_USED_WITHOUT_QOP, now)
            return AuthResult(AuthOutcome.OK, username, f"{algorithm} without qop")
        if nc <= last:
            return AuthResult(AuthOutcome.REPLAY, username, f"nc {nc_text} not above {last:08x}")
        self._remember(nonce, check.issued, nc, now)
        return AuthResult(AuthOutcome.OK, username, f"{algorithm} qop=auth nc={nc_text}")

    def _remember(self, nonce: str, issued: float, nc: int, now: float) -> None:
        """Record the last accepted nc of a nonce, keeping the table within `max_tracked_nonces`."""
        counts = self._nonce_counts
        if nonce in counts:
            counts[nonce] = (issued, nc)
            return
        # Entries are in order of first acceptance, close to issue order: drop expired ones at the front.
        while counts:
            first_issued = next(iter(counts.values()))[0]
            if now - first_issued <= self.nonce_ttl_s:
                break
            counts.popitem(last=False)
        while len(counts) >= self._max_tracked:
            _, (dropped_issued, _) = counts.popitem(last=False)
            if now - dropped_issued <= self.nonce_ttl_s:
                self._forgotten_until = max(self._forgotten_until, dropped_issued)
        counts[nonce] = (issued, nc)
