"""The CloudEvents 1.0 envelope of every published event (EVENTS.md "Envelope").

Structured content mode of the CloudEvents JSON event format (CloudEvents 1.0 spec §3 "Context
Attributes"; JSON format §3 "Envelope"): the context attributes `specversion`, `id`, `source`, `type`,
`time`, `datacontenttype` and `subject`, our extensions `tenant` and `seq`, and the event's fields in
`data`. Pure functions and one counter, no I/O: sinks (MQTT, WebSocket, webhooks) share them.

`seq` runs per subject (kind and id: a conversation, a device, an agent, a queue), starts at 1 and
increases by one with no gaps, so a consumer detects loss and restores order. The counters survive a
restart through the outbox (`softswitch.store.outbox`): device, agent and queue subjects continue where
they were; a conversation's counter is dropped after its last event (`cdr.created`), and conversation ids
are never reused, so a conversation's sequence never restarts.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from softswitch.events.types import Event

#: CloudEvents specification version of the envelope (CloudEvents 1.0 §3.1.1 `specversion`).
SPECVERSION = "1.0"
#: Media type of `data` (CloudEvents 1.0 §3.1.2 `datacontenttype`).
DATACONTENTTYPE = "application/json"
#: Scheme of `source`: "softswitch://<node>" names the node that emitted the event.
SOURCE_SCHEME = "softswitch://"
#: Event fields named after Python keywords carry a trailing underscore; the wire name drops it.
_RENAMED_FIELDS = {"from_": "from"}


def event_data(event: Event) -> dict[str, Any]:
    """The event's fields as the JSON object of `data` (`from_` becomes `from`, tuples become arrays)."""
    return {wire: _jsonable(getattr(event, name)) for name, wire in _wire_names(type(event))}


def _wire_names(cls: type[Event]) -> tuple[tuple[str, str], ...]:
    """(attribute, JSON name) of every field of an event class, computed once per class."""
    names = _WIRE_NAMES.get(cls)
    if names is None:
        names = tuple((f.name, _RENAMED_FIELDS.get(f.name, f.name)) for f in dataclasses.fields(cls))
        _WIRE_NAMES[cls] = names
    return names


_WIRE_NAMES: dict[type[Event], tuple[tuple[str, str], ...]] = {}

_SCALARS = (str, int, float, bool, type(None))


def _jsonable(value: Any) -> Any:
    if type(value) in _SCALARS:
        return value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def format_time(timestamp: float) -> str:
    """RFC 3339 UTC time with milliseconds and `Z` (CloudEvents 1.0 §3.1.4 `time`).

    Example: 2026-11-22T10:15:03.482Z.
    """
    millis = round(timestamp * 1000)
    seconds, ms = divmod(millis, 1000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms:03d}Z"


def source_of(node: str) -> str:
    """The envelope's `source` for a node name (CloudEvents 1.0 §3.1.1 `source`: a URI-reference)."""
    return SOURCE_SCHEME + node


def subject_key(event: Event) -> str:
    """The key of the event's `seq` counter: "<kind>:<subject>" (a device and a conversation never mix)."""
    return f"{event.subject_kind}:{event.subject}"


def new_event_id() -> str:
    """A fresh event id: a random UUID (RFC 9562 §5.4, version 4) in 32 hex digits."""
    return uuid.uuid4().hex


def build_envelope(
    event: Event,
    *,
    node: str,
    tenant: str,
    seq: int,
    now: float,
    event_id: str | None = None,
) -> dict[str, Any]:
    """The structured CloudEvent for `event` (CloudEvents 1.0 JSON format §3), emitted at `now`."""
    return {
        "specversion": SPECVERSION,
        "id": event_id if event_id is not None else new_event_id(),
        "source": source_of(node),
        "type": event.type,
        "time": format_time(now),
        "datacontenttype": DATACONTENTTYPE,
        "subject": event.subject,
        "tenant": tenant,
        "seq": seq,
        "data": event_data(event),
    }


class Sequencer:
    """Gap-free `seq` counters per subject key, starting at 1.

    `next(key)` hands out the following number; `restore` loads counters persisted before a restart;
    `drop` forgets a subject that ended (its next number would be 1 again).
    """

    def __init__(self, counters: Iterable[tuple[str, int]] = ()) -> None:
        self._last: dict[str, int] = dict(counters)

    def next(self, key: str) -> int:
        seq = self._last.get(key, 0) + 1
        self._last[key] = seq
        return seq

    def last(self, key: str) -> int:
        """The last number handed out for `key` (0 when none)."""
        return self._last.get(key, 0)

    def restore(self, key: str, last: int) -> None:
        self._last[key] = last

    def drop(self, key: str) -> None:
        self._last.pop(key, None)

    def __len__(self) -> int:
        return len(self._last)
