"""Exceptions that carry a SIP status: boundaries turn them into responses (STYLE.md 7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from softswitch.sip.message import SipMessage


class SipError(Exception):
    """A failure that maps to a SIP response `status reason` with optional extra headers."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers: list[tuple[str, str]] = list(headers or [])


class SipParseError(SipError):
    """A message that violates the grammar (RFC 3261 §25): answered 400 with a reason naming the fault.

    `message` is what could be read (start line and headers) so that a 400 can still be addressed; None
    when not even that was readable.
    """

    def __init__(self, reason: str, message: SipMessage | None = None, status: int = 400) -> None:
        super().__init__(status, reason)
        self.message = message
