"""What the dialplan tells call control to do with a call: one frozen dataclass per action kind.

A route's action is held as an `ActionTemplate`: the action as written in the dialplan file, plus its
string fields parsed as templates. `ActionTemplate.render(number, caller)` substitutes the dialed user
part (RFC 3261 §19.1.1 `user` of the Request-URI) for `${number}` and the caller's user for `${caller}`
and returns the concrete action; an action without substitutions is returned as is, without copying.

Substitutions follow the familiar extension-variable form: `${number}`, `${number:OFFSET}` and
`${number:OFFSET:LENGTH}` (a negative OFFSET counts from the end; a negative LENGTH leaves that many
characters off the end), the same for `${caller}`; `$$` is a literal `$`. Every action carries
`route_index` (the route's position in the file, from 0; -1 for an IVR option or an action built in
code) and `line` (its line in the file) for logs. Neither takes part in equality: two actions are equal
when they do the same thing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Literal

#: Ring timeout of a `dial` or `trunk` route that names none (CONTRACT.md: `1XXX`, no answer in 30 s).
DEFAULT_RING_TIMEOUT_S = 30.0
#: SIP status a `hangup` route answers with when it names none (RFC 3261 §21.4.5 404 Not Found).
DEFAULT_HANGUP_CODE = 404
#: Seconds an IVR menu waits for a digit after its prompt when the menu names none.
DEFAULT_IVR_DIGIT_TIMEOUT_S = 5.0
#: Times an IVR menu plays its prompt before giving up, when the menu names none.
DEFAULT_IVR_ATTEMPTS = 3

#: Names a template may substitute.
TEMPLATE_VARIABLES = ("number", "caller")
#: Largest |OFFSET| or LENGTH in `${number:OFFSET:LENGTH}`: a dialed number is far shorter, and bounding
#: the digits keeps a typo from turning into a huge integer.
MAX_TEMPLATE_SLICE = 999
#: The DTMF symbols an IVR option can be keyed on (RFC 4733 §3.2, events 0-15).
DTMF_SYMBOLS = "0123456789*#ABCD"

_VARIABLE = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<offset>-?\d{1,3})(?::(?P<length>-?\d{1,3}))?)?\}"
)


class TemplateError(ValueError):
    """A string field whose `${…}` substitutions do not parse."""


@dataclass(frozen=True, slots=True)
class _Variable:
    name: str
    offset: int | None = None
    length: int | None = None

    def render(self, variables: Mapping[str, str]) -> str:
        value = variables.get(self.name, "")
        if self.offset is not None:
            value = value[self.offset :]
        if self.length is not None:
            value = value[: self.length]
        return value


@dataclass(frozen=True, slots=True)
class Template:
    """A string with `${number}` / `${caller}` substitutions, parsed once at load."""

    text: str
    parts: tuple[str | _Variable, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        """Parse `text`; raises `TemplateError` for an unknown variable or a stray `$`."""
        parts: list[str | _Variable] = []
        literal: list[str] = []
        position = 0
        while position < len(text):
            char = text[position]
            if char != "$":
                literal.append(char)
                position += 1
                continue
            if text.startswith("$$", position):
                literal.append("$")
                position += 2
                continue
            match = _VARIABLE.match(text, position)
            if match is None:
                raise TemplateError(
                    f"bad substitution at column {position + 1}: expected ${{number}}, ${{caller}}, "
                    "${number:OFFSET}, ${number:OFFSET:LENGTH} or $$ for a literal '$'"
                )
            name = match.group("name")
            if name not in TEMPLATE_VARIABLES:
                raise TemplateError(f"unknown variable ${{{name}}}: expected ${{number}} or ${{caller}}")
            if literal:
                parts.append("".join(literal))
                literal = []
            offset, length = match.group("offset"), match.group("length")
            parts.append(
                _Variable(
                    name,
                    None if offset is None else int(offset),
                    None if length is None else int(length),
                )
            )
            position = match.end()
        if literal:
            parts.append("".join(literal))
        return cls(text, tuple(parts))

    @property
    def is_literal(self) -> bool:
        """True when nothing is substituted."""
        return all(isinstance(part, str) for part in self.parts)

    @property
    def literal_text(self) -> str:
        """The characters written outside substitutions (`$$` read as `$`)."""
        return "".join(part for part in self.parts if isinstance(part, str))

    def render(self, variables: Mapping[str, str]) -> str:
        """The text with every substitution replaced by its value."""
        return "".join(part if isinstance(part, str) else part.render(variables) for part in self.parts)


# -- the actions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ActionBase:
    #: The action's name in a dialplan file (`action: dial`).
    KIND: ClassVar[str] = ""
    #: Position of the route in `routes:` (from 0); -1 for an IVR option or an action built in code.
    route_index: int = field(default=-1, compare=False, kw_only=True)
    #: Line of the route (or IVR option) in the dialplan file; 0 when built in code.
    line: int = field(default=0, compare=False, kw_only=True)

    @property
    def kind(self) -> str:
        """The action's name in a dialplan file."""
        return self.KIND


