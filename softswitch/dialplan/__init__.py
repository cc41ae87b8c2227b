"""The dialplan: which numbers go where (dialplans/*.yaml, documented in docs/dialplan.md).

`load_dialplan(path)` reads and validates a file into a `Dialplan`; `Dialplan.route(number, caller=…)`
returns the action for a call to the Request-URI user part (RFC 3261 §19.1.1), or None (answer 404).
Call control executes the actions; nothing here does I/O beyond reading the file.
"""

from softswitch.dialplan.actions import (
    ACTION_TYPES,
    Action,
    ActionTemplate,
    Conference,
    Dial,
    Echo,
    Hangup,
    Ivr,
    IvrMenu,
    Playback,
    Queue,
    Template,
    TemplateError,
    Trunk,
)
from softswitch.dialplan.loader import DialplanError, load_dialplan, parse_dialplan
from softswitch.dialplan.matcher import (
    MAX_DIALED_LENGTH,
    Dialplan,
    Matcher,
    PatternError,
    PatternMatcher,
    RangeMatcher,
    RegexMatcher,
    Route,
    is_routable,
)

__all__ = [
    "ACTION_TYPES",
    "MAX_DIALED_LENGTH",
    "Action",
    "ActionTemplate",
    "Conference",
    "Dial",
    "Dialplan",
    "DialplanError",
    "Echo",
    "Hangup",
    "Ivr",
    "IvrMenu",
    "Matcher",
    "PatternError",
    "PatternMatcher",
    "Playback",
    "Queue",
    "RangeMatcher",
    "RegexMatcher",
    "Route",
    "Template",
    "TemplateError",
    "Trunk",
    "is_routable",
    "load_dialplan",
    "parse_dialplan",
]
