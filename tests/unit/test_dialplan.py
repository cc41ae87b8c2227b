"""The dialplan: pattern semantics, routing order, substitutions, validation with file:line:path, warnings."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softswitch.dialplan import (
    ACTION_TYPES,
    MAX_DIALED_LENGTH,
    Conference,
    Dial,
    Dialplan,
    DialplanError,
    Echo,
    Hangup,
    Ivr,
    PatternError,
    PatternMatcher,
    Playback,
    Queue,
    RangeMatcher,
    RegexMatcher,
    Template,
    TemplateError,
    Trunk,
    load_dialplan,
    parse_dialplan,
)
from softswitch.dialplan import loader as loader_module
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

DEFAULT_DIALPLAN = REPO_ROOT / "dialplans" / "default.yaml"
DEMO_USERS = {"1001", "1002", "1003", "1004"}


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str, **context: set[str]) -> list[str]:
    """The problems `load_dialplan` reports for `text`, with the file name shortened to FILE."""
    path = write(tmp_path, text)
    with pytest.raises(DialplanError) as caught:
        load_dialplan(path, **context)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return [problem.replace(str(path), "FILE") for problem in caught.value.problems]


def plan(text: str, **context: set[str]) -> Dialplan:
    return parse_dialplan(textwrap.dedent(text), "plan.yaml", **context)


# -- patterns -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "number", "expected"),
    [
        ("1XXX", "1001", True),
        ("1XXX", "1999", True),
        ("1XXX", "2001", False),
        ("1XXX", "100", False),
        ("1XXX", "10011", False),
        ("1XXX", "1a01", False),
        ("Z", "0", False),
        ("Z", "1", True),
        ("Z", "9", True),
        ("N", "1", False),
        ("N", "2", True),
        ("NXX", "200", True),
        ("NXX", "199", False),
        ("[1-5]", "1", True),
        ("[1-5]", "5", True),
        ("[1-5]", "6", False),
        ("[137]X", "30", True),
        ("[137]X", "20", False),
        ("[0-35-9]", "4", False),
        ("[0-35-9]", "3", True),
        ("[0-35-9]", "5", True),
        ("[*#]1", "#1", True),
        ("0.", "0", False),
        ("0.", "01", True),
        ("0.", "0123456789*#abc", True),
        ("12!", "12", True),
        ("12!", "123", True),
        ("12!", "13", False),
        (".", "x", True),
        ("!", "anything", True),
        ("8000", "8000", True),
        ("8000", "80000", False),
        ("*97", "*97", True),
        ("*97", "97", False),
        ("+86X.", "+8613800138000", True),
        ("alex", "alex", True),  # lower-case letters are literal
        ("x", "1", False),
        ("\\X", "X", True),
        ("\\X", "1", False),
        ("john\\.doe", "john.doe", True),
        ("john\\.doe", "johnXdoe", False),
        ("[X]", "X", True),  # inside a set, characters are literal
        ("[X]", "1", False),
        ("1XXX", "1٠٠٠", False),  # Arabic-Indic digits are not X
    ],
)
def test_pattern_semantics(pattern: str, number: str, expected: bool) -> None:
    assert PatternMatcher.compile(pattern).matches(number) is expected


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "empty pattern"),
        ("0.1", "'.' at column 2 is only allowed at the end of a pattern; write '\\.' for a literal '.'"),
        ("1!2", "'!' at column 2 is only allowed at the end of a pattern"),
        ("12\\", "'\\' at column 3 escapes nothing"),
        ("1[23", "'[' at column 2 is never closed"),
        ("12]", "']' at column 3 closes nothing"),
        ("1[]", "empty '[]' at column 2"),
        ("[5-1]", "range '5-1' in '[5-1]' at column 1 runs backwards"),
        ("1 2", "whitespace or control character at column 2"),
        ("X" * (MAX_DIALED_LENGTH + 1), f"matches only numbers longer than {MAX_DIALED_LENGTH} characters"),
    ],
)
def test_pattern_errors(pattern: str, reason: str) -> None:
    with pytest.raises(PatternError) as caught:
        PatternMatcher.compile(pattern)
    assert str(caught.value).startswith(reason)


def test_exact_pattern_compares_without_a_regex() -> None:
    assert PatternMatcher.compile("8000").exact == "8000"
    assert PatternMatcher.compile("*9\\7").exact == "*97"
    assert PatternMatcher.compile("8X00").exact is None


def test_regex_must_match_the_whole_number() -> None:
    matcher = RegexMatcher.compile(r"\+?86\d{11}")
    assert matcher.matches("+8613800138000")
    assert matcher.matches("8613800138000")
    assert not matcher.matches("008613800138000")
    assert not matcher.matches("+86138001380001")
    assert RegexMatcher.compile(r"^\+?86\d{11}$").matches("+8613800138000")
    assert not RegexMatcher.compile("86").matches("861")


def test_regex_errors_name_the_column() -> None:
    with pytest.raises(PatternError, match=r"bad regular expression: .* at column 3"):
        RegexMatcher.compile("12(3")


@pytest.mark.parametrize(
    ("spec", "number", "expected"),
    [
        ("9000-9099", "9000", True),
        ("9000-9099", "9042", True),
        ("9000-9099", "9099", True),
        ("9000-9099", "9100", False),
        ("9000-9099", "8999", False),
        ("9000-9099", "09042", False),
        ("9000-9099", "904", False),
        ("9000-9099", "90a2", False),
        ("9000-9099", "９０４２", False),  # full-width digits are not digits of a number
        ("0100-0199", "0150", True),
        ("0100-0199", "150", False),
        (" 5 - 7 ", "6", True),
        ("5-5", "5", True),
    ],
)
def test_range_semantics(spec: str, number: str, expected: bool) -> None:
    assert RangeMatcher.compile(spec).matches(number) is expected


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("9000", "expected FIRST-LAST in digits (e.g. 9000-9099), got '9000'"),
        ("9000-99", "9000 and 99 differ in width"),
        ("9099-9000", "first 9099 is above last 9000"),
        ("a-b", "expected FIRST-LAST in digits"),
        ("-5-6", "expected FIRST-LAST in digits"),
    ],
)
def test_range_errors(spec: str, reason: str) -> None:
    with pytest.raises(PatternError) as caught:
        RangeMatcher.compile(spec)
    assert str(caught.value).startswith(reason)


# An independent reference for extension patterns: a token list matched by backtracking.
_REFERENCE_SETS = {"X": set("0123456789"), "Z": set("123456789"), "N": set("23456789")}


def _reference_tokens(pattern: str) -> list[set[str] | str]:
    tokens: list[set[str] | str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char in _REFERENCE_SETS:
            tokens.append(_REFERENCE_SETS[char])
        elif char == "[":
            end = pattern.index("]", index)
            body, members = pattern[index + 1 : end], set()
            i = 0
            while i < len(body):
                if i + 2 < len(body) and body[i + 1] == "-":
                    members |= {chr(c) for c in range(ord(body[i]), ord(body[i + 2]) + 1)}
                    i += 3
                else:
                    members.add(body[i])
                    i += 1
            tokens.append(members)
            index = end
        elif char in ".!":
            tokens.append(char)
        else:
            tokens.append({char})
        index += 1
    return tokens


def _reference_match(tokens: list[set[str] | str], number: str) -> bool:
    if not tokens:
        return number == ""
    head, rest = tokens[0], tokens[1:]
    if head == ".":
        return any(_reference_match(rest, number[i:]) for i in range(1, len(number) + 1))
    if head == "!":
        return any(_reference_match(rest, number[i:]) for i in range(len(number) + 1))
    assert isinstance(head, set)
    return bool(number) and number[0] in head and _reference_match(rest, number[1:])


_pattern_token = st.sampled_from(
    ["0", "1", "2", "5", "9", "*", "#", "a", "X", "Z", "N", "[1-5]", "[07]", "[2-3*]"]
)


@settings(max_examples=400, deadline=None)
@given(
    body=st.lists(_pattern_token, max_size=6),
    tail=st.sampled_from(["", ".", "!"]),
    number=st.text(alphabet="0123456789*#aX", max_size=9),
)
def test_patterns_agree_with_a_reference_matcher(body: list[str], tail: str, number: str) -> None:
    pattern = "".join(body) + tail
    if not pattern:
        return
    expected = _reference_match(_reference_tokens(pattern), number)
    assert PatternMatcher.compile(pattern).matches(number) is expected


@settings(max_examples=200, deadline=None)
@given(body=st.lists(_pattern_token, min_size=1, max_size=4))
def test_members_are_exactly_the_matching_numbers(body: list[str]) -> None:
    matcher = PatternMatcher.compile("".join(body))
    members = matcher.members()
    assert members is not None
    listed = list(members)
    assert len(listed) == len(set(listed))
    assert all(matcher.matches(number) for number in listed)
    # Changing any one character to one outside its position's set stops the match.
    for number in listed[:5]:
        for index, chars in enumerate(matcher.positions):
            outside = next(c for c in "0123456789*#aXZ%" if c not in chars)
            assert not matcher.matches(number[:index] + outside + number[index + 1 :])


# -- routing ----------------------------------------------------------------------------------------

ORDERED = """\
version: 1
routes:
  - match: "1001"
    action: hangup
    code: 486
  - match: "1XXX"
    action: dial
  - regex: "1[0-9]{3}|2000"
    action: echo
  - range: "9000-9099"
    action: conference
  - match: "9."
    action: queue
    queue: support
