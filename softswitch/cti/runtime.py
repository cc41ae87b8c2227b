"""The CTI core inside a running node: its adapter to the event bus, the loop's timers and the store.

`CtiRuntime` feeds `CtiCore` what happens around it — device registrations from the bus, commands from
the transports (MQTT now; WebSocket and REST use the same `command()`), timers firing — and carries out
each `Outcome`: events go on the bus (and so to MQTT, with retained agent and queue snapshots), timers
are armed on the event loop, and the core's state is saved to the store shortly after every change, so
a restart restores and reconciles it (`CtiCore.restore`).

Commands run on the loop, one at a time (the core is plain synchronous code), so they are serialised.
`call.*` commands are validated and authorised by the handlers and carried out by the call layer
(`execute`); what it does not carry out yet is answered `not_supported`, never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection
from typing import Any, Final, Protocol

import structlog

from softswitch.cti.commands import Actor, CallRequest, CommandHandlers, failure, success
from softswitch.cti.core import CallAction, CtiCore, Outcome, TimerKey
from softswitch.cti.errors import INTERNAL, NOT_SUPPORTED, CommandError
from softswitch.cti.queues import QueuedCall
from softswitch.events.bus import EventBus
from softswitch.events.types import DeviceRegistered, DeviceUnregistered, Event
from softswitch.store.agents import CtiStateStore

log = structlog.get_logger(__name__)

#: State changes within this window are saved together (one transaction per burst, not per change).
SAVE_DELAY_S: Final = 0.2


class CallLayer(Protocol):
    """What the runtime asks of call control: carry out an offer, a withdrawal, a connection, a re-route."""

    def carry_out(self, action: CallAction) -> None: ...

    async def execute(self, request: CallRequest) -> dict[str, Any]: ...


class CtiRuntime:
    """Runs one `CtiCore` on the node's event loop; it is also call control's `QueueService`."""

    def __init__(
        self,
        core: CtiCore,
        bus: EventBus,
        state_store: CtiStateStore,
        *,
        has_binding: Callable[[str], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.handlers = CommandHandlers(core)
        self.bus = bus
        self.state_store = state_store
        self.has_binding = has_binding
        self.clock = clock
        self._timers: dict[TimerKey, asyncio.TimerHandle] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self._save_handle: asyncio.TimerHandle | None = None
        self._saving: asyncio.Task[None] | None = None
        self.calls: CallLayer | None = None  # set by the composition root once call control exists

    async def start(self, registrations: Collection[str]) -> None:
        """Restore the saved state, reconciled with the users registered now; then follow the bus."""
        snapshot = await asyncio.to_thread(self.state_store.load)
        try:
            outcome = self.core.restore(snapshot, registrations, (), self.clock())
        except ValueError as exc:  # a snapshot of another version: start from configuration
            log.warning("CTI state not restored", error=str(exc))
            outcome = self.core.restore(None, registrations, (), self.clock())
        self._apply(outcome)
        self._unsubscribe = self.bus.subscribe(self._on_event)
        log.info(
            "CTI started",
            agents=len(self.core.agents()),
            queues=len(self.core.queues()),
            restored=snapshot is not None,
        )

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        if self._saving is not None:
            with contextlib.suppress(Exception):
                await self._saving
        await self._save()

    # -- inputs -----------------------------------------------------------------------------------

    async def command(self, name: str, body: dict[str, Any], actor: Actor | None = None) -> dict[str, Any]:
        """One command from a transport; the reply as EVENTS.md shapes it."""
        result = self.handlers.handle(name, body, actor or Actor.service(), self.clock())
        self._apply(result.outcome)
        if result.reply is not None:
            return result.reply.as_dict()
        request = result.request
        assert request is not None
        if self.calls is None:
            refusal = CommandError(NOT_SUPPORTED, f"{name} is not carried out by this node yet")
            return failure(request, refusal).as_dict()
        try:
            data = await self.calls.execute(request)
        except CommandError as exc:
            return failure(request, exc).as_dict()
        except Exception:  # a bug: the client gets a stable code, the log gets the traceback
            log.exception("call command failed", command=name)
            internal = CommandError(INTERNAL, f"{name} failed inside the node; its log says why")
            return failure(request, internal).as_dict()
        return success(request, data).as_dict()

    def _on_event(self, event: Event) -> None:
        now = self.clock()
        if isinstance(event, DeviceRegistered):
            self._apply(self.core.device_registered(event.user, now))
        elif isinstance(event, DeviceUnregistered) and not self.has_binding(event.user):
            # One of several contacts going away leaves the device reachable: only the last one counts.
            self._apply(self.core.device_unregistered(event.user, now))

    # -- inputs from call control (QueueService) ----------------------------------------------------

    def has_queue(self, queue_id: str) -> bool:
        return any(q.id == queue_id for q in self.core.queues())

    def caller_queued(
        self, queue_id: str, conversation_id: str, call_id: str, sip_call_id: str, from_: str, to: str
    ) -> None:
        call = QueuedCall(conversation_id, call_id, sip_call_id, "inbound", from_, to)
        self._report("call_queued", lambda now: self.core.call_queued(queue_id, call, now))

    def caller_gone(self, conversation_id: str) -> None:
        self._report("caller_abandoned", lambda now: self.core.caller_abandoned(conversation_id, now))

    def exit_of(self, queue_id: str) -> tuple[str | None, str | None]:
        config = self.core.queue(queue_id).config
        return config.exit_key, config.exit_to

    def announce_every(self, queue_id: str) -> int:
        return self.core.queue(queue_id).config.announce_position_s

    def position(self, conversation_id: str) -> int | None:
        for queue in self.core.queues():
            if conversation_id in queue:
                return queue.position(conversation_id)
        return None

    def caller_left(self, conversation_id: str) -> None:
        self._report("caller_left", lambda now: self.core.caller_left(conversation_id, now))

    def offer_ringing(self, agent_id: str, conversation_id: str) -> None:
        self._report("offer_ringing", lambda now: self.core.offer_ringing(agent_id, conversation_id, now))

    def offer_answered(self, agent_id: str, conversation_id: str) -> None:
        self._report("offer_answered", lambda now: self.core.offer_answered(agent_id, conversation_id, now))

    def offer_failed(self, agent_id: str, conversation_id: str) -> None:
        self._report("offer_failed", lambda now: self.core.offer_failed(agent_id, conversation_id, now))

    def agent_call_started(self, agent_id: str, conversation_id: str) -> None:
        self._report(
            "agent_call_started", lambda now: self.core.agent_call_started(agent_id, conversation_id, now)
        )

    def agent_call_ended(self, agent_id: str, conversation_id: str, talk_s: float) -> None:
        self._report(
            "agent_call_ended",
            lambda now: self.core.agent_call_ended(agent_id, conversation_id, now, talk_s=talk_s),
        )

    def _report(self, what: str, step: Callable[[float], Outcome]) -> None:
        try:
            outcome = step(self.clock())
        except (KeyError, ValueError) as exc:  # an agent or queue no longer configured, a duplicate
            log.warning("CTI input refused", input=what, error=str(exc))
            return
        self._apply(outcome)

    def _fire(self, key: TimerKey) -> None:
        self._timers.pop(key, None)
        self._apply(self.core.timer_fired(key, self.clock()))

    # -- outcomes ---------------------------------------------------------------------------------

    def _apply(self, outcome: Outcome) -> None:
        loop = asyncio.get_running_loop()
        for key in outcome.cancelled_timers:
            handle = self._timers.pop(key, None)
            if handle is not None:
                handle.cancel()
        now = self.clock()
        for timer in outcome.timers:
            previous = self._timers.pop(timer.key, None)
            if previous is not None:
                previous.cancel()
            self._timers[timer.key] = loop.call_later(max(0.0, timer.at - now), self._fire, timer.key)
        for event in outcome.events:
            self.bus.publish(event)
        for action in outcome.actions:
            if self.calls is None:
                log.error("CTI call action with no call layer to carry it out", action=repr(action))
            else:
                self.calls.carry_out(action)
        if outcome.events or outcome.timers or outcome.cancelled_timers:
            self._schedule_save()

    def _schedule_save(self) -> None:
        if self._save_handle is None:
            self._save_handle = asyncio.get_running_loop().call_later(SAVE_DELAY_S, self._start_save)

    def _start_save(self) -> None:
        self._save_handle = None
        if self._saving is not None and not self._saving.done():
            self._schedule_save()  # one write at a time; this change goes in the next
            return
        self._saving = asyncio.get_running_loop().create_task(self._save())

    async def _save(self) -> None:
        snapshot = self.core.snapshot()
        try:
            await asyncio.to_thread(self.state_store.save, snapshot, self.clock())
        except Exception:
            log.exception("CTI state not saved; retrying with the next change")
