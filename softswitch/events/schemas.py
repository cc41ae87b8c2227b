"""JSON Schemas (draft 2020-12) of every published event, generated from the event classes.

One schema per event type: the CloudEvents envelope (`softswitch.events.envelope`) with `type` fixed and
`data` described field by field from the dataclass (JSON Schema 2020-12 Validation §6.1 `type`/`enum`/
`const`, §6.5 `required`; Core §10.3.2 `properties`/`additionalProperties`). Documented value sets
(`Event.value_sets`) become `enum`s. The retained device registration snapshot has a schema too.

`python -m softswitch.events.schemas --write docs/events` regenerates the shipped files;
`--check docs/events` fails when they are out of date.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from softswitch.events import types as event_types
from softswitch.events.envelope import _RENAMED_FIELDS, DATACONTENTTYPE, SPECVERSION
from softswitch.events.types import Event

#: The JSON Schema dialect of every generated schema.
DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: Base of the schemas' `$id`s (an identifier, never fetched).
ID_BASE = "https://softswitch.invalid/schemas/events/"
#: Type name of the retained registration snapshot on `{p}/{tenant}/devices/{user}/registration`.
REGISTRATION_SNAPSHOT = "device.registration"
#: `time`: RFC 3339 UTC with milliseconds and Z (envelope.format_time).
TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"


def event_classes() -> list[type[Event]]:
    """Every concrete event class (one with a `type`), sorted by type."""
    found: dict[str, type[Event]] = {}
    pending: list[type[Event]] = [Event]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        # `dataclass(slots=True)` replaces the class it decorates; the replaced one may linger among
        # the subclasses until collected: keep only the class its module names.
        if vars(sys.modules[cls.__module__]).get(cls.__name__) is not cls:
            continue
        if cls.type:
            if cls.type in found and found[cls.type] is not cls:
                raise ValueError(f"two event classes share the type {cls.type!r}")
            found[cls.type] = cls
    return [found[t] for t in sorted(found)]


def _annotation_schema(annotation: Any) -> dict[str, Any]:
    """The schema of one field type: str, int, float, bool, X | None, tuple[X, ...], dict[str, X]."""
    if annotation is type(None):
        return {"type": "null"}
    if annotation is str:
        return {"type": "string"}
    if annotation is bool:
        return {"type": "boolean"}
    if annotation is int:
        return {"type": "integer"}
    if annotation is float:
        return {"type": "number"}
    if annotation is object or annotation is Any:
        return {}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        members = [_annotation_schema(a) for a in args]
        simple = [m.get("type") for m in members]
        if all(isinstance(t, str) for t in simple) and all(len(m) == 1 for m in members):
            return {"type": simple}
        return {"anyOf": members}
    if origin in (tuple, list):
        item = args[0] if args else Any
        return {"type": "array", "items": _annotation_schema(item)}
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        value = args[1] if len(args) == 2 else Any
        return {"type": "object", "additionalProperties": _annotation_schema(value) or True}
    raise TypeError(f"no JSON Schema for field type {annotation!r}")


def data_schema(cls: type[Event]) -> dict[str, Any]:
    """The schema of `data` for an event class: every field required, nothing else allowed."""
    hints = typing.get_type_hints(cls, vars(event_types))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in dataclasses.fields(cls):
        name = _RENAMED_FIELDS.get(field.name, field.name)
        schema = _annotation_schema(hints[field.name])
        allowed = cls.value_sets.get(field.name)
        if allowed is not None:
            nullable = "null" in schema.get("type", ())
            schema = {"enum": [*allowed, None] if nullable else list(allowed)}
        properties[name] = schema
        required.append(name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _envelope(type_name: str, title: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": DIALECT,
        "$id": f"{ID_BASE}{type_name}.json",
        "title": title,
        "type": "object",
        "properties": {
            "specversion": {"const": SPECVERSION},
            "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "source": {"type": "string", "pattern": "^softswitch://.+"},
            "type": {"const": type_name},
            "time": {"type": "string", "pattern": TIME_PATTERN},
            "datacontenttype": {"const": DATACONTENTTYPE},
            "subject": {"type": "string", "minLength": 1},
            "tenant": {"type": "string", "minLength": 1},
            "seq": {"type": "integer", "minimum": 1},
            "data": data,
        },
        "required": [
            "specversion",
            "id",
            "source",
            "type",
            "time",
            "datacontenttype",
            "subject",
            "tenant",
            "seq",
            "data",
        ],
        "additionalProperties": False,
    }


def event_schema(cls: type[Event]) -> dict[str, Any]:
    """The full schema (envelope and `data`) of one event type."""
    title = (cls.__doc__ or cls.type).strip().splitlines()[0]
    return _envelope(cls.type, f"{cls.type}: {title}", data_schema(cls))


def registration_snapshot_schema() -> dict[str, Any]:
    """The retained snapshot of a user's bindings (`…/devices/{user}/registration`); cleared when empty."""
    contact = {
        "type": "object",
        "properties": {
            "contact": {"type": "string"},
            "transport": {"type": "string"},
            "expires": {"type": "integer", "minimum": 0},
            "registered_at": {"type": "string", "pattern": TIME_PATTERN},
            "user_agent": {"type": "string"},
            "source": {"type": "string"},
        },
        "required": ["contact", "transport", "expires", "registered_at", "user_agent", "source"],
        "additionalProperties": False,
    }
    return {
        "$schema": DIALECT,
        "$id": f"{ID_BASE}{REGISTRATION_SNAPSHOT}.json",
        "title": f"{REGISTRATION_SNAPSHOT}: the current contact bindings of a user (retained)",
        "type": "object",
        "properties": {
            "type": {"const": REGISTRATION_SNAPSHOT},
            "source": {"type": "string", "pattern": "^softswitch://.+"},
            "tenant": {"type": "string", "minLength": 1},
            "user": {"type": "string", "minLength": 1},
            "time": {"type": "string", "pattern": TIME_PATTERN},
            "seq": {"type": "integer", "minimum": 1},
            "contacts": {"type": "array", "items": contact, "minItems": 1},
        },
        "required": ["type", "source", "tenant", "user", "time", "seq", "contacts"],
        "additionalProperties": False,
    }


def all_schemas() -> Iterator[tuple[str, dict[str, Any]]]:
    """(type name, schema) of every event type and snapshot."""
    for cls in event_classes():
        yield cls.type, event_schema(cls)
    yield REGISTRATION_SNAPSHOT, registration_snapshot_schema()


def render(schema: dict[str, Any]) -> str:
    """The file text of a schema (stable: sorted keys are not used, field order is the class's)."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write `<type>.json` for every schema into `directory`; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in all_schemas():
        path = directory / f"{name}.json"
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


def stale_schemas(directory: Path) -> list[str]:
    """Names of schema files in `directory` that are missing or differ from the generated ones."""
    stale = []
    for name, schema in all_schemas():
        path = directory / f"{name}.json"
        if not path.exists() or path.read_text(encoding="utf-8") != render(schema):
            stale.append(path.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m softswitch.events.schemas", description="Generate the event JSON Schemas."
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, metavar="DIR", help="write the schemas into DIR")
    group.add_argument("--check", type=Path, metavar="DIR", help="fail if DIR's schemas are stale")
    args = parser.parse_args(argv)
    if args.write is not None:
        for path in write_schemas(args.write):
            print(path)
        return 0
    stale = stale_schemas(args.check)
    for name in stale:
        print(f"{args.check / name}: out of date (run --write)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