"""


def test_first_matching_route_in_file_order_wins() -> None:
    dialplan = plan(ORDERED)
    assert dialplan.route("1001") == Hangup(486)
    assert dialplan.route("1002") == Dial("1002")
    assert dialplan.route("2000") == Echo()
    assert dialplan.route("9050") == Conference("9050")
    assert dialplan.route("9100") == Queue("support")
    assert dialplan.route("3000") is None
    found = dialplan.match("1002")
    assert found is not None and (found.index, found.line) == (1, 6)


def test_actions_carry_their_route_index_and_line() -> None:
    action = plan(ORDERED).route("9100")
    assert action is not None and (action.route_index, action.line) == (4, 12)
    assert action.kind == "queue"


@pytest.mark.parametrize(
    "number", ["", " 1001", "1001 ", "10\r\n01", "1\x0001", "1" * (MAX_DIALED_LENGTH + 1)]
)
def test_numbers_that_are_not_routable_match_nothing(number: str) -> None:
    dialplan = plan('version: 1\nroutes:\n  - match: "!"\n    action: echo\n')
    assert dialplan.route(number) is None
    assert dialplan.route("1" * MAX_DIALED_LENGTH) == Echo()


def test_routing_uses_only_patterns_compiled_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    dialplan = plan(ORDERED)

    def no_compiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pattern was compiled while routing")

    monkeypatch.setattr(re, "compile", no_compiling)
    monkeypatch.setattr(re, "fullmatch", no_compiling)
    monkeypatch.setattr(re, "match", no_compiling)
    assert dialplan.route("1999") == Dial("1999")
    assert dialplan.route("9100") == Queue("support")


# -- substitutions ----------------------------------------------------------------------------------


def test_substitutions_in_string_fields() -> None:
    dialplan = plan(
        """\
        version: 1
        routes:
          - match: "0."
            action: trunk
            trunk: pstn
            number: "${number:1}"
          - match: "55XX"
            action: dial
            target: "agent-${number:-2}"
          - match: "66XX"
            action: conference
            room: "room-${caller}-${number:2:1}"
            muted: true
          - match: "77XX"
            action: hangup
            code: 403
            reason: "${caller} may not call ${number} ($$)"
          - match: "88XX"
            action: playback
            prompt: "greeting_${number:0:-2}"
        """
    )
    assert dialplan.route("0123") == Trunk("pstn", "123")
    assert dialplan.route("5507") == Dial("agent-07")
    assert dialplan.route("6612", caller="1001") == Conference("room-1001-1", muted=True)
    assert dialplan.route("7700", caller="1002") == Hangup(403, "1002 may not call 7700 ($)")
    assert dialplan.route("8899") == Playback("greeting_88")


def test_substituted_values_never_carry_control_characters() -> None:
    dialplan = plan('version: 1\nroutes:\n  - match: "."\n    action: hangup\n    reason: "no ${caller}"\n')
    assert dialplan.route("1", caller="evil\r\nX-Injected: 1") == Hangup(404, "no evilX-Injected: 1")


def test_actions_without_substitutions_are_shared_not_copied() -> None:
    dialplan = plan(ORDERED)
    assert dialplan.route("1001") is dialplan.route("1001")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("${nmber}", "unknown variable ${nmber}: expected ${number} or ${caller}"),
        ("a$b", "bad substitution at column 2"),
        ("${number", "bad substitution at column 1"),
        ("${number:x}", "bad substitution at column 1"),
        ("${number:1000}", "bad substitution at column 1"),
    ],
)
def test_template_errors(text: str, reason: str) -> None:
    with pytest.raises(TemplateError) as caught:
        Template.parse(text)
    assert str(caught.value).startswith(reason)


def test_template_slices_follow_offset_and_length() -> None:
    values = {"number": "0123456", "caller": "1001"}
    cases = {
        "${number}": "0123456",
        "${number:1}": "123456",
        "${number:-3}": "456",
        "${number:1:2}": "12",
        "${number:0:-2}": "01234",
        "${number:10}": "",
        "x${caller}y": "x1001y",
        "$$${caller}": "$1001",
    }
    for text, expected in cases.items():
        assert Template.parse(text).render(values) == expected, text


def test_every_action_field_in_a_file_is_a_field_of_its_dataclass() -> None:
    assert set(loader_module.ACTION_FIELDS) == set(ACTION_TYPES)
    for kind, fields in loader_module.ACTION_FIELDS.items():
        names = {f.name for f in dataclasses.fields(ACTION_TYPES[kind])} - {"route_index", "line"}
        assert set(fields) == names, kind


# -- validation: every error with its file, line and key path ---------------------------------------


def test_unknown_keys_wrong_types_and_missing_fields_all_reported_in_line_order(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """\
        version: 1
        colour: blue
        routes:
          - match: 1001
            action: dial
          - match: "8000"
            action: queue
          - match: "X"
            action: dial
            timeout: 30
          - match: "XX"
            action: dial
            timeout_s: "30"
          - match: "XXX"
            action: voicemail
          - match: "*9"
            action: hangup
            code: 200
          - match: "*8"
            action: conference
            muted: "yes"
        """,
    )
    assert problems == [
        "FILE:2: colour: unknown key at the top level (allowed: version, routes, ivr)",
        'FILE:4: routes[0].match: expected text, got the number 1001: quote it ("1001") so that leading '
        "zeros and '+' are kept",
        "FILE:6: routes[1].queue: missing: a name of letters, digits, '.', '_', '~' or '-' "
        "(required by action queue)",
        "FILE:10: routes[2].timeout: unknown key for action dial "
        "(allowed: match, regex, range, action, target, timeout_s, max_duration_s) "
        "(did you mean 'timeout_s'?)",
        "FILE:13: routes[3].timeout_s: expected seconds (a number), got the text '30'",
        "FILE:15: routes[4].action: unknown action 'voicemail': expected one of dial, queue, conference, "
        "ivr, echo, playback, hangup, trunk",
        "FILE:18: routes[5].code: must be a SIP final error status 400-699 (RFC 3261 §21.4-21.6), got 200",
        "FILE:21: routes[6].muted: expected true or false, got the text 'yes'",
    ]


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ('- match: "0.1"\n    action: echo', "FILE:3: routes[0].match: '.' at column 2 is only allowed"),
        ('- regex: "1(2"\n    action: echo', "FILE:3: routes[0].regex: bad regular expression: missing ), "),
        ('- range: "9000-99"\n    action: echo', "FILE:3: routes[0].range: 9000 and 99 differ in width"),
        ('- range: "9099-9000"\n    action: echo', "FILE:3: routes[0].range: first 9099 is above last 9000"),
        ("- action: echo", "FILE:3: routes[0]: a route needs one of match, regex or range"),
        (
            '- match: "1"\n    range: "1-2"\n    action: echo',
            "FILE:4: routes[0].range: a route takes one of match, regex or range (also match on line 3)",
        ),
        (
            '- match: "1"',
            "FILE:3: routes[0].action: missing: what to do, one of dial, queue, conference, ivr, echo, "
            "playback, hangup, trunk",
        ),
        ('- match: "1"\n    action: dial_trunk', "FILE:4: routes[0].action: unknown action 'dial_trunk'"),
        ('- match: "1"\n    action: [dial]', "FILE:4: routes[0].action: expected a single value, got a list"),
        (
            '- match: "1"\n    action: dial\n    timeout_s: 0',
            "FILE:5: routes[0].timeout_s: must be more than 0",
        ),
        (
            '- match: "1"\n    action: dial\n    timeout_s: 601',
            "FILE:5: routes[0].timeout_s: must be more than 0",
        ),
        (
            '- match: "1"\n    action: dial\n    timeout_s: .nan',
            "FILE:5: routes[0].timeout_s: must be more than 0",
        ),
        (
            '- match: "1"\n    action: dial\n    timeout_s: true',
            "FILE:5: routes[0].timeout_s: expected seconds",
        ),
        (
            '- match: "1"\n    action: dial\n    max_duration_s: 100000',
            "FILE:5: routes[0].max_duration_s: must be more than 0 and at most 86400 s, got 100000",
        ),
        (
            '- match: "1"\n    action: dial\n    target: "a b"',
            "FILE:5: routes[0].target: must be a user name",
        ),
        ('- match: "1"\n    action: dial\n    target: ""', "FILE:5: routes[0].target: must not be empty"),
        (
            '- match: "1"\n    action: dial\n    target: "${nummer}"',
            "FILE:5: routes[0].target: unknown variable ${nummer}: expected ${number} or ${caller}",
        ),
        ('- match: "1"\n    action: hangup\n    code: 486.0', "FILE:5: routes[0].code: expected a SIP final"),
        (
            '- match: "1"\n    action: hangup\n    reason: "Busy\\r\\nX: y"',
            "FILE:5: routes[0].reason: must be printable text, got 'Busy\\r\\nX: y'",
        ),
        (
            '- match: "1"\n    action: hangup\n    reason: "' + "r" * 129 + '"',
            "FILE:5: routes[0].reason: longer than 128",
        ),
        (
            '- match: "1"\n    action: playback\n    prompt: "../etc"',
            "FILE:5: routes[0].prompt: must be a prompt name",
        ),
        (
            '- match: "1"\n    action: playback\n    prompt: ".x"',
            "FILE:5: routes[0].prompt: must be a prompt name",
        ),
        (
            '- match: "1"\n    action: playback\n    prompt: p\n    then: echo',
            "FILE:6: routes[0].then: expected one of hangup, readback, got the text 'echo'",
        ),
        ('- match: "1"\n    action: trunk', "FILE:3: routes[0].trunk: missing: a name of letters"),
        (
            '- match: "1"\n    action: queue\n    queue: "a/b"',
            "FILE:5: routes[0].queue: must be a name of letters",
        ),
        ('- match: "1"\n    action: ivr', "FILE:3: routes[0].menu: missing: a name of letters"),
        (
            '- match: "1"\n    action: echo\n    queue: x',
            "FILE:5: routes[0].queue: unknown key for action echo",
        ),
        (
            '- match: "1"\n    action: echo\n    action: dial',
            "FILE:5: routes[0].action: duplicate key (first on line 4)",
        ),
        ('- "1XXX"', "FILE:3: routes[0]: expected a mapping (key: value lines), got '1XXX'"),
        (
            '- match: "1"\n    action: echo\n    <<: {x: 1}',
            "FILE:5: routes[0]: YAML merge keys (<<) are not supported",
        ),
        (
            '- match: !foo "1"\n    action: echo',
            "FILE:3: routes[0].match: cannot read this value: could not determine",
        ),
        (
            "- match: 2001-13-45\n    action: echo",
            "FILE:3: routes[0].match: cannot read this value: month must be",
        ),
    ],
)
def test_each_route_error_names_file_line_and_path(tmp_path: Path, route: str, expected: str) -> None:
    problems = problems_of(tmp_path, f"version: 1\nroutes:\n  {route}\n")
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "FILE:1: empty dialplan: expected `version: 1` and `routes:`"),
        ("# only a comment\n", "FILE:1: empty dialplan"),
        ("- 1\n- 2\n", "FILE:1: expected a mapping with `version:` and `routes:`, got a list"),
        ("routes: []\n", "FILE:1: version: missing: the format version (1)"),
        ("version: 1\n", "FILE:1: routes: missing: the list of routes"),
        (
            "version: 2\nroutes: []\n",
            "FILE:1: version: unsupported version the number 2: this softswitch reads version 1",
        ),
        ("version: true\nroutes: []\n", "FILE:1: version: unsupported version the boolean true"),
        ("version: 1\nroutes:\n  match: x\n", "FILE:3: routes: expected a list of routes, got a mapping"),
        ("version: 1\nroutes: [\n", "FILE:3: YAML syntax error: expected the node content, but found"),
        ('version: 1\nroutes:\n  - match: "1\n', "FILE:4: YAML syntax error: found unexpected end of stream"),
        ("version: 1\n\troutes: []\n", "FILE:2: YAML syntax error: found character '\\t' that cannot start"),
        (
            "version: 1\nroutes: []\n---\nversion: 1\n",
            "FILE:3: YAML syntax error: expected a single document in the stream, but found another document",
        ),
        ("version: 1\nroutes: *nowhere\n", "FILE:2: YAML syntax error: found undefined alias 'nowhere'"),
        (
            "version: 1\nroutes: []\nnote: \x07\n",
            "FILE:3: YAML syntax error: special characters are not allowed",
        ),
        (
            "version: 1\nroutes: " + "[" * 2000 + "]" * 2000 + "\n",
            "FILE:1: YAML syntax error: nested too deeply",
        ),
        (
            "version: 1\nroutes: []\nivr: [demo]\n",
            "FILE:3: ivr: expected a mapping (key: value lines), got a list",
        ),
        ("? [a]\n: 1\nversion: 1\nroutes: []\n", "FILE:1: (top level): a key must be plain text"),
    ],
)
def test_document_errors(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(tmp_path, text)
    assert problems[0].startswith(expected), problems


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(DialplanError) as caught:
        load_dialplan(missing)
    assert caught.value.problems == [f"{missing}: cannot read: No such file or directory"]

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\nroutes: []\n# \xff\xfe\n")
    with pytest.raises(DialplanError) as caught:
        load_dialplan(binary)
    assert caught.value.problems == [f"{binary}:3: not UTF-8 text: invalid start byte"]

    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (loader_module.MAX_DIALPLAN_BYTES + 1))
    with pytest.raises(DialplanError) as caught:
        load_dialplan(huge)
    assert caught.value.problems == [
        f"{huge}: larger than {loader_module.MAX_DIALPLAN_BYTES} bytes: not a dialplan"
    ]


def test_cross_references_are_checked_when_the_configuration_is_given(tmp_path: Path) -> None:
    text = """\
        version: 1
        routes:
          - match: "1001"
            action: dial
            target: "1009"
          - match: "1XXX"
            action: dial
            target: "${number}"
          - match: "8000"
            action: queue
            queue: sales
          - match: "0."
            action: trunk
            trunk: gsm
          - match: "81XX"
            action: queue
            queue: "q${number}"
        """
    problems = problems_of(tmp_path, text, users=DEMO_USERS, queues={"support"}, trunks=set())
    assert problems == [
        "FILE:5: routes[0].target: no user named '1009' (defined: 1001, 1002, 1003, 1004)",
        "FILE:11: routes[2].queue: no queue named 'sales' (defined: support)",
        "FILE:14: routes[3].trunk: no trunk named 'gsm' (defined: none)",
    ]
    # Without the configuration, the names are not checked.
    assert len(load_dialplan(tmp_path / "plan.yaml").routes) == 5
    # With it, names that exist pass.
    good = load_dialplan(tmp_path / "plan.yaml", users={"1009"}, queues={"sales"}, trunks={"gsm"})
    assert good.route("0123") == Trunk("gsm", "0123")


IVR_PLAN = """\
version: 1
routes:
  - match: "7000"
    action: ivr
    menu: main