@dataclass(frozen=True, slots=True)
class Dial(_ActionBase):
    """Call a registered user: originate a B-leg to `target`'s bindings and bridge on answer.

    No answer within `timeout_s` ends the attempt with `final_status` `no_answer`; `max_duration_s`
    (None: no limit) bounds the answered call (`time_limit`).
    """

    KIND: ClassVar[str] = "dial"
    target: str
    timeout_s: float = DEFAULT_RING_TIMEOUT_S
    max_duration_s: float | None = None


@dataclass(frozen=True, slots=True)
class Queue(_ActionBase):
    """Put the caller in an ACD queue."""

    KIND: ClassVar[str] = "queue"
    queue: str


@dataclass(frozen=True, slots=True)
class Conference(_ActionBase):
    """Join the caller to a conference room (created on first join)."""

    KIND: ClassVar[str] = "conference"
    room: str
    muted: bool = False


@dataclass(frozen=True, slots=True)
class Ivr(_ActionBase):
    """Answer and run an IVR menu (`Dialplan.menus[menu]` when the file defines `ivr:`)."""

    KIND: ClassVar[str] = "ivr"
    menu: str


@dataclass(frozen=True, slots=True)
class Echo(_ActionBase):
    """Answer and send the caller's own audio back (a media loopback test)."""

    KIND: ClassVar[str] = "echo"


@dataclass(frozen=True, slots=True)
class Playback(_ActionBase):
    """Answer, play a prompt of the prompt set by name, then do `then`: hang up, or read back the digits
    the caller keys (ended by `#` or a pause) and hang up."""

    KIND: ClassVar[str] = "playback"
    prompt: str
    then: Literal["hangup", "readback"] = "hangup"


@dataclass(frozen=True, slots=True)
class Hangup(_ActionBase):
    """Reject the call with a SIP final response (RFC 3261 §21.4-21.6); `reason` "" = the standard phrase."""

    KIND: ClassVar[str] = "hangup"
    code: int = DEFAULT_HANGUP_CODE
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Trunk(_ActionBase):
    """Call `number` out through the configured SIP trunk named `trunk`."""

    KIND: ClassVar[str] = "trunk"
    trunk: str
    number: str
    timeout_s: float = DEFAULT_RING_TIMEOUT_S
    max_duration_s: float | None = None


Action = Dial | Queue | Conference | Ivr | Echo | Playback | Hangup | Trunk

#: Every action class by its name in a dialplan file.
ACTION_TYPES: Mapping[str, type[Action]] = MappingProxyType(
    {cls.KIND: cls for cls in (Dial, Queue, Conference, Ivr, Echo, Playback, Hangup, Trunk)}
)


#: `dataclasses.replace` over the union of actions (each template names only fields of its own action).
_replace: Callable[..., Action] = dataclasses.replace


def _printable(text: str) -> str:
    """`text` without control or other non-printable characters (no CR/LF can reach a SIP header)."""
    return text if text.isprintable() else "".join(char for char in text if char.isprintable())


@dataclass(frozen=True, slots=True)
class ActionTemplate:
    """An action as written in the file; `render` fills in its substitutions for one call."""

    action: Action
    #: The string fields that hold substitutions, with their parsed templates.
    templates: tuple[tuple[str, Template], ...] = ()

    def render(self, number: str, caller: str = "") -> Action:
        """The action for a call to `number` from `caller`.

        Values are substituted as given, minus non-printable characters: a rendered field never holds a
        control character, but it is still caller-chosen text that consumers look up, never trust.
        """
        if not self.templates:
            return self.action
        variables = {"number": _printable(number), "caller": _printable(caller)}
        changes = {name: template.render(variables) for name, template in self.templates}
        return _replace(self.action, **changes)


@dataclass(frozen=True, slots=True)
class IvrMenu:
    """An IVR menu from the file's `ivr:` section, run by the IVR engine.

    The engine plays `prompt`, waits `timeout_s` for one DTMF digit (RFC 4733 §3.2 events) and runs the
    option's action; a timeout or a digit without an option plays the prompt again, up to `max_attempts`
    times in all, then runs `fallback` (None: hang up).
    """

    name: str
    prompt: str
    options: Mapping[str, ActionTemplate] = field(hash=False)
    timeout_s: float = DEFAULT_IVR_DIGIT_TIMEOUT_S
    max_attempts: int = DEFAULT_IVR_ATTEMPTS
    fallback: ActionTemplate | None = None
    line: int = 0

    def choose(self, digit: str, *, number: str, caller: str = "") -> Action | None:
        """The action for `digit` pressed during a call to `number` from `caller`; None: no such option."""
        option = self.options.get(digit)
        return None if option is None else option.render(number, caller)

    def fallback_action(self, *, number: str, caller: str = "") -> Action | None:
        """The action once every attempt failed; None means hang up."""
        return None if self.fallback is None else self.fallback.render(number, caller)
