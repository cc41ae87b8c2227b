"""The location service: contact bindings per address-of-record (RFC 3261 §10.2, §10.3).

Sans-IO: the registrar changes bindings, the adapter persists them (see `Store`) and drives expiry with
`expire(now)` at `next_expiry()`. Every binding remembers the flow its REGISTER arrived on, so requests to
the user leave over that flow (RFC 5626 §5.3 in spirit: the contact may be unreachable behind NAT).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Any

from softswitch.sip.flow import Flow
from softswitch.sip.uri import SipUri, parse_uri

#: Bindings one address-of-record may hold; more is a misconfigured or hostile client (each REGISTER
#: with a fresh Contact would otherwise grow the table without bound until expiry).
MAX_BINDINGS_PER_AOR = 10


def contact_key(uri: SipUri) -> str:
    """Comparison key of a contact URI (RFC 3261 §19.1.4, reduced to what identifies a device)."""
    port = uri.port if uri.port is not None else (5061 if uri.scheme == "sips" else 5060)
    return f"{uri.scheme}:{uri.user or ''}@{uri.host.lower()}:{port};{uri.transport().lower()}"


@dataclass(slots=True)
class Binding:
    """One contact of an address-of-record."""

    aor: str
    contact: str  # the contact URI as the phone wrote it
    expires_at: float
    call_id: str
    cseq: int
    flow: Flow
    registered_at: float
    instance: str | None = None  # +sip.instance (RFC 5626 §4.1)
    reg_id: str | None = None  # reg-id (RFC 5626 §4.2)
    q: float | None = None
    user_agent: str = ""
    uri: SipUri = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.uri = parse_uri(self.contact)

    @property
    def key(self) -> str:
        """Identity of the binding: instance (+ reg-id) when the phone sent one, else the contact URI."""
        if self.instance:
            return f"instance:{self.instance}|{self.reg_id or ''}"
        return f"uri:{contact_key(self.uri)}"

    def remaining(self, now: float) -> int:
        return max(0, round(self.expires_at - now))

    def to_data(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "cseq": self.cseq,
            "flow": self.flow.to_dict(),
            "registered_at": self.registered_at,
            "instance": self.instance,
            "reg_id": self.reg_id,
            "q": self.q,
            "user_agent": self.user_agent,
        }

    @classmethod
    def from_data(cls, aor: str, contact: str, expires_at: float, data: dict[str, Any]) -> Binding:
        return cls(
            aor=aor,
            contact=contact,
            expires_at=expires_at,
            call_id=str(data["call_id"]),
            cseq=int(data["cseq"]),
            flow=Flow.from_dict(data["flow"]),
            registered_at=float(data["registered_at"]),
            instance=data.get("instance"),
            reg_id=data.get("reg_id"),
            q=data.get("q"),
            user_agent=str(data.get("user_agent", "")),
        )


class LocationService:
    """Bindings by address-of-record, with an expiry heap."""

    def __init__(self) -> None:
        self._by_aor: dict[str, dict[str, Binding]] = {}
        self._by_contact: dict[str, Binding] = {}
        self._expiry: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return sum(len(b) for b in self._by_aor.values())

    @property
    def user_count(self) -> int:
        return len(self._by_aor)

    def bindings(self, aor: str) -> list[Binding]:
        """Current bindings of `aor`, highest q first, then most recently registered first."""
        found = list(self._by_aor.get(aor, {}).values())
        found.sort(key=lambda b: (-(b.q if b.q is not None else 1.0), -b.registered_at))
        return found

    def get(self, aor: str, key: str) -> Binding | None:
        return self._by_aor.get(aor, {}).get(key)

    def find_by_contact(self, uri: SipUri) -> Binding | None:
        """The binding whose contact URI is `uri` (used to route in-dialog requests to phones)."""
        return self._by_contact.get(contact_key(uri))

    def put(self, binding: Binding) -> Binding | None:
        """Add or replace a binding (same key); returns the binding it replaced."""
        table = self._by_aor.setdefault(binding.aor, {})
        old = table.get(binding.key)
        if old is not None:
            self._by_contact.pop(contact_key(old.uri), None)
        table[binding.key] = binding
        self._by_contact[contact_key(binding.uri)] = binding
        heapq.heappush(self._expiry, (binding.expires_at, binding.aor, binding.key))
        return old

    def remove(self, aor: str, key: str) -> Binding | None:
        table = self._by_aor.get(aor)
        if not table:
            return None
        old = table.pop(key, None)
        if old is not None:
            current = self._by_contact.get(contact_key(old.uri))
            if current is old:
                del self._by_contact[contact_key(old.uri)]
        if not table:
            del self._by_aor[aor]
        return old

    def expire(self, now: float) -> list[Binding]:
        """Remove and return every binding whose time is up."""
        gone: list[Binding] = []
        while self._expiry and self._expiry[0][0] <= now:
            _, aor, key = heapq.heappop(self._expiry)
            current = self.get(aor, key)
            if current is not None and current.expires_at <= now:
                self.remove(aor, key)
                gone.append(current)
        return gone

    def next_expiry(self) -> float | None:
        # Entries of refreshed bindings linger in the heap; they are skipped in expire().
        while self._expiry:
            at, aor, key = self._expiry[0]
            current = self.get(aor, key)
            if current is not None and current.expires_at == at:
                return at
            heapq.heappop(self._expiry)
        return None

    def refreshed(self, binding: Binding, **changes: Any) -> Binding:
        """A copy of `binding` with fields changed (for refreshes that keep the key)."""
        return replace(binding, **changes)
