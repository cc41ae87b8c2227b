"""The in-process event bus: one notifier, many sinks (STYLE.md 10).

Publishing never blocks and never raises into the publisher: a sink that fails is logged and the
others still receive the event.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from softswitch.events.types import Event

log = structlog.get_logger(__name__)

Sink = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out of events to subscribed sinks, in subscription order."""

    def __init__(self) -> None:
        self._sinks: list[Sink] = []

    def subscribe(self, sink: Sink) -> Callable[[], None]:
        """Add a sink; returns a function that removes it again."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink)

    def publish(self, event: Event) -> None:
        for sink in list(self._sinks):
            try:
                sink(event)
            except Exception:
                log.exception("event sink failed", event_type=event.type, sink=repr(sink))
