"""The stable reply codes of CTI commands (EVENTS.md "Commands") and the exception that carries them.

`CommandError(code, message)` is raised by the core and the command handlers when a command is refused;
the transports turn it into `{"ok": false, "code": …, "message": …}` (STYLE.md 7). Every code is
documented in docs/cti.md.
"""

from __future__ import annotations

from typing import Final

OK: Final = "ok"
INVALID_ARGUMENT: Final = "invalid_argument"
UNKNOWN_COMMAND: Final = "unknown_command"
UNKNOWN_AGENT: Final = "unknown_agent"
UNKNOWN_QUEUE: Final = "unknown_queue"
AUTHENTICATION_FAILED: Final = "authentication_failed"
NOT_PERMITTED: Final = "not_permitted"
AGENT_NOT_LOGGED_IN: Final = "agent_not_logged_in"
ALREADY_LOGGED_IN: Final = "already_logged_in"
DEVICE_UNAVAILABLE: Final = "device_unavailable"
INVALID_STATE: Final = "invalid_state"
NO_ACTIVE_CALL: Final = "no_active_call"
NOT_SUPPORTED: Final = "not_supported"
INTERNAL: Final = "internal"

#: Every code a reply can carry, in the order docs/cti.md lists them.
REPLY_CODES: Final = (
    OK,
    INVALID_ARGUMENT,
    UNKNOWN_COMMAND,
    UNKNOWN_AGENT,
    UNKNOWN_QUEUE,
    AUTHENTICATION_FAILED,
    NOT_PERMITTED,
    AGENT_NOT_LOGGED_IN,
    ALREADY_LOGGED_IN,
    DEVICE_UNAVAILABLE,
    INVALID_STATE,
    NO_ACTIVE_CALL,
    NOT_SUPPORTED,
    INTERNAL,
)


class CommandError(Exception):
    """A refused command: `code` is one of `REPLY_CODES`, `message` says why for a person."""

    def __init__(self, code: str, message: str) -> None:
        if code not in REPLY_CODES or code == OK:
            raise ValueError(f"not an error code: {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
