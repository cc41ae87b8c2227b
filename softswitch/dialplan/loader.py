"""Reading a dialplan file: YAML (1.1, PyYAML's safe subset) into a validated `Dialplan`.

`load_dialplan(path)` composes the YAML into nodes, which keep their line numbers, and checks every
key and value against the format of docs/dialplan.md: unknown keys, wrong types, unknown actions, bad
patterns and ranges, missing fields, values out of bounds and, when the caller passes the configured
users, queues and trunks, references that do not resolve. Every problem found is reported at once as
`FILE:LINE: key.path: reason` in one `DialplanError`, so an operator fixes a file in one pass. Routes that
can never be reached are not errors: they are listed in `Dialplan.warnings`.

Values are not converted: `match: 8000` is an integer to YAML, and a pattern is text (`match: "8000"`),
so that `0123` and `+86…` keep their leading characters.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from softswitch.config import Loc, format_loc
from softswitch.dialplan.actions import (
    ACTION_TYPES,
    DEFAULT_IVR_ATTEMPTS,
    DEFAULT_IVR_DIGIT_TIMEOUT_S,
    DTMF_SYMBOLS,
    ActionTemplate,
    Ivr,
    IvrMenu,
    Template,
    TemplateError,
)
from softswitch.dialplan.matcher import (
    Dialplan,
    Matcher,
    PatternError,
    PatternMatcher,
    RangeMatcher,
    RegexMatcher,
    Route,
)

#: Dialplan format versions this code reads (`version:` at the top of the file).
SUPPORTED_VERSIONS = (1,)
#: Largest dialplan file read. A hand-written dialplan is a few kilobytes; the bound keeps a wrong path
#: (a log, a dump) from being parsed into memory.
MAX_DIALPLAN_BYTES = 1024 * 1024
#: Longest ring timeout a route may ask for: a leg ringing longer holds a media slot for nothing, and
#: proxies give up after Timer C (> 3 min, RFC 3261 §16.6 step 11) anyway.
MAX_RING_TIMEOUT_S = 600.0
#: Longest `max_duration_s`: one day. Longer calls are leaks, not conversations.
MAX_CALL_DURATION_S = 86_400.0
#: Longest wait for a digit in an IVR menu.
MAX_IVR_DIGIT_TIMEOUT_S = 60.0
#: Most times an IVR menu may replay its prompt.
MAX_IVR_ATTEMPTS = 10
#: Longest Reason-Phrase a `hangup` route may set (RFC 3261 §25.1 sets none; it travels in a status line).
MAX_REASON_LENGTH = 128
#: Longest name of a user, queue, trunk, room, menu or prompt (config MAX_USER_NAME_LENGTH: a name is also
#: an MQTT topic level and a SQL key).
MAX_NAME_LENGTH = 64

#: The keys that say which numbers a route takes; a route has exactly one.
MATCH_KEYS = ("match", "regex", "range")
_TOP_LEVEL_KEYS = ("version", "routes", "ivr")
_MENU_KEYS = ("prompt", "options", "timeout_s", "max_attempts", "fallback")

Reference = Literal["", "user", "queue", "trunk", "menu", "prompt"]


class DialplanError(Exception):
    """A dialplan that cannot be used. `problems` holds one `FILE:LINE: key.path: reason` each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def load_dialplan(
    path: Path | str,
    *,
    users: Collection[str] | None = None,
    queues: Collection[str] | None = None,
    trunks: Collection[str] | None = None,
    prompts: Collection[str] | None = None,
) -> Dialplan:
    """Read and validate the dialplan file at `path`; raises `DialplanError`.

    `users`, `queues`, `trunks` and `prompts`, when given, are the names the configuration (and the prompt
    set) defines: a literal `dial` target, `queue`, `trunk` or prompt naming anything else is an error.
    None skips that check.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_DIALPLAN_BYTES + 1)
    except OSError as exc:
        raise DialplanError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_DIALPLAN_BYTES:
        raise DialplanError([f"{path}: larger than {MAX_DIALPLAN_BYTES} bytes: not a dialplan"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DialplanError([f"{path}:{line}: not UTF-8 text: {exc.reason}"]) from None
    return parse_dialplan(text, str(path), users=users, queues=queues, trunks=trunks, prompts=prompts)


def parse_dialplan(
    text: str,
    source: str,
    *,
    users: Collection[str] | None = None,
    queues: Collection[str] | None = None,
    trunks: Collection[str] | None = None,
    prompts: Collection[str] | None = None,
) -> Dialplan:
    """Validate dialplan `text` named `source` (used in messages); see `load_dialplan`."""
    root = _compose(text, source)
    reader = _Reader(source, users=users, queues=queues, trunks=trunks, prompts=prompts)
    dialplan = reader.dialplan(root)
    if reader.problems or dialplan is None:
        raise DialplanError(reader.sorted_problems())
    return dialplan


# -- YAML -------------------------------------------------------------------------------------------


def _compose(text: str, source: str) -> MappingNode:
    """The node tree of a one-document YAML text, each node with its start line (`start_mark`)."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # the reader checks every character here
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        column = f" (column {mark.column + 1})" if mark is not None else ""
        problem = exc.problem or exc.context or "malformed"
        if exc.context and exc.problem and exc.problem.startswith("but "):
            problem = f"{exc.context}, {exc.problem}"
        raise DialplanError([f"{source}:{line}: YAML syntax error: {problem}{column}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise DialplanError([f"{source}:{line}: YAML syntax error: {exc.reason}"]) from None
    except yaml.YAMLError as exc:
        raise DialplanError([f"{source}:1: YAML syntax error: {exc}"]) from None
    except RecursionError:
        raise DialplanError([f"{source}:1: YAML syntax error: nested too deeply"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        raise DialplanError([f"{source}:1: empty dialplan: expected `version: 1` and `routes:`"])
    if not isinstance(root, MappingNode):
        raise DialplanError(
            [f"{source}:{_line(root)}: expected a mapping with `version:` and `routes:`, got {_shape(root)}"]
        )
    return root


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _shape(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return f"{node.value!r}"


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"a {type(value).__name__}"


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- fields -----------------------------------------------------------------------------------------


class _Invalid:
    """A value that failed validation (the problem is already recorded)."""


_INVALID = _Invalid()


@dataclass(frozen=True)
class _Text:
    """A string field; `${number}` / `${caller}` substitutions allowed unless `literal_only`."""

    #: Characters allowed outside substitutions, as a regex character class.
    chars: str
    #: What the value must be, for messages.
    what: str
    max_length: int = MAX_NAME_LENGTH
    #: Configured objects a literal value must name.
    reference: Reference = ""
    #: Used when the key is absent; None makes the key required.
    default: str | None = None
    literal_only: bool = False
    #: Extra rule for literal values (a regex they must fully match) and its explanation.
    literal_rule: str = ""


@dataclass(frozen=True)
class _Seconds:
    maximum: float
    nullable: bool = False


@dataclass(frozen=True)
class _Integer:
    minimum: int
    maximum: int
    what: str


@dataclass(frozen=True)
class _Flag:
    pass


@dataclass(frozen=True)
class _Choice:
    choices: tuple[str, ...]


_FieldSpec = _Text | _Seconds | _Integer | _Flag | _Choice

# Character classes, the same as the configuration's (softswitch/config.py): user names are RFC 3261
# §25.1 "unreserved" characters plus "+"; queue, trunk, room and menu names appear in MQTT topics.
_USER_CHARS = r"A-Za-z0-9._~+\-"
_ID_CHARS = r"A-Za-z0-9._~\-"
_PROMPT_CHARS = r"A-Za-z0-9._\-"
_NUMBER_CHARS = r"A-Za-z0-9._~+*#\-"

_USER = "a user name (letters, digits, '.', '_', '~', '+', '-')"
_ID = "a name of letters, digits, '.', '_', '~' or '-'"

#: Every action's fields (besides `action`): how each is checked, and whether it is required.
ACTION_FIELDS: dict[str, dict[str, _FieldSpec]] = {
    "dial": {
        "target": _Text(_USER_CHARS, _USER, reference="user", default="${number}"),
        "timeout_s": _Seconds(MAX_RING_TIMEOUT_S),
        "max_duration_s": _Seconds(MAX_CALL_DURATION_S, nullable=True),
    },
    "queue": {"queue": _Text(_ID_CHARS, _ID, reference="queue")},
    "conference": {
        "room": _Text(_ID_CHARS, _ID, default="${number}"),
        "muted": _Flag(),
    },
    "ivr": {"menu": _Text(_ID_CHARS, _ID, reference="menu")},
    "echo": {},
    "playback": {
        "prompt": _Text(
            _PROMPT_CHARS,
            "a prompt name of letters, digits, '.', '_' or '-'",
            reference="prompt",
            literal_rule=r"[A-Za-z0-9_].*",
        ),
        "then": _Choice(("hangup", "readback")),
    },
    "hangup": {
        "code": _Integer(400, 699, "a SIP final error status 400-699 (RFC 3261 §21.4-21.6)"),
        "reason": _Text(r"^\x00-\x1f\x7f-\x9f", "printable text", max_length=MAX_REASON_LENGTH, default=""),
    },
    "trunk": {
        "trunk": _Text(_ID_CHARS, _ID, reference="trunk"),
        "number": _Text(
            _NUMBER_CHARS,
            "a number of letters, digits, '+', '*', '#', '.', '_', '~' or '-'",
            default="${number}",
        ),
        "timeout_s": _Seconds(MAX_RING_TIMEOUT_S),
        "max_duration_s": _Seconds(MAX_CALL_DURATION_S, nullable=True),
    },
}

_MENU_PROMPT = _Text(
    _PROMPT_CHARS,
    "a prompt name of letters, digits, '.', '_' or '-'",
    reference="prompt",
    literal_only=True,
    literal_rule=r"[A-Za-z0-9_].*",
)
_MENU_NAME = re.compile(f"[{_ID_CHARS}]{{1,{MAX_NAME_LENGTH}}}")
_LOWER_CASE_WILDCARD = re.compile(r"[0-9*#+\[\]\-]*[xzn][0-9*#+xzn\[\]\-.!]*")


# -- the reader -------------------------------------------------------------------------------------


class _Reader:
    """Walks the node tree once, building the dialplan and recording every problem with its line."""

    def __init__(
        self,
        source: str,
        *,
        users: Collection[str] | None,
        queues: Collection[str] | None,
        trunks: Collection[str] | None,
        prompts: Collection[str] | None = None,
    ) -> None:
        self.source = source
        self.references: dict[Reference, Collection[str] | None] = {
            "user": users,
            "queue": queues,
            "trunk": trunks,
            "menu": None,
            "prompt": prompts,
        }
        self._problems: list[tuple[int, str]] = []
        self._warnings: list[tuple[int, str]] = []
        self._constructor = yaml.SafeLoader("")

    @property
    def problems(self) -> list[str]:
        return [text for _, text in self._problems]

    def sorted_problems(self) -> list[str]:
        return [text for _, text in sorted(self._problems, key=lambda item: item[0])]

    def problem(self, line: int, loc: Loc, reason: str) -> None:
        self._problems.append((line, f"{self.source}:{line}: {format_loc(loc)}: {reason}"))

    def warn(self, line: int, loc: Loc, reason: str) -> None:
        self._warnings.append((line, f"{self.source}:{line}: {format_loc(loc)}: {reason}"))

    # -- generic shapes -----------------------------------------------------------------------------

    def mapping(self, node: Node, loc: Loc) -> dict[str, tuple[ScalarNode, Node]] | None:
        """The entries of a mapping node by key text; duplicate and non-text keys are problems."""
        if not isinstance(node, MappingNode):
            self.problem(_line(node), loc, f"expected a mapping (key: value lines), got {_shape(node)}")
            return None
        entries: dict[str, tuple[ScalarNode, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.problem(_line(key_node), loc, "a key must be plain text, not a list or a mapping")
                continue
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.problem(
                    _line(key_node), loc, "YAML merge keys (<<) are not supported: write the fields out"
                )
                continue
            key = str(key_node.value)
            if key in entries:
                first = _line(entries[key][0])
                self.problem(_line(key_node), (*loc, key), f"duplicate key (first on line {first})")
                continue
            entries[key] = (key_node, value_node)
        return entries

    def unknown_keys(
        self, entries: dict[str, tuple[ScalarNode, Node]], loc: Loc, allowed: Sequence[str], where: str
    ) -> None:
        for key, (key_node, _) in entries.items():
            if key not in allowed:
                self.problem(
                    _line(key_node),
                    (*loc, key),
                    f"unknown key {where} (allowed: {', '.join(allowed)}){_suggest(key, allowed)}",
                )

    def scalar(self, node: Node, loc: Loc) -> object:
        """The value of a scalar node as YAML types it, or _INVALID."""
        if not isinstance(node, ScalarNode):
            self.problem(_line(node), loc, f"expected a single value, got {_shape(node)}")
            return _INVALID
        try:
            return self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else str(exc)
            self.problem(_line(node), loc, f"cannot read this value: {reason}")
            return _INVALID

    def text(self, node: Node, loc: Loc) -> str | None:
        """A text value; a number or boolean is a problem with the hint to quote it."""
        value = self.scalar(node, loc)
        if isinstance(value, _Invalid):
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool) and isinstance(node, ScalarNode):
            self.problem(
                _line(node),
                loc,
                f'expected text, got {_type_name(value)}: quote it ("{node.value}") so that leading '
                "zeros and '+' are kept",
            )
        else:
            self.problem(_line(node), loc, f"expected text, got {_type_name(value)}")
        return None

    # -- the document -------------------------------------------------------------------------------

    def dialplan(self, root: MappingNode) -> Dialplan | None:
        entries = self.mapping(root, ())
        if entries is None:
            return None
        self.unknown_keys(entries, (), _TOP_LEVEL_KEYS, "at the top level")

        if "version" not in entries:
            self.problem(_line(root), ("version",), f"missing: the format version ({SUPPORTED_VERSIONS[-1]})")
        else:
            node = entries["version"][1]
            version = self.scalar(node, ("version",))
            if not isinstance(version, _Invalid) and (
                isinstance(version, bool) or version not in SUPPORTED_VERSIONS
            ):
                self.problem(
                    _line(node),
                    ("version",),
                    f"unsupported version {_type_name(version)}: this softswitch reads version "
                    + ", ".join(str(v) for v in SUPPORTED_VERSIONS),
                )

        menu_nodes: dict[str, tuple[ScalarNode, Node]] = {}
        if "ivr" in entries:
            ivr = self.mapping(entries["ivr"][1], ("ivr",))
            if ivr is not None:
                menu_nodes = ivr
            # Routes may name only defined menus once the file has an `ivr:` section.
            self.references["menu"] = set(menu_nodes)
        menus: dict[str, IvrMenu] = {}
        for name, (key_node, node) in menu_nodes.items():
            menu = self.menu(name, key_node, node)
            if menu is not None:
                menus[name] = menu

        routes: list[Route] = []
        if "routes" not in entries:
            self.problem(_line(root), ("routes",), "missing: the list of routes")
        else:
            node = entries["routes"][1]
            if not isinstance(node, SequenceNode):
                self.problem(_line(node), ("routes",), f"expected a list of routes, got {_shape(node)}")
            else:
                for index, item in enumerate(node.value):
                    route = self.route(index, item)
                    if route is not None:
                        routes.append(route)

        if self._problems:
            return None
        for route in routes:
            self.check_route(route, routes, has_menus="ivr" in entries)
        warnings = tuple(text for _, text in sorted(self._warnings, key=lambda item: item[0]))
        return Dialplan(self.source, tuple(routes), MappingProxyType(menus), warnings)

    def route(self, index: int, node: Node) -> Route | None:
        loc: Loc = ("routes", index)
        entries = self.mapping(node, loc)
        if entries is None:
            return None
        matcher = self.matcher(entries, node, loc)
        action = self.action(entries, node, loc, route_index=index, extra_keys=MATCH_KEYS)
        if matcher is None or action is None:
            return None
        return Route(index, _line(node), matcher, action)

    def matcher(self, entries: dict[str, tuple[ScalarNode, Node]], node: Node, loc: Loc) -> Matcher | None:
        given = [key for key in MATCH_KEYS if key in entries]
        if not given:
            self.problem(_line(node), loc, "a route needs one of match, regex or range")
            return None
        if len(given) > 1:
            first = _line(entries[given[0]][0])
            for key in given[1:]:
                self.problem(
                    _line(entries[key][0]),
                    (*loc, key),
                    f"a route takes one of match, regex or range (also {given[0]} on line {first})",
                )
            return None
        key = given[0]
        value_node = entries[key][1]
        text = self.text(value_node, (*loc, key))
        if text is None:
            return None
        try:
            if key == "match":
                return PatternMatcher.compile(text)
            if key == "regex":
                return RegexMatcher.compile(text)
            return RangeMatcher.compile(text)
        except PatternError as exc:
            self.problem(_line(value_node), (*loc, key), str(exc))
            return None

    def action(
        self,
        entries: dict[str, tuple[ScalarNode, Node]],
        node: Node,
        loc: Loc,
        *,
        route_index: int,
        extra_keys: Sequence[str] = (),
    ) -> ActionTemplate | None:
        """The action of a route, an IVR option or a menu's fallback: `action:` and its fields."""
        kinds = tuple(ACTION_TYPES)
        if "action" not in entries:
            self.problem(_line(node), (*loc, "action"), f"missing: what to do, one of {', '.join(kinds)}")
            return None
        kind_node = entries["action"][1]
        kind = self.text(kind_node, (*loc, "action"))
        if kind is None:
            return None
        if kind not in ACTION_FIELDS:
            self.problem(
                _line(kind_node),
                (*loc, "action"),
                f"unknown action {kind!r}: expected one of {', '.join(kinds)}{_suggest(kind, kinds)}",
            )
            return None
        fields = ACTION_FIELDS[kind]
        self.unknown_keys(entries, loc, [*extra_keys, "action", *fields], f"for action {kind}")

        values: dict[str, object] = {}
        templates: list[tuple[str, Template]] = []
        valid = True
        for name, spec in fields.items():
            field_loc = (*loc, name)
            if name not in entries:
                if isinstance(spec, _Text) and spec.default is None:
                    self.problem(_line(node), field_loc, f"missing: {spec.what} (required by action {kind})")
                    valid = False
                elif isinstance(spec, _Text) and spec.default:
                    template = Template.parse(spec.default)
                    values[name] = spec.default
                    templates.append((name, template))
                continue
            value_node = entries[name][1]
            if isinstance(spec, _Text):
                checked = self.template(value_node, field_loc, spec)
                if checked is None:
                    valid = False
                    continue
                values[name] = checked.text if not checked.is_literal else checked.literal_text
                if not checked.is_literal:
                    templates.append((name, checked))
            else:
                value = self.value(value_node, field_loc, spec)
                if isinstance(value, _Invalid):
                    valid = False
                    continue
                values[name] = value
        if not valid:
            return None
        action = ACTION_TYPES[kind](**values, route_index=route_index, line=_line(node))  # type: ignore[arg-type]
        return ActionTemplate(action, tuple(templates))

    def value(self, node: Node, loc: Loc, spec: _Seconds | _Integer | _Flag | _Choice) -> object:
        value = self.scalar(node, loc)
        if isinstance(value, _Invalid):
            return value
        if isinstance(spec, _Seconds):
            if value is None and spec.nullable:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                none = " or null" if spec.nullable else ""
                self.problem(_line(node), loc, f"expected seconds (a number){none}, got {_type_name(value)}")
                return _INVALID
            if not (math.isfinite(value) and 0 < value <= spec.maximum):
                self.problem(
                    _line(node), loc, f"must be more than 0 and at most {spec.maximum:g} s, got {value}"
                )
                return _INVALID
            return float(value)
        if isinstance(spec, _Integer):
            if isinstance(value, bool) or not isinstance(value, int):
                self.problem(_line(node), loc, f"expected {spec.what}, got {_type_name(value)}")
                return _INVALID
            if not spec.minimum <= value <= spec.maximum:
                self.problem(_line(node), loc, f"must be {spec.what}, got {value}")
                return _INVALID
            return value
        if isinstance(spec, _Flag):
            if not isinstance(value, bool):
                self.problem(_line(node), loc, f"expected true or false, got {_type_name(value)}")
                return _INVALID
            return value
        if value not in spec.choices:
            self.problem(
                _line(node), loc, f"expected one of {', '.join(spec.choices)}, got {_type_name(value)}"
            )
            return _INVALID
        return value

    def template(self, node: Node, loc: Loc, spec: _Text) -> Template | None:
        """A string field: parsed substitutions, allowed characters, length, and the reference it names."""
        text = self.text(node, loc)
        if text is None:
            return None
        line = _line(node)
        try:
            template = Template.parse(text)
        except TemplateError as exc:
            self.problem(line, loc, str(exc))
            return None
        if spec.literal_only and not template.is_literal:
            self.problem(line, loc, "substitutions (${…}) are not allowed here")
            return None
        literal = template.literal_text
        if len(literal) > spec.max_length:
            self.problem(line, loc, f"longer than {spec.max_length} characters")
            return None
        if not (literal.isprintable() and re.fullmatch(f"[{spec.chars}]*", literal)):
            self.problem(line, loc, f"must be {spec.what}, got {text!r}")
            return None
        if template.is_literal:
            if not literal and spec.default != "":
                self.problem(line, loc, f"must not be empty: expected {spec.what}")
                return None
            if spec.literal_rule and literal and not re.fullmatch(spec.literal_rule, literal):
                self.problem(line, loc, f"must be {spec.what} not starting with '.', got {text!r}")
                return None
            known = self.references.get(spec.reference) if spec.reference else None
            if known is not None and literal not in known:
                listed = ", ".join(sorted(known)[:10]) or "none"
                self.problem(line, loc, f"no {spec.reference} named {literal!r} (defined: {listed})")
                return None
        return template

    # -- IVR menus ----------------------------------------------------------------------------------

    def menu(self, name: str, key_node: ScalarNode, node: Node) -> IvrMenu | None:
        loc: Loc = ("ivr", name)
        valid = True
        if not _MENU_NAME.fullmatch(name):
            self.problem(_line(key_node), loc, f"a menu name must be {_ID} (at most {MAX_NAME_LENGTH})")
            valid = False
        entries = self.mapping(node, loc)
        if entries is None:
            return None
        self.unknown_keys(entries, loc, _MENU_KEYS, "in an IVR menu")

        prompt: str | None = None
        if "prompt" not in entries:
            self.problem(_line(node), (*loc, "prompt"), "missing: the prompt played before each attempt")
        else:
            template = self.template(entries["prompt"][1], (*loc, "prompt"), _MENU_PROMPT)
            prompt = None if template is None else template.literal_text

        timeout_s: object = None
        if "timeout_s" in entries:
            timeout_s = self.value(
                entries["timeout_s"][1], (*loc, "timeout_s"), _Seconds(MAX_IVR_DIGIT_TIMEOUT_S)
            )
        attempts: object = None
        if "max_attempts" in entries:
            attempts = self.value(
                entries["max_attempts"][1],
                (*loc, "max_attempts"),
                _Integer(1, MAX_IVR_ATTEMPTS, f"a count from 1 to {MAX_IVR_ATTEMPTS}"),
            )

        options: dict[str, ActionTemplate] = {}
        if "options" not in entries:
            self.problem(_line(node), (*loc, "options"), "missing: the digits callers can press")
            valid = False
        else:
            options_node = entries["options"][1]
            option_entries = self.mapping(options_node, (*loc, "options"))
            if option_entries is None:
                valid = False
            elif not option_entries:
                self.problem(_line(options_node), (*loc, "options"), "a menu needs at least one option")
                valid = False
            else:
                for digit, (digit_node, option_node) in option_entries.items():
                    option_loc = (*loc, "options", digit)
                    if len(digit) != 1 or digit not in DTMF_SYMBOLS:
                        self.problem(
                            _line(digit_node),
                            option_loc,
                            f"an option is one DTMF key: one of {' '.join(DTMF_SYMBOLS)} (RFC 4733 §3.2)",
                        )
                        valid = False
                        continue
                    option = self.nested_action(option_node, option_loc)
                    if option is None:
                        valid = False
                    else:
                        options[digit] = option

        fallback: ActionTemplate | None = None
        if "fallback" in entries:
            fallback = self.nested_action(entries["fallback"][1], (*loc, "fallback"))
            valid = valid and fallback is not None
        if not valid or prompt is None or isinstance(timeout_s, _Invalid) or isinstance(attempts, _Invalid):
            return None
        return IvrMenu(
            name,
            prompt,
            MappingProxyType(options),
            timeout_s=timeout_s if isinstance(timeout_s, float) else DEFAULT_IVR_DIGIT_TIMEOUT_S,
            max_attempts=attempts if isinstance(attempts, int) else DEFAULT_IVR_ATTEMPTS,
            fallback=fallback,
            line=_line(node),
        )

    def nested_action(self, node: Node, loc: Loc) -> ActionTemplate | None:
        entries = self.mapping(node, loc)
        if entries is None:
            return None
        return self.action(entries, node, loc, route_index=-1)

    # -- warnings -----------------------------------------------------------------------------------

    def check_route(self, route: Route, routes: Sequence[Route], *, has_menus: bool) -> None:
        """Warnings for one route: never reached (earlier routes take all its numbers), likely typos."""
        loc: Loc = ("routes", route.index)
        matcher = route.matcher
        if (
            isinstance(matcher, PatternMatcher)
            and _LOWER_CASE_WILDCARD.fullmatch(matcher.pattern)
            and any(char in matcher.pattern for char in "0123456789")
        ):
            self.warn(
                route.line,
                (*loc, "match"),
                "lower-case 'x', 'z' and 'n' match only themselves; the digit wildcards are X, Z and N",
            )
        action = route.action.action
        if isinstance(action, Ivr) and not has_menus:
            self.warn(
                route.line, (*loc, "menu"), f"menu {action.menu!r} is not checked: the file has no ivr:"
            )

        earlier = routes[: route.index]
        for other in earlier:
            if _covers(other.matcher, matcher):
                self.warn(
                    route.line,
                    loc,
                    f"never used: routes[{other.index}] (line {other.line}, {other.matcher.describe()}) "
                    "takes all its numbers first",
                )
                return
        members = matcher.members()
        if members is None:
            return
        takers = _takers(members, earlier)
        if takers:
            named = ", ".join(f"routes[{r.index}] (line {r.line})" for r in takers)
            self.warn(route.line, loc, f"never used: all its numbers are taken first by {named}")


def _covers(first: Matcher, later: Matcher) -> bool:
    """True when `first` provably matches every routable number `later` matches (without enumerating)."""
    if first.catch_all:
        return True
    if isinstance(first, RegexMatcher) and isinstance(later, RegexMatcher):
        return first.pattern == later.pattern
    if isinstance(first, RangeMatcher) and isinstance(later, RangeMatcher):
        return first.width == later.width and first.first <= later.first and later.last <= first.last
    if not isinstance(first, PatternMatcher) or not isinstance(later, PatternMatcher):
        return False
    if first.tail == "":
        return (
            later.tail == ""
            and len(first.positions) == len(later.positions)
            and all(set(b) <= set(a) for a, b in zip(first.positions, later.positions, strict=True))
        )
    prefix = len(first.positions)
    if len(later.positions) < prefix:
        return False
    if not all(set(b) <= set(a) for a, b in zip(first.positions, later.positions[:prefix], strict=True)):
        return False
    if first.tail == "!":
        return True
    return len(later.positions) > prefix or later.tail == "."


def _takers(members: Iterator[str], earlier: Sequence[Route]) -> list[Route]:
    """The earlier routes that between them take every member; empty when one member reaches the route."""
    takers: dict[int, Route] = {}
    seen_any = False
    for number in members:
        seen_any = True
        for other in earlier:
            if other.matcher.matches(number):
                takers.setdefault(other.index, other)
                break
        else:
            return []
    return sorted(takers.values(), key=lambda r: r.index) if seen_any else []
