"""Dialed-number matching and routing: the `match:`, `regex:` and `range:` forms of a route.

A route matches the user part of the Request-URI (RFC 3261 §19.1.1), "the number", as a whole:

- `match:` — an extension pattern. `X` is any digit, `Z` 1-9, `N` 2-9, `[1-5]` / `[137]` / `[0-35-9]`
  one character of a set, and at the end only, `.` one or more characters of any kind and `!` zero or
  more. Every other character stands for itself, so a pattern without those is an exact number
  (`8000`, `*97`); a backslash makes the next character literal (`\\X`, `john\\.doe`). Only upper-case
  `X`, `Z`, `N` are wildcards: user names such as `alex` mean themselves.
- `regex:` — a Python regular expression that must match the whole number (`re.fullmatch`).
- `range:` — `FIRST-LAST`, digits of the same width: every number of that width between them.

Patterns compile to regular expressions once, at load; `Dialplan.route` tries the routes in file order,
so routing a number is O(routes). A number that is empty, longer than `MAX_DIALED_LENGTH`, or holds
whitespace or control characters matches no route.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from softswitch.dialplan.actions import Action, ActionTemplate, IvrMenu

#: Longest number routed. E.164 numbers have at most 15 digits (ITU-T E.164 §6) and user names at most 64
#: characters (config MAX_USER_NAME_LENGTH); anything longer is garbage, and bounding it also bounds the
#: time an operator's regular expression can spend on one number.
MAX_DIALED_LENGTH = 64
#: Most numbers a route is enumerated into when looking for routes that can never match (a 4-digit
#: pattern such as `XXXX` has 10,000); beyond it only exact duplicates and catch-alls are detected.
MAX_SHADOW_SAMPLES = 10_000

#: Characters of `X`, `Z` and `N` (the digit wildcards of extension patterns).
_WILDCARDS = {"X": "0123456789", "Z": "123456789", "N": "23456789"}
_DIGITS = re.compile(r"[0-9]+")
_RANGE = re.compile(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*")


class PatternError(ValueError):
    """A `match:`, `regex:` or `range:` that does not compile; the message says where and why."""


def is_routable(number: str) -> bool:
    """True for a number routes can match: 1 to MAX_DIALED_LENGTH printable, non-space characters."""
    return (
        0 < len(number) <= MAX_DIALED_LENGTH
        and number.isprintable()
        and not any(char.isspace() for char in number)
    )


@dataclass(frozen=True, slots=True)
class PatternMatcher:
    """An extension pattern (`1XXX`, `9[0-4]XX`, `0.`, `*97`)."""

    pattern: str
    #: One entry per position: the characters allowed there.
    positions: tuple[str, ...]
    #: `.` (one or more), `!` (zero or more) or "" (none) after the last position.
    tail: Literal[".", "!", ""]
    regex: re.Pattern[str] = field(compare=False)
    #: The number itself when the pattern has no wildcard.
    exact: str | None = None
    kind: Literal["match"] = "match"

    @classmethod
    def compile(cls, pattern: str) -> PatternMatcher:
        """Compile an extension pattern; raises `PatternError` with the column of the problem."""
        if not pattern:
            raise PatternError("empty pattern")
        positions: list[str] = []
        tail: Literal[".", "!", ""] = ""
        index = 0
        while index < len(pattern):
            char = pattern[index]
            column = index + 1
            if char in ".!":
                if index != len(pattern) - 1:
                    raise PatternError(
                        f"{char!r} at column {column} is only allowed at the end of a pattern; "
                        f"write '\\{char}' for a literal {char!r}"
                    )
                tail = "." if char == "." else "!"
                index += 1
            elif char == "\\":
                if index + 1 >= len(pattern):
                    raise PatternError(f"'\\' at column {column} escapes nothing")
                positions.append(pattern[index + 1])
                index += 2
            elif char == "[":
                end = pattern.find("]", index + 1)
                if end < 0:
                    raise PatternError(f"'[' at column {column} is never closed")
                positions.append(_character_set(pattern[index + 1 : end], column))
                index = end + 1
            elif char == "]":
                raise PatternError(f"']' at column {column} closes nothing")
            elif char in _WILDCARDS:
                positions.append(_WILDCARDS[char])
                index += 1
            elif char.isspace() or not char.isprintable():
                raise PatternError(f"whitespace or control character at column {column}")
            else:
                positions.append(char)
                index += 1
        if len(positions) + (1 if tail == "." else 0) > MAX_DIALED_LENGTH:
            raise PatternError(f"matches only numbers longer than {MAX_DIALED_LENGTH} characters")
        source = "".join(_regex_class(chars) for chars in positions)
        source += {".": ".+", "!": ".*", "": ""}[tail]
        exact = "".join(positions) if not tail and all(len(chars) == 1 for chars in positions) else None
        return cls(pattern, tuple(positions), tail, re.compile(source, re.DOTALL), exact)

    def matches(self, number: str) -> bool:
        """True when the whole of `number` fits the pattern."""
        if self.exact is not None:
            return number == self.exact
        return self.regex.fullmatch(number) is not None

    def members(self, limit: int = MAX_SHADOW_SAMPLES) -> Iterator[str] | None:
        """Every number the pattern matches, when they are finitely many and at most `limit`; else None."""
        if self.tail:
            return None
        count = 1
        for chars in self.positions:
            count *= len(chars)
            if count > limit:
                return None
        return ("".join(combination) for combination in itertools.product(*self.positions))

    @property
    def catch_all(self) -> bool:
        """True for `.` and `!`: every routable number matches."""
        return not self.positions and self.tail != ""

    def describe(self) -> str:
        return f"match {self.pattern!r}"


def _character_set(body: str, column: int) -> str:
    """The characters of `[body]`: single characters and `a-b` ranges."""
    if not body:
        raise PatternError(f"empty '[]' at column {column}")
    chars: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char.isspace() or not char.isprintable() or char == "[":
            raise PatternError(f"unexpected {char!r} in '[{body}]' at column {column}")
        if index + 2 < len(body) and body[index + 1] == "-":
            last = body[index + 2]
            if ord(last) < ord(char):
                raise PatternError(f"range '{char}-{last}' in '[{body}]' at column {column} runs backwards")
            chars.extend(chr(code) for code in range(ord(char), ord(last) + 1))
            index += 3
        else:
            chars.append(char)
            index += 1
    return "".join(sorted(set(chars)))


def _regex_class(chars: str) -> str:
    if len(chars) == 1:
        return re.escape(chars)
    return "[" + "".join("\\" + char if char in "\\]^-[" else char for char in chars) + "]"


@dataclass(frozen=True, slots=True)
class RegexMatcher:
    """A regular expression over the whole number (`re.fullmatch`)."""

    pattern: str
    regex: re.Pattern[str] = field(compare=False)
    kind: Literal["regex"] = "regex"

    @classmethod
    def compile(cls, pattern: str) -> RegexMatcher:
        """Compile `pattern`; raises `PatternError` with the column of a syntax error."""
        if not pattern:
            raise PatternError("empty regular expression")
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            where = f" at column {exc.pos + 1}" if exc.pos is not None else ""
            raise PatternError(f"bad regular expression: {exc.msg}{where}") from None
        return cls(pattern, regex)

    def matches(self, number: str) -> bool:
        return self.regex.fullmatch(number) is not None

    def members(self, limit: int = MAX_SHADOW_SAMPLES) -> Iterator[str] | None:
        return None

    @property
    def catch_all(self) -> bool:
        return False

    def describe(self) -> str:
        return f"regex {self.pattern!r}"


@dataclass(frozen=True, slots=True)
class RangeMatcher:
    """`FIRST-LAST`: every number of the same width between them (`9000-9099`)."""

    pattern: str
    first: int
    last: int
    width: int
    kind: Literal["range"] = "range"

    @classmethod
    def compile(cls, pattern: str) -> RangeMatcher:
        """Parse `FIRST-LAST`; raises `PatternError` unless both are digits of one width, FIRST <= LAST."""
        found = _RANGE.fullmatch(pattern)
        if found is None:
            raise PatternError(f"expected FIRST-LAST in digits (e.g. 9000-9099), got {pattern!r}")
        first, last = found.group(1), found.group(2)
        if len(first) != len(last):
            raise PatternError(
                f"{first} and {last} differ in width: a range covers numbers of one width "
                "(write 0100-0999 for leading zeros)"
            )
        if len(first) > MAX_DIALED_LENGTH:
            raise PatternError(f"numbers longer than {MAX_DIALED_LENGTH} digits are never routed")
        if int(first) > int(last):
            raise PatternError(f"first {first} is above last {last}")
        return cls(pattern, int(first), int(last), len(first))

    def matches(self, number: str) -> bool:
        return (
            len(number) == self.width
            and number.isascii()
            and _DIGITS.fullmatch(number) is not None
            and self.first <= int(number) <= self.last
        )

    def members(self, limit: int = MAX_SHADOW_SAMPLES) -> Iterator[str] | None:
        if self.last - self.first + 1 > limit:
            return None
        return (f"{value:0{self.width}d}" for value in range(self.first, self.last + 1))

    @property
    def catch_all(self) -> bool:
        return False

    def describe(self) -> str:
        return f"range {self.pattern!r}"


Matcher = PatternMatcher | RegexMatcher | RangeMatcher


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of `routes:`: which numbers it takes and what to do with them."""

    #: Position in `routes:`, from 0.
    index: int
    #: Line of the entry in the dialplan file.
    line: int
    matcher: Matcher
    action: ActionTemplate


@dataclass(frozen=True)
class Dialplan:
    """A loaded, validated dialplan: routes in file order, IVR menus, and load-time warnings."""

    #: The file it was read from (as named in messages).
    source: str
    routes: tuple[Route, ...]
    #: The menus of the `ivr:` section by name (empty when the file has none).
    menus: Mapping[str, IvrMenu] = field(default_factory=dict, hash=False)
    #: Problems that do not stop loading, as `FILE:LINE: routes[N]: what` (e.g. a route never reached).
    warnings: tuple[str, ...] = ()

    def match(self, number: str) -> Route | None:
        """The first route, in file order, whose pattern takes `number`; None when none does."""
        if not is_routable(number):
            return None
        for route in self.routes:
            if route.matcher.matches(number):
                return route
        return None

    def route(self, number: str, *, caller: str = "") -> Action | None:
        """The action for a call from `caller` to `number` (the Request-URI user part, RFC 3261 §19.1.1).

        None when no route matches: the caller is answered 404 Not Found (RFC 3261 §21.4.5). Never raises.
        """
        found = self.match(number)
        return None if found is None else found.action.render(number, caller)
