"""The registrar (RFC 3261 §10.3), with RFC 5626 instance/reg-id deduplication.

Sans-IO: `process()` takes an authenticated REGISTER and returns the response plus the binding changes,
which the edge persists and turns into device events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from softswitch.sip.errors import SipError
from softswitch.sip.flow import Flow
from softswitch.sip.headers import NameAddr
from softswitch.sip.location import MAX_BINDINGS_PER_AOR, Binding, LocationService
from softswitch.sip.message import SipRequest, SipResponse, make_response

#: Largest Expires value the grammar allows (RFC 3261 §20.19: delta-seconds up to 2**32-1).
MAX_DELTA_SECONDS = 2**32 - 1


@dataclass(frozen=True, slots=True)
class RegistrarPolicy:
    """Expiry limits (seconds): `Min-Expires` for 423, the cap, and the default when none given."""

    min_expires: int = 60
    max_expires: int = 7200
    default_expires: int = 3600


@dataclass(slots=True)
class RegisterResult:
    response: SipResponse
    added: list[Binding] = field(default_factory=list)  # new bindings
    refreshed: list[Binding] = field(default_factory=list)  # same key, updated
    removed: list[tuple[Binding, str]] = field(default_factory=list)  # (binding, reason)


def _parse_delta(text: str, what: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise SipError(400, f"Bad {what}")
    return min(int(text), MAX_DELTA_SECONDS)


def _q_value(contact: NameAddr) -> float | None:
    raw = contact.param("q")
    if raw is None:
        return None
    try:
        q = float(raw)
    except ValueError:
        raise SipError(400, "Bad q parameter in Contact") from None
    if not 0.0 <= q <= 1.0:
        raise SipError(400, "Bad q parameter in Contact")
    return q


class Registrar:
    """Binds contacts of the users of one domain."""

    def __init__(self, location: LocationService, policy: RegistrarPolicy) -> None:
        self.location = location
        self.policy = policy

    def _bindings_reply(self, request: SipRequest, aor: str, now: float) -> SipResponse:
        response = make_response(request, 200)
        for b in self.location.bindings(aor):
            value = f"<{b.contact}>;expires={b.remaining(now)}"
            if b.instance:
                value += f';+sip.instance="{b.instance}"'
            if b.reg_id:
                value += f";reg-id={b.reg_id}"
            if b.q is not None:
                value += f";q={b.q:g}"
            response.add("Contact", value)
        return response

    def process(self, request: SipRequest, aor: str, flow: Flow, now: float) -> RegisterResult:
        """RFC 3261 §10.3 steps 4-8 for the address-of-record `aor` (authenticated by the caller)."""
        try:
            return self._process(request, aor, flow, now)
        except SipError as e:
            response = make_response(request, e.status, e.reason)
            for name, value in e.headers:
                response.add(name, value)
            return RegisterResult(response)

    def _process(self, request: SipRequest, aor: str, flow: Flow, now: float) -> RegisterResult:
        call_id = request.call_id
        cseq, _ = request.cseq
        header_expires_raw = request.get("Expires")
        header_expires = (
            _parse_delta(header_expires_raw, "Expires header") if header_expires_raw is not None else None
        )
        user_agent = request.get("User-Agent") or ""

        if not request.has("Contact"):
            # Step 8 with no Contact: a query of the current bindings.
            return RegisterResult(self._bindings_reply(request, aor, now))

        result = RegisterResult(make_response(request, 200))
        if request.is_star_contact:
            # Step 6: "Contact: *" must stand alone and come with Expires: 0.
            if len(request.get_all("Contact")) != 1 or header_expires != 0:
                raise SipError(400, "Contact * requires Expires: 0 and no other Contact")
            for b in self.location.bindings(aor):
                if b.call_id == call_id and cseq <= b.cseq:
                    raise SipError(400, "CSeq not higher than that of the binding")
            for b in self.location.bindings(aor):
                self.location.remove(aor, b.key)
                result.removed.append((b, "unregistered"))
            result.response = self._bindings_reply(request, aor, now)
            return result

        contacts = request.contacts
        planned: list[tuple[NameAddr, int]] = []
        for contact in contacts:
            raw = contact.param("expires")
            if raw is not None:
                expires = _parse_delta(raw, "expires parameter in Contact")
            elif header_expires is not None:
                expires = header_expires
            else:
                expires = self.policy.default_expires
            if 0 < expires < self.policy.min_expires:
                # RFC 3261 §10.3 step 7: 423 with Min-Expires.
                raise SipError(423, "Interval Too Brief", [("Min-Expires", str(self.policy.min_expires))])
            planned.append((contact, min(expires, self.policy.max_expires)))

        for contact, expires in planned:
            instance = contact.param("+sip.instance")
            if instance is not None:
                instance = instance.strip('"')
            reg_id = contact.param("reg-id")
            candidate = Binding(
                aor=aor,
                contact=str(contact.uri),
                expires_at=now + expires,
                call_id=call_id,
                cseq=cseq,
                flow=flow,
                registered_at=now,
                instance=instance or None,
                reg_id=reg_id,
                q=_q_value(contact),
                user_agent=user_agent,
            )
            existing = self.location.get(aor, candidate.key)
            if existing is not None and existing.call_id == call_id and cseq <= existing.cseq:
                raise SipError(400, "CSeq not higher than that of the binding")
            if expires == 0:
                if existing is not None:
                    self.location.remove(aor, existing.key)
                    result.removed.append((existing, "unregistered"))
                continue
            if existing is None and len(self.location.bindings(aor)) >= MAX_BINDINGS_PER_AOR:
                raise SipError(403, f"Too many contacts (at most {MAX_BINDINGS_PER_AOR})")
            if existing is not None:
                candidate.registered_at = existing.registered_at
            # A phone that re-registers from the same device with a new contact (new port after a
            # restart, same +sip.instance) replaces its old binding: handled by the instance key. One
            # that sends no instance but reuses the contact URI refreshes it.
            self.location.put(candidate)
            if existing is None:
                result.added.append(candidate)
            else:
                result.refreshed.append(candidate)
        result.response = self._bindings_reply(request, aor, now)
        return result

    def expire(self, now: float) -> list[Binding]:
        return self.location.expire(now)