ivr:
  main:
    prompt: main_menu
    timeout_s: 4
    options:
      1: {action: queue, queue: support}
      "*": {action: ivr, menu: main}
      "#":
        action: dial
        target: "${caller}"
    fallback: {action: hangup, code: 480}
  sub:
    prompt: sub_menu
    options:
      "0": {action: conference, room: "room-${number}"}
"""


def test_ivr_menus() -> None:
    dialplan = plan(IVR_PLAN, queues={"support"}, users=DEMO_USERS)
    assert dialplan.route("7000") == Ivr("main")
    menu = dialplan.menus["main"]
    assert (menu.prompt, menu.timeout_s, menu.max_attempts, menu.line) == ("main_menu", 4.0, 3, 8)
    assert sorted(menu.options) == ["#", "*", "1"]
    assert menu.choose("1", number="7000") == Queue("support")
    assert menu.choose("*", number="7000") == Ivr("main")
    assert menu.choose("#", number="7000", caller="1002") == Dial("1002")
    assert menu.choose("5", number="7000") is None
    chosen = menu.choose("1", number="7000")
    assert chosen is not None and (chosen.route_index, chosen.line) == (-1, 11)
    assert menu.fallback_action(number="7000") == Hangup(480)
    assert dialplan.menus["sub"].choose("0", number="7000") == Conference("room-7000")
    assert dialplan.menus["sub"].fallback_action(number="7000") is None
    assert dialplan.warnings == ()


def test_ivr_errors(tmp_path: Path) -> None:
    text = """\
        version: 1
        routes:
          - match: "7000"
            action: ivr
            menu: mian
        ivr:
          main:
            prompt: "${number}"
            timeout_s: 90
            max_attempts: 0
            options:
              12: {action: echo}
              "1": {action: queue}
              "2": {action: ivr, menu: nowhere}
            fallback: {action: dial, target: "9999"}
            repeat: 2
          "bad/name":
            options: {}
        """
    problems = problems_of(tmp_path, text, users=DEMO_USERS)
    assert problems == [
        "FILE:5: routes[0].menu: no menu named 'mian' (defined: bad/name, main)",
        "FILE:8: ivr.main.prompt: substitutions (${…}) are not allowed here",
        "FILE:9: ivr.main.timeout_s: must be more than 0 and at most 60 s, got 90",
        "FILE:10: ivr.main.max_attempts: must be a count from 1 to 10, got 0",
        "FILE:12: ivr.main.options.12: an option is one DTMF key: one of 0 1 2 3 4 5 6 7 8 9 * # A B C D "
        "(RFC 4733 §3.2)",
        "FILE:13: ivr.main.options.1.queue: missing: a name of letters, digits, '.', '_', '~' or '-' "
        "(required by action queue)",
        "FILE:14: ivr.main.options.2.menu: no menu named 'nowhere' (defined: bad/name, main)",
        "FILE:15: ivr.main.fallback.target: no user named '9999' (defined: 1001, 1002, 1003, 1004)",
        "FILE:16: ivr.main.repeat: unknown key in an IVR menu "
        "(allowed: prompt, options, timeout_s, max_attempts, fallback)",
        "FILE:17: ivr.bad/name: a menu name must be a name of letters, digits, '.', '_', '~' or '-' "
        "(at most 64)",
        "FILE:18: ivr.bad/name.prompt: missing: the prompt played before each attempt",
        "FILE:18: ivr.bad/name.options: a menu needs at least one option",
    ]


def test_ivr_menu_names_are_not_checked_without_an_ivr_section() -> None:
    dialplan = plan('version: 1\nroutes:\n  - match: "7000"\n    action: ivr\n    menu: later\n')
    assert dialplan.route("7000") == Ivr("later")
    assert dialplan.warnings == (
        "plan.yaml:3: routes[0].menu: menu 'later' is not checked: the file has no ivr:",
    )


# -- warnings ---------------------------------------------------------------------------------------


def test_routes_that_can_never_match_are_warnings() -> None:
    dialplan = plan(
        """\
        version: 1
        routes:
          - match: "1XXX"
            action: dial
          - match: "1001"
            action: echo
          - range: "9000-9049"
            action: conference
          - range: "9050-9099"
            action: conference
          - match: "90XX"
            action: echo
          - match: "0."
            action: trunk
            trunk: pstn
          - match: "01!"
            action: echo
          - match: "01."
            action: echo
          - regex: "5+"
            action: echo
          - regex: "5+"
            action: echo
          - match: "1x00"
            action: echo
          - match: "1[0-4]X"
            action: echo
          - match: "[0-4]XX"
            action: echo
          - match: "."
            action: hangup
          - match: "*97"
            action: echo
        """
    )
    assert dialplan.warnings == (
        "plan.yaml:5: routes[1]: never used: routes[0] (line 3, match '1XXX') takes all its numbers first",
        "plan.yaml:11: routes[4]: never used: all its numbers are taken first by routes[2] (line 7), "
        "routes[3] (line 9)",
        "plan.yaml:16: routes[6]: never used: routes[5] (line 13, match '0.') takes all its numbers first",
        "plan.yaml:18: routes[7]: never used: routes[5] (line 13, match '0.') takes all its numbers first",
        "plan.yaml:22: routes[9]: never used: routes[8] (line 20, regex '5+') takes all its numbers first",
        "plan.yaml:24: routes[10].match: lower-case 'x', 'z' and 'n' match only themselves; "
        "the digit wildcards are X, Z and N",
        "plan.yaml:32: routes[14]: never used: routes[13] (line 30, match '.') takes all its numbers first",
    )
    # Warnings do not change routing: the file order decides.
    assert dialplan.route("1001") == Dial("1001")
    assert dialplan.route("*97") == Hangup()


def test_partly_overlapping_routes_are_not_warned_about() -> None:
    dialplan = plan(
        """\
        version: 1
        routes:
          - match: "1001"
            action: echo
          - match: "1XXX"
            action: dial
          - range: "9000-9049"
            action: conference
          - match: "90XX"
            action: echo
          - match: "01."
            action: echo
          - match: "0!"
            action: echo
          - match: "alex"
            action: echo
          - match: "5."
            action: echo
          - match: "5!"
            action: echo
        """
    )
    assert dialplan.warnings == ()


# -- the shipped default dialplan -------------------------------------------------------------------


def test_default_dialplan_loads_against_the_demo_configuration_and_routes_the_contract_numbers() -> None:
    dialplan = load_dialplan(DEFAULT_DIALPLAN, users=DEMO_USERS, queues={"support"}, trunks=set())
    assert dialplan.warnings == ()
    assert dialplan.route("1001", caller="1002") == Dial("1001", 30)
    assert dialplan.route("1004") == Dial("1004", 30)
    assert dialplan.route("8000") == Queue("support")
    assert dialplan.route("9000") == Conference("9000")
    assert dialplan.route("9042") == Conference("9042")
    assert dialplan.route("9099") == Conference("9099")
    assert dialplan.route("7000") == Ivr("demo")
    assert dialplan.route("*97") == Echo()
    assert dialplan.route("*98") == Playback("enter_digits", then="readback")
    # Anything else is rejected by the file's own catch-all, not left unrouted.
    assert dialplan.route("5555") == Hangup(404)
    assert dialplan.route("9100") == Hangup(404)
    assert dialplan.route("") is None
    demo = dialplan.menus["demo"]
    assert demo.choose("1", number="7000") == Queue("support")
    assert demo.choose("2", number="7000") == Conference("9000")


def test_config_demo_dialplan_path_is_the_shipped_file() -> None:
    from softswitch.config import load_config

    assert load_config(None, env={}, cwd=REPO_ROOT).dialplan == DEFAULT_DIALPLAN


# -- robustness -------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(number=st.text(max_size=80), caller=st.text(max_size=80))
def test_route_never_raises(number: str, caller: str) -> None:
    dialplan = _robustness_plan()
    action = dialplan.route(number, caller=caller)
    assert action is None or action.route_index >= 0


_ROBUSTNESS_PLAN: list[Dialplan] = []


def _robustness_plan() -> Dialplan:
    if not _ROBUSTNESS_PLAN:
        _ROBUSTNESS_PLAN.append(
            plan(
                """\
                version: 1
                routes:
                  - match: "*9[78]"
                    action: echo
                  - regex: "\\\\+?86\\\\d{11}"
                    action: trunk
                    trunk: pstn
                    number: "${number:-11}"
                  - range: "9000-9099"
                    action: conference
                    room: "${number}-${caller:0:3}"
                  - match: "1XXX"
                    action: dial
                    target: "${number}"
                  - match: "0!"
                    action: hangup
                    reason: "${caller} ${number:1:-1}"
                """
            )
        )
        _ROBUSTNESS_PLAN.append(load_dialplan(DEFAULT_DIALPLAN))
    return _ROBUSTNESS_PLAN[0]


@settings(max_examples=500, deadline=None)
@given(number=st.text(max_size=80), caller=st.text(max_size=80))
def test_default_dialplan_route_never_raises(number: str, caller: str) -> None:
    _robustness_plan()
    _ROBUSTNESS_PLAN[1].route(number, caller=caller)


_yaml_scalar = st.one_of(
    st.sampled_from(
        [
            "1XXX",
            '"8000"',
            "9000-9099",
            "dial",
            "queue",
            "echo",
            "hangup",
            "ivr",
            "trunk",
            "conference",
            "playback",
            "30",
            "-1",
            "null",
            "true",
            "'${number}'",
            "'${x}'",
            "[1, 2]",
            "{a: b}",
            "*a",
            "&a x",
            "0.",
            '"\\x00"',
            "!!binary aGk=",
            "2001-13-45",
            ".inf",
            "<<",
            "~",
        ]
    ),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), max_size=12),
)
_yaml_key = st.sampled_from(
    [
        "match",
        "regex",
        "range",
        "action",
        "target",
        "timeout_s",
        "max_duration_s",
        "queue",
        "room",
        "muted",
        "menu",
        "prompt",
        "then",
        "code",
        "reason",
        "trunk",
        "number",
        "options",
        "fallback",
        "max_attempts",
        "1",
        "<<",
        "x",
    ]
)


_match_value = st.one_of(
    st.sampled_from(['"1XXX"', '"0."', '"9000-9099"', '"[1-3]X!"', "'\\d+'", '"*9"']), _yaml_scalar
)
_action_kind = st.one_of(
    st.sampled_from(["echo", "dial", "conference", "hangup", "queue", "ivr"]), _yaml_scalar
)


@st.composite
def _yaml_entries(draw: st.DrawFn, indent: str) -> list[str]:
    """A route-like mapping: usually a match key and an action, then arbitrary keys."""
    entries = []
    if draw(st.integers(0, 9)) > 0:
        entries.append(f"{draw(st.sampled_from(['match', 'regex', 'range']))}: {draw(_match_value)}")
    if draw(st.integers(0, 9)) > 0:
        entries.append(f"action: {draw(_action_kind)}")
    if draw(st.booleans()):
        entries.append(f"{draw(_yaml_key)}: {draw(_yaml_scalar)}")
    if not entries:
        return [f"{indent}- {{}}"]
    return [f"{indent}- {entries[0]}", *(f"{indent}  {entry}" for entry in entries[1:])]


@st.composite
def _yaml_documents(draw: st.DrawFn) -> str:
    """Dialplan-shaped YAML, often valid, with wrong keys, types and values mixed in."""
    lines = [draw(st.sampled_from(["version: 1", "version: 1", "version: 2", ""])), "routes:"]
    for _ in range(draw(st.integers(0, 3))):
        lines += draw(_yaml_entries("  "))
    if draw(st.booleans()):
        lines += [
            "ivr:",
            "  m:",
            f"    prompt: {draw(st.one_of(st.just('p'), _yaml_scalar))}",
            "    options:",
        ]
        for _ in range(draw(st.integers(0, 3))):
            digit = draw(st.sampled_from(["1", "'*'", "12", "x", "'#'"]))
            value = draw(
                st.one_of(st.sampled_from(["{action: echo}", "{action: ivr, menu: m}"]), _yaml_scalar)
            )
            lines.append(f"      {digit}: {value}")
    return "\n".join(lines) + "\n"


_valid_action = st.sampled_from(
    [
        "action: echo",
        "action: dial\n    timeout_s: 20",
        "action: hangup\n    code: 486",
        "action: conference\n    room: r${number:1}",
        "action: trunk\n    trunk: pstn",
        "action: queue\n    queue: support",
        "action: ivr\n    menu: m",
    ]
)


@st.composite
def _valid_documents(draw: st.DrawFn) -> str:
    """Valid dialplans of random patterns and ranges, which exercise routing and the shadow analysis."""
    lines = ["version: 1", "routes:"]
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            pattern = "".join(draw(st.lists(_pattern_token, min_size=1, max_size=5)))
            key, value = "match", pattern + draw(st.sampled_from(["", ".", "!"]))
        else:
            first = draw(st.integers(0, 999))
            key, value = "range", f"{first:03d}-{draw(st.integers(first, 999)):03d}"
        lines += [f'  - {key}: "{value}"', f"    {draw(_valid_action)}"]
    lines += ["ivr:", "  m:", "    prompt: p", "    options:", "      1: {action: ivr, menu: m}"]
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None)
@given(text=_valid_documents(), numbers=st.lists(st.text("0123456789*#aX", max_size=6), max_size=10))
def test_valid_dialplans_load_and_route(text: str, numbers: list[str]) -> None:
    dialplan = parse_dialplan(text, "gen.yaml", users=DEMO_USERS, queues={"support"}, trunks={"pstn"})
    for number in numbers:
        found = dialplan.match(number)
        expected = next((r for r in dialplan.routes if r.matcher.matches(number)), None) if number else None
        assert found is expected
        action = dialplan.route(number, caller="1001")
        assert (action is None) is (found is None)
    # A route reported as never used really takes no number.
    unused = {int(w.split("routes[")[1].split("]")[0]) for w in dialplan.warnings if "never used" in w}
    for number in numbers:
        found = dialplan.match(number)
        assert found is None or found.index not in unused
    for index in unused:
        members = dialplan.routes[index].matcher.members()
        if members is not None:
            for number in members:
                found = dialplan.match(number)
                assert found is not None and found.index < index


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(_yaml_documents(), st.text(max_size=200)))
def test_any_text_loads_or_raises_dialplan_error(text: str) -> None:
    try:
        dialplan = parse_dialplan(text, "fuzz.yaml", users=DEMO_USERS, queues={"support"}, trunks={"pstn"})
    except DialplanError as exc:
        assert exc.problems
        assert all(problem.startswith("fuzz.yaml:") for problem in exc.problems)
        return
    for number in ("1001", "*97", "0", "x" * 10):
        dialplan.route(number, caller="1001")
