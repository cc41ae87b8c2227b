"""Structured logging: structlog for our code, the standard library's loggers routed through it.

Every line carries an ISO-8601 UTC timestamp, the level, the logger name and whatever context is bound
with `structlog.contextvars` (a call's `conversation_id`, `call_id`, `sip_call_id`: STYLE.md 11). Lines
are JSON (one object per line) unless stderr is a terminal or `log.format = "console"`.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor

LogFormat = Literal["auto", "json", "console"]

#: Third-party loggers that narrate every packet or state change at INFO; they speak at WARNING unless
#: the node runs at DEBUG (amqtt logs each MQTT packet and connection, transitions each state change,
#: uvicorn each start-up step; uvicorn's real errors are logged at ERROR and still pass).
NOISY_LOGGERS = ("amqtt", "transitions", "uvicorn.access", "uvicorn.error")
#: Loggers kept at WARNING even at DEBUG: their debug output is per byte or per timer tick.
ALWAYS_QUIET_LOGGERS = ("asyncio", "amqtt.mqtt.protocol.handler", "amqtt.adapters", "amqtt.codecs_amqtt")


#: `extra=` fields of standard-library records that only repeat the message for a colour terminal.
DROPPED_EXTRA_FIELDS = ("color_message",)


def _drop_extra_fields(_logger: object, _method: str, event: EventDict) -> EventDict:
    for name in DROPPED_EXTRA_FIELDS:
        event.pop(name, None)
    return event


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_extra_fields,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def wants_console(fmt: LogFormat, stream: TextIO) -> bool:
    """Whether to render for a human: asked for, or `auto` on a terminal."""
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return fmt == "console"


def configure_logging(level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and the standard library to one handler on `stream` (default stderr) at `level`."""
    out = stream if stream is not None else sys.stderr
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared = _shared_processors()
    renderer: Processor
    if wants_console(fmt, out):
        renderer = structlog.dev.ConsoleRenderer(colors=bool(getattr(out, "isatty", lambda: False)()))
        final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]
    else:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.dict_tracebacks,
            renderer,
        ]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    quiet_level = max(numeric_level, logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(numeric_level if numeric_level <= logging.DEBUG else quiet_level)
    for name in ALWAYS_QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet_level)
    # uvicorn installs its own handlers unless told otherwise; ours is the only one.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
