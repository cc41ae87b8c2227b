"""Call control: every call is two legs on one media worker, routed by the dialplan (B2BUA).

Owns conversations and legs. It reacts to the media workers' leg events, asks the dialplan what a dialed
number means, and tells the workers what to do (answer, originate, bridge, tone, hang up). Every state
change becomes an event on the bus (EVENTS.md); nothing here talks to MQTT or the store directly.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from softswitch.calls.apps import LegChannel, LegGone, ivr, playback
from softswitch.calls.models import (
    CallRecording,
    Consult,
    Conversation,
    ConversationState,
    Leg,
    LegState,
    PhoneTransfer,
    Room,
    RoomLink,
    Supervision,
    new_conversation_id,
)
from softswitch.cti.commands import (
    CallControlRequest,
    CallRequest,
    MonitorRequest,
    OriginateRequest,
    RecordRequest,
    SendDtmfRequest,
    TransferRequest,
)
from softswitch.cti.core import CallAction, CancelOffer, ConnectCaller, OfferCall, RouteCaller
from softswitch.cti.errors import (
    DEVICE_UNAVAILABLE,
    INTERNAL,
    INVALID_STATE,
    NO_ACTIVE_CALL,
    NOT_SUPPORTED,
    UNKNOWN_QUEUE,
)
from softswitch.cti.errors import CommandError as CtiError
from softswitch.dialplan import actions
from softswitch.events.bus import EventBus
from softswitch.events.types import (
    CallAnswered,
    CallBridged,
    CallDtmf,
    CallEnded,
    CallEvent,
    CallHeld,
    CallInitiated,
    CallMuted,
    CallRetrieved,
    CallRinging,
    CallUnmuted,
    ConversationEnded,
    ParticipantJoined,
    ParticipantLeft,
    RecordingAvailable,
    RecordingStarted,
    RecordingStopped,
    SupervisionEnded,
    SupervisionModeChanged,
    SupervisionStarted,
    TransferAnswered,
    TransferCancelled,
    TransferCompleted,
    TransferFailed,
    TransferInitiated,
)
from softswitch.media.protocol import (
    Answer,
    Bridge,
    Command,
    CommandError,
    Echo,
    Event,
    Hangup,
    LegDtmf,
    LegIncoming,
    LegMedia,
    LegReplaced,
    LegTransfer,
    Listen,
    Originate,
    Play,
    PlayerDone,
    Record,
    Reject,
    SendDtmf,
    StopPlay,
    StopRecord,
    StopTone,
    Tone,
    Unbridge,
    Unlisten,
)
from softswitch.media.protocol import LegState as LegStateEvent
from softswitch.prompts import PromptError, PromptSet
from softswitch.sip.errors import SipError
from softswitch.sip.uri import parse_uri

log = structlog.get_logger(__name__)

#: The user part of a worker-to-worker link's request URI (followed by its one-time token).
LINK_PREFIX = "link-"
#: Seconds the transferor's phone is given to end its call itself after the transfer it asked for worked.
REFER_RELEASE_S = 5.0
#: A link is a call on loopback between two of the node's own workers: answered at once or not at all.
LINK_TIMEOUT_S = 5.0
#: Seconds a command to a worker may take before the call is failed.
COMMAND_TIMEOUT_S = 5.0
#: What a worker reports for an originated leg it cancelled at its ring timeout (RFC 3261 §21.4.9).
RING_TIMEOUT_CODE = 408
#: Ring timeout of a leg offering a queue caller to an agent: the queue's own offer timer (ring_timeout_s)
#: withdraws the offer first; this only bounds a leg nobody withdraws.
OFFER_LEG_TIMEOUT_S = 600.0
#: Seconds the agent's own phone rings for call.originate before the attempt is given up.
ORIGINATE_AGENT_TIMEOUT_S = 30.0
#: A caller routed on by a queue (overflow, no agents) more often than this is hung up: a dialplan whose
#: overflow destinations lead back into full queues must not loop.
MAX_QUEUE_REROUTES = 5


class MediaPlane(Protocol):
    """What call control needs of the pool of media workers."""

    async def command(self, worker_id: str, cmd: Command, timeout_s: float = ...) -> dict[str, Any]: ...

    def subscribe(self, callback: Callable[[str, Event], None]) -> None: ...

    def choose(self) -> Any:
        """The worker (with its `id`) a new conversation goes to, or None when every worker is full."""

    def address(self, worker_id: str) -> tuple[str, int] | None:
        """The SIP host and port of a ready worker."""


class QueueService(Protocol):
    """What call control reports to the contact-centre layer (the CTI runtime) about queue calls."""

    def has_queue(self, queue_id: str) -> bool: ...

    def caller_queued(
        self, queue_id: str, conversation_id: str, call_id: str, sip_call_id: str, from_: str, to: str
    ) -> None: ...

    def caller_gone(self, conversation_id: str) -> None: ...

    def exit_of(self, queue_id: str) -> tuple[str | None, str | None]:
        """The queue's (exit key, where a caller who presses it goes)."""

    def caller_left(self, conversation_id: str) -> None: ...

    def announce_every(self, queue_id: str) -> int:
        """Seconds between position announcements to a waiting caller (0: none)."""

    def position(self, conversation_id: str) -> int | None:
        """The waiting caller's place in its queue (1: served next), None once it left the queue."""

    def offer_ringing(self, agent_id: str, conversation_id: str) -> None: ...

    def offer_answered(self, agent_id: str, conversation_id: str) -> None: ...

    def offer_failed(self, agent_id: str, conversation_id: str) -> None: ...

    def agent_call_started(self, agent_id: str, conversation_id: str) -> None: ...

    def agent_call_ended(self, agent_id: str, conversation_id: str, talk_s: float) -> None: ...


class Router(Protocol):
    @property
    def menus(self) -> Mapping[str, actions.IvrMenu]: ...

    def route(self, number: str, *, caller: str = "") -> actions.Action | None: ...


def final_status(code: int, reason: str, answered: bool) -> str:
    """EVENTS.md `final_status` of a leg from how it ended."""
    if answered:
        return "completed"
    if code in (486, 600):
        return "busy"
    if code == 487:
        return "canceled"
    if code in (408, 480) or "timeout" in reason.lower():
        return "no_answer"
    if 400 <= code < 500 or code in (603, 604, 606, 607):
        return "rejected"
    return "failed"


def caller_response(status: str, code: int) -> int:
    """What the caller hears when the callee's leg failed before answer."""
    return {
        "busy": 486,
        "no_answer": 480,
        "canceled": 487,
    }.get(status, code if 400 <= code < 700 and code != 503 else 500)


class CallControl:
    """The single owner of call state."""

    def __init__(
        self,
        media: MediaPlane,
        router: Router,
        bus: EventBus,
        *,
        users: Mapping[str, str],  # user name -> display name
        has_binding: Callable[[str], bool],
        domain: str,
        prompts: PromptSet | None = None,
        recordings_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.media = media
        self.router = router
        self.bus = bus
        self.users = users
        self.has_binding = has_binding
        self.domain = domain
        self.prompts = prompts or PromptSet()
        self.recordings_dir = recordings_dir  # call.record writes {recordings_dir}/{conversation}/{id}.wav
        self.clock = clock
        self.conversations: dict[str, Conversation] = {}
        self.legs: dict[str, Leg] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._channels: dict[str, LegChannel] = {}  # legs a dialplan application runs on
        self.rooms: dict[str, Room] = {}  # conference rooms by number
        self._refers: dict[str, PhoneTransfer] = {}  # transfers phones asked for, by the target's leg
        self._replacing: dict[str, str] = {}  # a leg that came with Replaces -> the leg it replaces
        self._links: dict[str, RoomLink] = {}  # room links placed and not yet arrived, by token
        self.queues: QueueService | None = None  # the CTI layer, when the node runs one
        self._reroutes: dict[str, int] = {}  # conversation id -> times a queue routed its caller on
        self._leg_ids = itertools.count(1)
        self._node = secrets.token_hex(3)

    def start(self) -> None:
        self.media.subscribe(self.on_media_event)

    async def stop(self) -> None:
        # Every live leg at once: one by one, a node stopping under load (hundreds of calls) would take
        # seconds per hundred and outlast its supervisor's patience.
        hangups = [
            self._send(leg.worker_id, Hangup(leg=leg.id, code=503))
            for conv in list(self.conversations.values())
            for leg in conv.live_legs()
        ]
        await asyncio.gather(*hangups)
        for task in list(self._tasks):
            task.cancel()

    # -- media events ---------------------------------------------------------------------------

    def on_media_event(self, worker_id: str, event: Event) -> None:
        if isinstance(event, LegIncoming):
            self._spawn(self._incoming(worker_id, event))
        elif isinstance(event, LegStateEvent):
            leg = self.legs.get(event.leg)
            if leg is None:
                return
            self._to_channel(event.leg, event)
            self._spawn(self._leg_state(leg, event))
        elif isinstance(event, LegDtmf):
            leg = self.legs.get(event.leg)
            if leg is None:
                return
            self._publish(
                CallDtmf, leg, digit=event.digit, duration_ms=event.duration_ms, method=event.method
            )
            self._to_channel(event.leg, event)
            conv = self.conversations.get(leg.conversation_id)
            if conv is not None and conv.queue_id is not None and leg.id == conv.a_leg:
                self._spawn(self._queue_key(conv, leg, event.digit))
            elif leg.id not in self._channels:
                self._relay_dtmf(leg, event.digit)
        elif isinstance(event, PlayerDone):
            self._to_channel(event.leg, event)
        elif isinstance(event, LegTransfer):
            self._spawn(self._phone_transfer(worker_id, event))
        elif isinstance(event, LegReplaced):
            self._leg_replaced(worker_id, event)
        elif isinstance(event, LegMedia):
            leg = self.legs.get(event.leg)
            if leg is not None and event.held != leg.remote_held and (event.held or event.active):
                self._spawn(self._remote_hold(leg, hold=event.held))

    def _relay_dtmf(self, leg: Leg, digit: str) -> None:
        """A key pressed on one side of a bridge reaches the other as RFC 4733 telephone-events, whatever
        way it came in (RFC 4733 or SIP INFO); each worker leg uses the payload type it negotiated."""
        far = self.legs.get(leg.peer) if leg.peer else None
        if far is None or far.ended or far.held or far.answered_at is None or far.id in self._channels:
            return
        self._spawn(self._send(far.worker_id, SendDtmf(leg=far.id, digits=digit)))

    async def _remote_hold(self, leg: Leg, *, hold: bool) -> None:
        """The phone of `leg` put the call on hold (re-INVITE with sendonly/inactive) or resumed it: the
        other party hears music on hold meanwhile (call.held / call.retrieved, by "remote")."""
        conv = self.conversations.get(leg.conversation_id)
        if conv is None:
            return
        async with self._lock(conv.id):
            if leg.ended or leg.remote_held == hold:
                return
            leg.remote_held = hold
            far = self.legs.get(leg.peer) if leg.peer else None
            if far is None or far.ended:
                return
            if hold and not far.held:
                await self._send(leg.worker_id, Unbridge(a=leg.id, b=far.id))
                music = str(self.prompts.path("music_on_hold"))
                await self._send(far.worker_id, Play(leg=far.id, files=[music], loop=True))
                far.held = True
                self._publish(CallHeld, leg, by="remote")
            elif not hold and far.held:
                await self._send(far.worker_id, StopPlay(leg=far.id))
                await self._send(leg.worker_id, Bridge(a=leg.id, b=far.id))
                far.held = False
                self._publish(CallRetrieved, leg, by="remote")
            log.info("held by the phone" if hold else "resumed by the phone", call_id=leg.id)

    def _to_channel(self, leg_id: str, event: Event) -> None:
        channel = self._channels.get(leg_id)
        if channel is not None:
            channel.inbox.put_nowait(event)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("call control task failed", exc_info=task.exception())

    def _lock(self, conversation_id: str) -> asyncio.Lock:
        lock = self._locks.get(conversation_id)
        if lock is None:
            lock = self._locks[conversation_id] = asyncio.Lock()
        return lock

    async def _send(self, worker_id: str, cmd: Command) -> bool:
        return await self._command(worker_id, cmd) is not None

    async def _command(self, worker_id: str, cmd: Command) -> dict[str, Any] | None:
        """The command's result, or None when it failed (logged)."""
        try:
            result = await self.media.command(worker_id, cmd, COMMAND_TIMEOUT_S)
            self._track_media(cmd)
            return result
        except CommandError as e:
            log.info("media command failed", command=cmd.type, code=e.code, error=e.message)
        except (TimeoutError, ConnectionError, KeyError) as e:
            log.warning("media command not delivered", command=cmd.type, error=repr(e))
        return None

    def _track_media(self, cmd: Command) -> None:
        """Keep the conversation's record of who hears whom in step with what the worker did."""
        if isinstance(cmd, Bridge | Unbridge):
            if cmd.a == cmd.b:
                return
            pairs, add = [(cmd.a, cmd.b), (cmd.b, cmd.a)], isinstance(cmd, Bridge)
        elif isinstance(cmd, Listen | Unlisten):
            pairs, add = [(cmd.leg, cmd.source)], isinstance(cmd, Listen)
        else:
            return
        leg = self.legs.get(pairs[0][0])
        conv = self.conversations.get(leg.conversation_id) if leg is not None else None
        if conv is None:
            return
        for pair in pairs:
            if add:
                conv.edges.add(pair)
            else:
                conv.edges.discard(pair)

    # -- events ---------------------------------------------------------------------------------

    def _fields(self, leg: Leg) -> dict[str, Any]:
        return {
            "conversation_id": leg.conversation_id,
            "call_id": leg.id,
            "sip_call_id": leg.sip_call_id,
            "direction": leg.direction,
            "from_": leg.from_,
            "to": leg.to,
            "role": leg.role,
            "user_data": None,
        }

    def _publish(self, cls: type[CallEvent], leg: Leg, **extra: Any) -> None:
        if leg.role == "link":
            return  # the node's own worker-to-worker legs are no party of the call
        self.bus.publish(cls(**self._fields(leg), **extra))

    # -- a new call -----------------------------------------------------------------------------

    async def _incoming(self, worker_id: str, ev: LegIncoming) -> None:
        now = self.clock()
        try:
            number = parse_uri(ev.request_uri).user or ""
        except SipError:
            number = ""
        if number.startswith(LINK_PREFIX):
            await self._link_arrived(worker_id, ev, number.removeprefix(LINK_PREFIX))
            return
        caller = ev.identity or _user_of(ev.from_uri)
        conv = Conversation(new_conversation_id(), worker_id, now, caller=caller, callee=number)
        a = Leg(
            ev.leg, worker_id, conv.id, "inbound", "caller", caller, number, ev.sip_call_id,
            user=ev.identity or None, created_at=now,
        )  # fmt: skip
        conv.legs[a.id] = a
        conv.a_leg = a.id
        self.conversations[conv.id] = conv
        self.legs[a.id] = a
        with structlog.contextvars.bound_contextvars(
            conversation_id=conv.id, call_id=a.id, sip_call_id=ev.sip_call_id
        ):
            log.info("call initiated", caller=caller, number=number, worker=worker_id)
            self._publish(CallInitiated, a, user=a.user)
            async with self._lock(conv.id):
                await self._route(conv, a, number)

    async def _route(self, conv: Conversation, a: Leg, number: str) -> None:
        action = self.router.route(number, caller=a.from_) if number else None
        await self._act(conv, a, action)

    async def _act(self, conv: Conversation, a: Leg, action: actions.Action | None) -> None:
        """Carry out a dialplan action for the leg `a` (a route's, or an IVR option's)."""
        if action is None:
            await self._reject(a, 404, "Not Found")
        elif isinstance(action, actions.Hangup):
            await self._reject(a, action.code, action.reason or "")
        elif isinstance(action, actions.Dial):
            await self._dial(conv, a, action)
        elif isinstance(action, actions.Echo):
            if a.answered_at is not None or await self._send(a.worker_id, Answer(leg=a.id, code=200)):
                await self._send(a.worker_id, Echo(leg=a.id))
        elif isinstance(action, actions.Queue):
            await self._enqueue(conv, a, action.queue)
        elif isinstance(action, actions.Conference):
            await self._join_room(conv, a, action)
        elif isinstance(action, actions.Playback):
            try:
                self.prompts.path(action.prompt)
            except PromptError as exc:
                log.error("dialplan names a prompt that is missing", prompt=action.prompt, error=str(exc))
                await self._reject(a, 500, "Prompt Not Available")
                return
            # Outside the conversation lock: the application waits for the caller, and the leg's state
            # changes (a hang-up above all) must be processed meanwhile.
            self._spawn(self._run_playback(conv, a, action))
        elif isinstance(action, actions.Ivr):
            menu = self.router.menus.get(action.menu)
            if menu is None:
                log.error("dialplan names an IVR menu it does not define", menu=action.menu)
                await self._reject(a, 500, "Menu Not Available")
                return
            self._spawn(self._run_ivr(conv, a, menu))
        else:
            log.info("dialplan action not available", action=type(action).__name__)
            await self._reject(a, 501, "Not Implemented")

    # -- ACD queues (the CTI layer decides who is offered the caller; this carries it out) ----------

    async def _enqueue(self, conv: Conversation, a: Leg, queue_id: str) -> None:
        if self.queues is None or not self.queues.has_queue(queue_id):
            log.warning("dialplan names a queue that is not configured", queue=queue_id)
            await self._reject(a, 404, "Not Found")
            return
        if a.answered_at is None and not await self._send(a.worker_id, Answer(leg=a.id, code=200)):
            return
        await self._send(
            a.worker_id, Play(leg=a.id, files=[str(self.prompts.path("music_on_hold"))], loop=True)
        )
        conv.queue_id = queue_id
        log.info("caller queued", queue=queue_id)
        self.queues.caller_queued(queue_id, conv.id, a.id, a.sip_call_id, a.from_, conv.callee)
        every = self.queues.announce_every(queue_id)
        if every > 0:
            self._spawn(self._announce_positions(conv.id, a.id, queue_id, every))

    async def _announce_positions(self, conversation_id: str, leg_id: str, queue_id: str, every: int) -> None:
        """Every `every` seconds while the caller waits in `queue_id`: "you are caller number N", then
        the music on hold again. Stops once the caller is connected, routed on, or gone."""
        while True:
            await asyncio.sleep(every)
            conv, leg = self.conversations.get(conversation_id), self.legs.get(leg_id)
            if conv is None or leg is None or self.queues is None:
                return
            async with self._lock(conv.id):
                position = self.queues.position(conv.id)
                if conv.queue_id != queue_id or leg.ended or position is None:
                    return
                try:
                    paths = [self.prompts.path("queue_position"), *self.prompts.digits(str(position))]
                    files = [str(path) for path in paths]
                except PromptError as exc:
                    log.error("position prompt missing", error=str(exc))
                    return
                result = await self._command(leg.worker_id, Play(leg=leg.id, files=files))
            await asyncio.sleep(float(result.get("duration_s", 0.0)) if result else 0.0)
            async with self._lock(conv.id):
                if conv.queue_id != queue_id or leg.ended:
                    return
                music = str(self.prompts.path("music_on_hold"))
                await self._send(leg.worker_id, Play(leg=leg.id, files=[music], loop=True))
            log.info("queue position announced", queue=queue_id, position=position)

    async def _queue_key(self, conv: Conversation, caller: Leg, digit: str) -> None:
        """A key from a waiting caller: the queue's exit key takes the caller out to `exit_to`."""
        if self.queues is None:
            return
        async with self._lock(conv.id):
            queue_id = conv.queue_id
            if queue_id is None or caller.ended:
                return
            exit_key, exit_to = self.queues.exit_of(queue_id)
            if digit != exit_key:
                return
            conv.queue_id = None
            self.queues.caller_left(conv.id)  # the CTI layer withdraws its offers: call.dequeued "left"
            await self._send(caller.worker_id, StopPlay(leg=caller.id))
            log.info("caller left the queue by key", queue=queue_id, to=exit_to)
            if exit_to is not None:
                await self._route(conv, caller, exit_to)
                return
            caller.final_status, caller.released_by, caller.sip_code = "completed", "local", 200
            await self._send(caller.worker_id, Hangup(leg=caller.id))

    def carry_out(self, action: CallAction) -> None:
        """A call action of the CTI layer (offer, withdraw, connect, route on), run in its own task."""
        self._spawn(self._carry_out(action))

    async def _carry_out(self, action: CallAction) -> None:
        conv = self.conversations.get(action.conversation_id)
        if conv is None:
            if isinstance(action, OfferCall) and self.queues is not None:
                self.queues.offer_failed(action.agent_id, action.conversation_id)
            return
        with structlog.contextvars.bound_contextvars(conversation_id=conv.id):
            async with self._lock(conv.id):
                if isinstance(action, OfferCall):
                    await self._offer(conv, action)
                elif isinstance(action, CancelOffer):
                    leg = self._agent_leg(conv, action.agent_id)
                    if leg is not None and not leg.final_status:
                        leg.final_status, leg.released_by = "canceled", "local"
                        await self._send(leg.worker_id, Hangup(leg=leg.id))
                elif isinstance(action, ConnectCaller):
                    await self._connect(conv, action.agent_id)
                else:
                    await self._route_caller(conv, action)

    async def _offer(self, conv: Conversation, action: OfferCall) -> None:
        assert self.queues is not None
        caller = self._caller(conv)
        address = action.device.address
        reachable = action.device.kind == "sip" and address in self.users and self.has_binding(address)
        if caller is None or caller.ended or conv.queue_id is None or not reachable:
            log.info("queue offer not placed", agent_id=action.agent_id, device=address, reachable=reachable)
            self.queues.offer_failed(action.agent_id, conv.id)
            return
        leg = Leg(
            self._new_leg_id(), caller.worker_id, conv.id, "outbound", "agent", caller.from_, address,
            user=address, created_at=self.clock(), agent_id=action.agent_id,
        )  # fmt: skip
        conv.legs[leg.id] = leg
        self.legs[leg.id] = leg
        self._publish(CallInitiated, leg, user=address)
        # RFC 5373-style auto-answer hint, honoured by phones that support it (the seed's auto answer).
        headers = {"Call-Info": f"<sip:{self.domain}>;answer-after=0"} if action.auto_answer else {}
        sent = await self._send(
            caller.worker_id,
            Originate(
                leg=leg.id,
                uri=f"sip:{address}@{self.domain}",
                from_uri=f"sip:{caller.from_}@{self.domain}",
                display_name=self.users.get(caller.from_, ""),
                timeout_s=OFFER_LEG_TIMEOUT_S,
                headers=headers,
            ),
        )
        if not sent and not leg.ended:
            self._unplaced(leg)
            self.queues.offer_failed(action.agent_id, conv.id)

    async def _connect(self, conv: Conversation, agent_id: str) -> None:
        caller = self._caller(conv)
        leg = self._agent_leg(conv, agent_id)
        if leg is None or leg.ended:
            return
        if caller is None or caller.ended:
            leg.final_status, leg.released_by = "completed", "local"
            await self._send(leg.worker_id, Hangup(leg=leg.id))
            return
        conv.queue_id = None
        await self._send(caller.worker_id, StopPlay(leg=caller.id))
        if await self._send(caller.worker_id, Bridge(a=caller.id, b=leg.id)):
            self._bridged(caller, leg)
            log.info("queue caller connected", agent_id=agent_id)

    async def _route_caller(self, conv: Conversation, action: RouteCaller) -> None:
        caller = self._caller(conv)
        if caller is None or caller.ended:
            return
        conv.queue_id = None
        await self._send(caller.worker_id, StopPlay(leg=caller.id))
        reroutes = self._reroutes[conv.id] = self._reroutes.get(conv.id, 0) + 1
        log.info("queue routes the caller on", queue=action.queue_id, to=action.to, reason=action.reason)
        if action.to is not None and reroutes <= MAX_QUEUE_REROUTES:
            await self._route(conv, caller, action.to)
            return
        caller.final_status = "busy" if action.reason == "full" else "no_answer"
        caller.released_by = "system"
        await self._send(caller.worker_id, Hangup(leg=caller.id))

    # -- commands on live calls (CTI call.* commands, carried out here) ----------------------------

    async def execute(self, request: CallRequest) -> dict[str, Any]:
        """Carry out a validated `call.*` command on a live call; raises the CTI CommandError (a stable
        code and a message) when it cannot."""
        if isinstance(request, OriginateRequest):
            return await self._originate(request)
        leg = self._request_leg(request)
        conv = self.conversations[leg.conversation_id]
        async with self._lock(conv.id):
            if leg.ended:
                raise CtiError(NO_ACTIVE_CALL, "the call ended")
            far = self.legs.get(leg.peer) if leg.peer else None
            if isinstance(request, SendDtmfRequest):
                target = far or leg
                if not await self._send(target.worker_id, SendDtmf(leg=target.id, digits=request.digits)):
                    raise CtiError(INVALID_STATE, "the far end has no audio to carry the digits")
                return {"call_id": target.id, "digits": request.digits}
            if isinstance(request, TransferRequest) and request.command == "call.transfer":
                return await self._blind_transfer(conv, leg, far, request)
            if isinstance(request, TransferRequest) and request.command == "call.consult":
                return await self._consult(conv, leg, far, request)
            if isinstance(request, MonitorRequest):
                return await self._monitor(conv, leg, request)
            if isinstance(request, RecordRequest):
                return await self._record(conv, request.action)
            if not isinstance(request, CallControlRequest):
                raise CtiError(NOT_SUPPORTED, f"{request.command} is not carried out by this node yet")
            if request.command in ("call.mute", "call.unmute"):
                return await self._mute(conv, leg, mute=request.command == "call.mute")
            if request.command == "call.consult_cancel":
                return await self._consult_cancel(conv, leg)
            if request.command == "call.transfer_complete":
                return await self._transfer_complete(conv, leg)
            if request.command == "call.conference":
                return await self._conference(conv, leg)
            if request.command == "call.conference_leave":
                return await self._conference_leave(conv, leg)
            if request.command == "call.hangup":
                leg.final_status, leg.released_by = "completed" if leg.answered_at else "canceled", "local"
                await self._send(leg.worker_id, Hangup(leg=leg.id))
                return {"call_id": leg.id}
            if request.command in ("call.hold", "call.retrieve"):
                if far is None or far.ended:
                    raise CtiError(NO_ACTIVE_CALL, "the call has no other party to hold")
                return await self._hold(leg, far, hold=request.command == "call.hold")
            raise CtiError(NOT_SUPPORTED, f"{request.command} is not carried out by this node yet")

    async def _originate(self, request: OriginateRequest) -> dict[str, Any]:
        """call.originate (the seed's 外呼): ring the agent's device first; when the agent answers, dial
        the customer through the dialplan and bridge. Replies once the agent's leg is started; the call's
        progress shows in its events."""
        device, agent_id = request.device, request.agent_id
        if device is None or agent_id is None:
            raise CtiError(DEVICE_UNAVAILABLE, "the agent has no device")
        if device.kind != "sip" or device.address not in self.users or not self.has_binding(device.address):
            raise CtiError(DEVICE_UNAVAILABLE, f"device {device.address} is not registered")
        if self.router.route(request.to, caller=device.address) is None:
            raise CtiError(INVALID_STATE, f"the dialplan has no route for {request.to!r}")
        worker = self.media.choose()
        if worker is None:
            raise CtiError(INTERNAL, "every media worker is full")
        now = self.clock()
        conv = Conversation(new_conversation_id(), worker.id, now, caller=device.address, callee=request.to)
        shown = request.caller_id or device.address
        a = Leg(
            self._new_leg_id(), worker.id, conv.id, "outbound", "agent", shown, device.address,
            user=device.address, created_at=now, agent_id=agent_id,
        )  # fmt: skip
        conv.legs[a.id] = a
        conv.a_leg = a.id
        self.conversations[conv.id] = conv
        self.legs[a.id] = a
        with structlog.contextvars.bound_contextvars(conversation_id=conv.id, call_id=a.id):
            log.info("agent originates", agent_id=agent_id, to=request.to)
            self._publish(CallInitiated, a, user=device.address)
            if self.queues is not None:
                self.queues.agent_call_started(agent_id, conv.id)
            async with self._lock(conv.id):
                sent = await self._send(
                    worker.id,
                    Originate(
                        leg=a.id,
                        uri=f"sip:{device.address}@{self.domain}",
                        from_uri=f"sip:{request.to}@{self.domain}",  # the agent's phone shows whom it calls
                        timeout_s=ORIGINATE_AGENT_TIMEOUT_S,
                    ),
                )
                if not sent and not a.ended:
                    self._unplaced(a)
                    self._conversation_ended(conv)
                    if self.queues is not None:
                        self.queues.agent_call_ended(agent_id, conv.id, 0.0)
                    raise CtiError(INTERNAL, "the media worker did not place the call")
        return {"conversation_id": conv.id, "call_id": a.id}

    async def _dial_customer(self, conv: Conversation, agent: Leg) -> None:
        if conv.state is ConversationState.SETUP:
            conv.move(ConversationState.ACTIVE)
            conv.answered_at = agent.answered_at
        action = self.router.route(conv.callee, caller=agent.user or "")
        if isinstance(action, actions.Dial):
            await self._dial(conv, agent, action, role="customer")
            return
        log.info("originate target is not a user the node can dial", to=conv.callee, action=repr(action))
        agent.final_status, agent.released_by, agent.sip_code = "failed", "local", 404
        await self._send(agent.worker_id, Hangup(leg=agent.id))

    def _request_leg(self, request: CallRequest) -> Leg:
        if request.call_id is not None:
            leg = self.legs.get(request.call_id)
        elif request.conversation_id is not None and request.agent_id is not None:
            conv = self.conversations.get(request.conversation_id)
            leg = self._agent_leg(conv, request.agent_id) if conv is not None else None
        else:
            leg = None
        if leg is None or leg.ended:
            raise CtiError(NO_ACTIVE_CALL, "no live call to act on")
        return leg

    async def _blind_transfer(
        self, conv: Conversation, leg: Leg, far: Leg | None, request: TransferRequest
    ) -> dict[str, Any]:
        """call.transfer (blind, the seed's blindMove): the agent leaves the call and the far party goes
        to the target — a registered user, a number the dialplan routes, or a queue."""
        kind, target = request.target_kind, request.target_id
        if far is None or far.ended:
            raise CtiError(NO_ACTIVE_CALL, "the call has no other party to transfer")
        dial: actions.Dial | None = None
        menu: actions.IvrMenu | None = None
        if kind == "queue":
            if self.queues is None or not self.queues.has_queue(target):
                raise CtiError(UNKNOWN_QUEUE, f"no queue {target!r}")
        elif kind == "agent":
            dial = self._agent_target(request)
        elif kind == "ivr":
            menu = self.router.menus.get(target)
            if menu is None:
                raise CtiError(INVALID_STATE, f"the dialplan has no IVR menu {target!r}")
        elif kind in ("user", "external"):
            routed = self.router.route(target, caller=far.from_)
            if isinstance(routed, actions.Dial):
                dial = routed
            elif isinstance(routed, actions.Queue):
                kind, target = "queue", routed.queue
            else:
                raise CtiError(NOT_SUPPORTED, f"{target!r} does not route to a user or a queue")
            if dial is not None and (dial.target not in self.users or not self.has_binding(dial.target)):
                raise CtiError(DEVICE_UNAVAILABLE, f"{dial.target} is not registered")
        else:
            raise CtiError(NOT_SUPPORTED, f"transfer to {kind} is not carried out by this node yet")
        transfer_id = "TR" + secrets.token_hex(8)
        fields: dict[str, Any] = {
            "conversation_id": conv.id, "transfer_id": transfer_id, "flow": "blind",
            "transferred_call": far.id, "initiator_call": leg.id,
            "target": {"kind": request.target_kind, "id": request.target_id},
        }  # fmt: skip
        self.bus.publish(TransferInitiated(**fields, recipient_call=None))
        log.info("blind transfer", transfer_id=transfer_id, kind=kind, target=target)
        # The agent leaves: split, then release its leg (its call ends: wrap-up); the far party stays.
        await self._send(leg.worker_id, Unbridge(a=leg.id, b=far.id))
        leg.peer = far.peer = None
        leg.final_status, leg.released_by = "completed", "local"
        await self._send(leg.worker_id, Hangup(leg=leg.id))
        conv.a_leg = far.id
        before = set(conv.legs)
        if dial is not None:
            await self._dial(conv, far, dial, role="callee", agent_id=target if kind == "agent" else None)
        elif menu is not None:
            self._spawn(self._run_ivr(conv, far, menu))
        else:
            await self._enqueue(conv, far, target)
        recipient = next((i for i in conv.legs if i not in before), None)
        self.bus.publish(TransferCompleted(**fields, recipient_call=recipient))
        return {"transfer_id": transfer_id, "recipient_call": recipient}

    async def _hold(self, leg: Leg, far: Leg, *, hold: bool) -> dict[str, Any]:
        """Hold: the far end is split from `leg` and hears music on hold; retrieve joins them again."""
        if far.held == hold:
            raise CtiError(
                INVALID_STATE, "the call is on hold already" if hold else "the call is not on hold"
            )
        if hold:
            await self._send(leg.worker_id, Unbridge(a=leg.id, b=far.id))
            music = str(self.prompts.path("music_on_hold"))
            await self._send(far.worker_id, Play(leg=far.id, files=[music], loop=True))
            far.held = True
            self._publish(CallHeld, far, by="api")
        else:
            await self._send(far.worker_id, StopPlay(leg=far.id))
            await self._send(leg.worker_id, Bridge(a=leg.id, b=far.id))
            far.held = False
            self._publish(CallRetrieved, far, by="api")
        log.info("call held" if hold else "call retrieved", call_id=far.id)
        return {"call_id": far.id, "held": hold}

    # -- consultation, attended transfer, three-way conference ----------------------------------

    def _agent_target(self, request: TransferRequest) -> actions.Dial:
        """The device of the agent a transfer or consultation goes to (the CTI layer found it ready)."""
        device = request.target_device
        if device is None or device.kind != "sip":
            raise CtiError(NOT_SUPPORTED, f"agent {request.target_id} has no SIP device")
        if device.address not in self.users or not self.has_binding(device.address):
            raise CtiError(DEVICE_UNAVAILABLE, f"device {device.address} is not registered")
        return actions.Dial(target=device.address, timeout_s=ORIGINATE_AGENT_TIMEOUT_S)

    def _consult_target(self, kind: str, target: str, caller: str) -> actions.Dial:
        """The registered user a consultation dials (user, or a number the dialplan routes to one)."""
        if kind not in ("user", "external"):
            raise CtiError(NOT_SUPPORTED, f"consulting a {kind} is not carried out by this node yet")
        routed = self.router.route(target, caller=caller)
        if not isinstance(routed, actions.Dial):
            raise CtiError(NOT_SUPPORTED, f"{target!r} does not route to a user")
        if routed.target not in self.users or not self.has_binding(routed.target):
            raise CtiError(DEVICE_UNAVAILABLE, f"{routed.target} is not registered")
        return routed

    def _transfer_fields(self, conv: Conversation, consult: Consult) -> dict[str, Any]:
        return {
            "conversation_id": conv.id, "transfer_id": consult.transfer_id, "flow": "attended",
            "transferred_call": consult.transferee, "initiator_call": consult.initiator,
            "recipient_call": consult.recipient, "target": consult.target,
        }  # fmt: skip

    async def _consult(
        self, conv: Conversation, leg: Leg, far: Leg | None, request: TransferRequest
    ) -> dict[str, Any]:
        """call.consult (the seed's consultation): the customer holds with music, a second leg rings the
        target; when it answers the agent and the target talk (transfer.answered)."""
        if far is None or far.ended:
            raise CtiError(NO_ACTIVE_CALL, "the call has no other party to hold")
        if conv.consult is not None or conv.conference:
            raise CtiError(INVALID_STATE, "a consultation or conference is in progress already")
        if request.target_kind == "agent":
            dial = self._agent_target(request)
        else:
            dial = self._consult_target(request.target_kind, request.target_id, leg.user or leg.to)
        if not far.held:
            await self._hold(leg, far, hold=True)
        agent_id = request.target_id if request.target_kind == "agent" else None
        recipient = Leg(
            self._new_leg_id(), leg.worker_id, conv.id, "outbound", "consult", leg.user or leg.to,
            dial.target, user=dial.target, created_at=self.clock(), agent_id=agent_id,
            direct_agent=agent_id is not None,
        )  # fmt: skip
        conv.legs[recipient.id] = recipient
        self.legs[recipient.id] = recipient
        consult = Consult(
            "TR" + secrets.token_hex(8), leg.id, far.id, recipient.id,
            {"kind": request.target_kind, "id": request.target_id},
        )  # fmt: skip
        conv.consult = consult
        self.bus.publish(TransferInitiated(**self._transfer_fields(conv, consult)))
        self._publish(CallInitiated, recipient, user=dial.target)
        log.info("consultation", transfer_id=consult.transfer_id, target=dial.target)
        sent = await self._send(
            leg.worker_id,
            Originate(
                leg=recipient.id,
                uri=f"sip:{dial.target}@{self.domain}",
                from_uri=f"sip:{leg.user or leg.to}@{self.domain}",
                display_name=self.users.get(leg.user or "", ""),
                timeout_s=dial.timeout_s,
            ),
        )
        if not sent and not recipient.ended:
            self._unplaced(recipient)
            await self._consult_ended(conv, recipient)
            raise CtiError(INTERNAL, "the media worker did not place the consultation")
        return {"transfer_id": consult.transfer_id, "recipient_call": recipient.id}

    async def _consult_answered(self, conv: Conversation, leg: Leg) -> None:
        consult = conv.consult
        initiator = self.legs.get(consult.initiator) if consult is not None else None
        if consult is None or consult.recipient != leg.id or initiator is None or initiator.ended:
            await self._send(leg.worker_id, Hangup(leg=leg.id))
            return
        consult.answered = True
        await self._send(initiator.worker_id, StopTone(leg=initiator.id))
        if await self._send(leg.worker_id, Bridge(a=initiator.id, b=leg.id)):
            self._publish(CallBridged, initiator, peer_call_id=leg.id)
            self._publish(CallBridged, leg, peer_call_id=initiator.id)
        self.bus.publish(TransferAnswered(**self._transfer_fields(conv, consult)))
        await self._recording_add(conv, leg)
        await self._supervision_refresh(conv)

    async def _consult_ended(self, conv: Conversation, recipient: Leg) -> None:
        """The consulted leg ended before the transfer completed: the agent is back with the customer
        (retrieved), so nobody is left in silence on hold."""
        consult = conv.consult
        if consult is None:
            return
        conv.consult = None
        fields = self._transfer_fields(conv, consult)
        if consult.cancelled:
            self.bus.publish(TransferCancelled(**fields))
        else:
            reason = recipient.final_status if not consult.answered else "hangup"
            self.bus.publish(TransferFailed(**fields, reason=reason))
        initiator, transferee = self.legs.get(consult.initiator), self.legs.get(consult.transferee)
        if initiator is not None and not initiator.ended:
            await self._send(initiator.worker_id, StopTone(leg=initiator.id))
            if transferee is not None and not transferee.ended and transferee.held:
                await self._hold(initiator, transferee, hold=False)
        await self._supervision_refresh(conv)

    def _consult_of(self, conv: Conversation, leg: Leg, *, answered: bool) -> Consult:
        consult = conv.consult
        if consult is None or consult.initiator != leg.id:
            raise CtiError(INVALID_STATE, "no consultation in progress")
        if answered and not consult.answered:
            raise CtiError(INVALID_STATE, "the consulted party has not answered yet")
        return consult

    async def _consult_cancel(self, conv: Conversation, leg: Leg) -> dict[str, Any]:
        """call.consult_cancel: the consulted leg ends; the customer is retrieved when it has."""
        consult = self._consult_of(conv, leg, answered=False)
        consult.cancelled = True
        recipient = self.legs[consult.recipient]
        recipient.final_status = "completed" if recipient.answered_at else "canceled"
        recipient.released_by = "local"
        await self._send(recipient.worker_id, Hangup(leg=recipient.id))
        return {"transfer_id": consult.transfer_id}

    async def _transfer_complete(self, conv: Conversation, leg: Leg) -> dict[str, Any]:
        """call.transfer_complete: the customer talks to the consulted party; the agent leaves."""
        consult = self._consult_of(conv, leg, answered=True)
        transferee, recipient = self.legs[consult.transferee], self.legs[consult.recipient]
        conv.consult = None
        await self._send(leg.worker_id, Unbridge(a=leg.id, b=recipient.id))
        await self._retrieve_into(transferee, recipient)
        self.bus.publish(TransferCompleted(**self._transfer_fields(conv, consult)))
        await self._leave(conv, leg)
        log.info("attended transfer completed", transfer_id=consult.transfer_id)
        return {"transfer_id": consult.transfer_id, "recipient_call": recipient.id}

    async def _retrieve_into(self, held: Leg, other: Leg) -> None:
        """Take `held` off hold straight into a bridge with `other`."""
        await self._send(held.worker_id, StopPlay(leg=held.id))
        if held.held:
            held.held = False
            self._publish(CallRetrieved, held, by="api")
        if await self._send(held.worker_id, Bridge(a=held.id, b=other.id)):
            self._bridged(held, other)

    async def _leave(self, conv: Conversation, leg: Leg) -> None:
        """`leg` leaves the call on purpose (its BYE ends nobody else); the call goes on without it."""
        leg.detached = True
        for listener, source in list(conv.edges):
            if leg.id in (listener, source):
                other = source if listener == leg.id else listener
                await self._send(leg.worker_id, Unbridge(a=leg.id, b=other))
        if conv.a_leg == leg.id:
            conv.a_leg = next((x.id for x in conv.live_legs() if x is not leg and not x.detached), None)
        leg.final_status, leg.released_by = "completed", "local"
        await self._send(leg.worker_id, Hangup(leg=leg.id))
        await self._release_supervisor_of(conv, leg)
        await self._supervision_refresh(conv)

    async def _release_supervisor_of(self, conv: Conversation, leg: Leg) -> None:
        """The supervised agent left the call: so does the supervisor."""
        sup = conv.supervision
        sup_leg = self.legs.get(sup.leg) if sup is not None and sup.target == leg.id else None
        if sup_leg is not None and not sup_leg.ended and not sup_leg.final_status:
            sup_leg.final_status, sup_leg.released_by = "completed", "local"
            await self._send(sup_leg.worker_id, Hangup(leg=sup_leg.id))

    async def _conference(self, conv: Conversation, leg: Leg) -> dict[str, Any]:
        """call.conference (three-way): the held customer joins the agent and the consulted party, and
        each of the three hears the other two."""
        consult = self._consult_of(conv, leg, answered=True)
        transferee, recipient = self.legs[consult.transferee], self.legs[consult.recipient]
        conv.consult = None
        await self._retrieve_into(transferee, leg)
        if await self._send(transferee.worker_id, Bridge(a=transferee.id, b=recipient.id)):
            self._publish(CallBridged, transferee, peer_call_id=recipient.id)
            self._publish(CallBridged, recipient, peer_call_id=transferee.id)
        conv.conference = {transferee.id, leg.id, recipient.id}
        for party in (transferee, leg, recipient):
            self.bus.publish(
                ParticipantJoined(conv.id, party.id, room=conv.id, role=party.role, reason="conference")
            )
        await self._supervision_refresh(conv)
        log.info("three-way conference", transfer_id=consult.transfer_id)
        return {"room": conv.id, "participants": sorted(conv.conference)}

    async def _conference_leave(self, conv: Conversation, leg: Leg) -> dict[str, Any]:
        """call.conference_leave: the agent leaves the three-way call; the other two talk on."""
        if leg.id not in conv.conference:
            raise CtiError(INVALID_STATE, "the agent is not in a conference")
        self._conference_left(conv, leg, reason="left")
        await self._leave(conv, leg)
        return {"room": conv.id}

    def _conference_left(self, conv: Conversation, leg: Leg, *, reason: str) -> None:
        conv.conference.discard(leg.id)
        self.bus.publish(ParticipantLeft(conv.id, leg.id, room=conv.id, role=leg.role, reason=reason))
        remaining = [self.legs[i] for i in conv.conference if i in self.legs and not self.legs[i].ended]
        if len(remaining) < 3:
            for party in remaining:
                self.bus.publish(
                    ParticipantLeft(conv.id, party.id, room=conv.id, role=party.role, reason="ended")
                )
            conv.conference = set()
            if len(remaining) == 2:
                a, b = remaining
                a.peer, b.peer = b.id, a.id

    # -- mute, supervision, recording ------------------------------------------------------------

    async def _mute(self, conv: Conversation, leg: Leg, *, mute: bool) -> dict[str, Any]:
        """call.mute: nobody but a supervisor hears the leg; it still hears them. call.unmute undoes it."""
        if leg.muted == mute:
            raise CtiError(INVALID_STATE, "the call is muted already" if mute else "the call is not muted")
        supervisor = conv.supervision.leg if conv.supervision is not None else None
        if mute:
            listeners = {x for x, src in conv.edges if src == leg.id and x != supervisor}
            for listener in listeners:
                await self._send(leg.worker_id, Unlisten(leg=listener, source=leg.id))
            leg.muted, leg.muted_from = True, listeners
            self._publish(CallMuted, leg)
        else:
            for listener in leg.muted_from:
                other = self.legs.get(listener)
                if other is not None and not other.ended:
                    await self._send(leg.worker_id, Listen(leg=listener, source=leg.id))
            leg.muted, leg.muted_from = False, set()
            self._publish(CallUnmuted, leg)
        log.info("call muted" if mute else "call unmuted", call_id=leg.id)
        return {"call_id": leg.id, "muted": mute}

    async def _monitor(self, conv: Conversation, leg: Leg, request: MonitorRequest) -> dict[str, Any]:
        """call.monitor: ring the supervisor's phone; once answered it hears the agent's call (listen),
        is heard by the agent (whisper) or by everyone (barge). Sent again, it switches the mode."""
        supervisor_id = request.by or ""
        current = conv.supervision
        if current is not None:
            if current.supervisor_id != supervisor_id:
                raise CtiError(INVALID_STATE, f"{current.supervisor_id} is monitoring this call already")
            previous, current.mode = current.mode, request.mode
            if current.started and previous != request.mode:
                await self._supervision_refresh(conv)
                self.bus.publish(
                    SupervisionModeChanged(
                        conv.id, supervisor_id, current.leg, current.target, request.mode,
                        previous_mode=previous,
                    )
                )  # fmt: skip
            return {"supervisor_call": current.leg, "mode": request.mode}
        device = request.supervisor_device
        if device is None or device.kind != "sip":
            raise CtiError(DEVICE_UNAVAILABLE, "the supervisor has no SIP device")
        if device.address not in self.users or not self.has_binding(device.address):
            raise CtiError(DEVICE_UNAVAILABLE, f"device {device.address} is not registered")
        sup = Leg(
            self._new_leg_id(), leg.worker_id, conv.id, "outbound", "supervisor", leg.user or leg.to,
            device.address, user=device.address, created_at=self.clock(), detached=True,
        )  # fmt: skip
        conv.legs[sup.id] = sup
        self.legs[sup.id] = sup
        conv.supervision = Supervision(supervisor_id, sup.id, leg.id, request.mode)
        self._publish(CallInitiated, sup, user=device.address)
        log.info("supervisor joins", supervisor_id=supervisor_id, mode=request.mode, target=leg.id)
        sent = await self._send(
            leg.worker_id,
            Originate(
                leg=sup.id,
                uri=f"sip:{device.address}@{self.domain}",
                from_uri=f"sip:{leg.user or leg.to}@{self.domain}",
                timeout_s=ORIGINATE_AGENT_TIMEOUT_S,
            ),
        )
        if not sent and not sup.ended:
            conv.supervision = None
            self._unplaced(sup)
            raise CtiError(INTERNAL, "the media worker did not place the supervisor's call")
        return {"supervisor_call": sup.id, "mode": request.mode}

    def _talk_group(self, conv: Conversation, leg: Leg, exclude: str) -> set[str]:
        """`leg` and every live leg it talks with (hears or is heard by), but `exclude`."""
        group = {leg.id}
        for listener, source in conv.edges:
            if leg.id in (listener, source):
                group.add(source if listener == leg.id else listener)
        group.discard(exclude)
        return {i for i in group if i in self.legs and not self.legs[i].ended}

    async def _supervision_refresh(self, conv: Conversation) -> None:
        """Make the supervisor's connections match its mode and the agent's current talk group."""
        sup = conv.supervision
        if sup is None or not sup.started:
            return
        target = self.legs.get(sup.target)
        if target is None or target.ended:
            return
        group = self._talk_group(conv, target, sup.leg)
        wanted = {(sup.leg, member) for member in group if not self.legs[member].held}
        if sup.mode == "whisper":
            wanted.add((target.id, sup.leg))
        elif sup.mode == "barge":
            wanted |= {(member, sup.leg) for member in group if not self.legs[member].held}
        current = {(x, y) for x, y in conv.edges if sup.leg in (x, y)}
        for listener, source in sorted(current - wanted):
            await self._send(target.worker_id, Unlisten(leg=listener, source=source))
        for listener, source in sorted(wanted - current):
            await self._send(target.worker_id, Listen(leg=listener, source=source))

    async def _supervisor_answered(self, conv: Conversation, leg: Leg) -> None:
        sup = conv.supervision
        if sup is None or sup.leg != leg.id:
            await self._send(leg.worker_id, Hangup(leg=leg.id))
            return
        sup.started = True
        await self._supervision_refresh(conv)
        self.bus.publish(SupervisionStarted(conv.id, sup.supervisor_id, sup.leg, sup.target, sup.mode))

    def _supervision_ended(self, conv: Conversation, leg: Leg) -> None:
        sup = conv.supervision
        if sup is None or sup.leg != leg.id:
            return
        conv.supervision = None
        if sup.started:
            self.bus.publish(SupervisionEnded(conv.id, sup.supervisor_id, sup.leg, sup.target, sup.mode))

    async def _record(self, conv: Conversation, action: str) -> dict[str, Any]:
        """call.record start: the parties' mixed audio goes to a WAV file under the data directory
        (recording.started); stop closes it (recording.stopped, then recording.available)."""
        if action == "stop":
            if conv.recording is None:
                raise CtiError(INVALID_STATE, "the call is not being recorded")
            return await self._stop_recording(conv)
        if conv.recording is not None:
            raise CtiError(INVALID_STATE, "the call is being recorded already")
        if self.recordings_dir is None:
            raise CtiError(NOT_SUPPORTED, "this node keeps no recordings")
        parties = [
            x for x in conv.live_legs() if x.answered_at is not None and x.role not in ("supervisor", "link")
        ]
        if not parties:
            raise CtiError(NO_ACTIVE_CALL, "no answered party to record")
        recording_id = "RE" + secrets.token_hex(8)
        directory = self.recordings_dir / conv.id
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("cannot create the recordings directory", path=str(directory), error=str(exc))
            raise CtiError(INTERNAL, f"cannot create {directory}: {exc.strerror}") from None
        path = directory / f"{recording_id}.wav"
        url = f"{self.recordings_dir.name}/{conv.id}/{recording_id}.wav"
        sent = await self._send(
            conv.worker_id, Record(recording=recording_id, path=str(path), legs=[x.id for x in parties])
        )
        if not sent:
            raise CtiError(INTERNAL, "the media worker did not start the recording")
        conv.recording = CallRecording(recording_id, str(path), url, self.clock())
        self.bus.publish(RecordingStarted(conv.id, recording_id, url))
        log.info("recording started", recording_id=recording_id, path=str(path))
        return {"recording_id": recording_id, "url": url}

    async def _recording_add(self, conv: Conversation, leg: Leg) -> None:
        rec = conv.recording
        if rec is not None:
            await self._send(conv.worker_id, Record(recording=rec.id, path=rec.path, legs=[leg.id]))

    async def _stop_recording(self, conv: Conversation) -> dict[str, Any]:
        rec = conv.recording
        if rec is None:
            return {}
        conv.recording = None
        result = await self._command(conv.worker_id, StopRecord(recording=rec.id))
        duration = float(result.get("duration_s", 0.0)) if result else round(self.clock() - rec.started_at, 3)
        self.bus.publish(RecordingStopped(conv.id, rec.id, rec.url, duration))
        try:
            size = Path(rec.path).stat().st_size
        except OSError:
            log.warning("recording file missing", recording_id=rec.id, path=rec.path)
            return {"recording_id": rec.id, "url": rec.url, "duration_s": duration}
        self.bus.publish(RecordingAvailable(conv.id, rec.id, rec.url, duration, size_bytes=size))
        log.info("recording stopped", recording_id=rec.id, duration_s=duration, size_bytes=size)
        return {"recording_id": rec.id, "url": rec.url, "duration_s": duration}

    # -- conference rooms (dialplan `conference`) --------------------------------------------------

    async def _join_room(self, conv: Conversation, a: Leg, action: actions.Conference) -> None:
        """Answer and put the caller in room `action.room` (made on first join, gone when empty). A room
        mixes on one worker, its home; a caller on another worker reaches it over a link: a direct call
        between the two workers, bridged to the caller on its side and a member on the home side."""
        if a.answered_at is None and not await self._send(a.worker_id, Answer(leg=a.id, code=200)):
            return
        room = self.rooms.get(action.room)
        if room is None:
            room = self.rooms[action.room] = Room(action.room, a.worker_id)
            log.info("conference room opened", room=room.id, worker=room.worker_id)
        if a.worker_id == room.worker_id:
            a.room = room.id
            await self._room_add(room, a, muted=action.muted)
            return
        home = self.media.address(room.worker_id)
        if home is None:
            await self._reject(a, 503, "Service Unavailable")
            return
        token = secrets.token_hex(12)
        near = Leg(
            self._new_leg_id(), a.worker_id, conv.id, "outbound", "link", a.from_, room.id,
            created_at=self.clock(),
        )  # fmt: skip
        near.peer, near.room = a.id, room.id
        conv.legs[near.id] = near
        self.legs[near.id] = near
        self._links[token] = RoomLink(room.id, conv.id, a.id, action.muted)
        log.info("linking to the room's worker", room=room.id, worker=room.worker_id)
        host, port = home
        sent = await self._send(
            a.worker_id,
            Originate(
                leg=near.id, uri=f"sip:{LINK_PREFIX}{token}@{host}:{port}", from_uri=f"sip:{a.from_}@{host}",
                timeout_s=LINK_TIMEOUT_S, direct=True,
            ),
        )  # fmt: skip
        if not sent and not near.ended:
            self._links.pop(token, None)
            self._unplaced(near)
            await self._reject(a, 503, "Service Unavailable")

    async def _link_arrived(self, worker_id: str, ev: LegIncoming, token: str) -> None:
        """The home side of a room link: a member leg in the caller's conversation; an unknown token
        (a stale link, or anyone else calling the worker directly) is refused."""
        link = self._links.pop(token, None)
        conv = self.conversations.get(link.conversation_id) if link is not None else None
        if link is None or conv is None or link.room not in self.rooms:
            await self._send(worker_id, Reject(leg=ev.leg, code=404, reason="Not Found"))
            return
        far = Leg(
            ev.leg, worker_id, conv.id, "inbound", "link", conv.caller, link.room, ev.sip_call_id,
            created_at=self.clock(),
        )  # fmt: skip
        far.room, far.muted = link.room, link.muted
        conv.legs[far.id] = far
        self.legs[far.id] = far
        async with self._lock(conv.id):
            await self._send(worker_id, Answer(leg=far.id, code=200))

    async def _link_answered(self, conv: Conversation, leg: Leg) -> None:
        room = self.rooms.get(leg.room or "")
        if leg.direction == "inbound":  # the home side: a member of the room
            if room is not None:
                await self._room_add(room, leg, muted=leg.muted)
            return
        caller = self.legs.get(leg.peer or "")
        if caller is None or caller.ended:
            await self._send(leg.worker_id, Hangup(leg=leg.id))
            return
        await self._send(leg.worker_id, Bridge(a=caller.id, b=leg.id))
        caller.room = leg.room
        if room is not None:
            self.bus.publish(
                ParticipantJoined(conv.id, caller.id, room=room.id, role=caller.role, reason="joined")
            )

    async def _room_add(self, room: Room, leg: Leg, *, muted: bool) -> None:
        for member_id, member_muted in room.members.items():
            member = self.legs.get(member_id)
            if member is None or member.ended:
                continue
            if not member_muted:
                await self._send(room.worker_id, Listen(leg=leg.id, source=member_id))
            if not muted:
                await self._send(room.worker_id, Listen(leg=member_id, source=leg.id))
        room.members[leg.id] = muted
        if leg.role != "link":
            self.bus.publish(
                ParticipantJoined(leg.conversation_id, leg.id, room=room.id, role=leg.role, reason="joined")
            )
        log.info("joined the conference", room=room.id, members=len(room.members), muted=muted)

    def _room_left(self, leg: Leg) -> None:
        """A room's member or participant ended: the room closes with its last member."""
        room = self.rooms.get(leg.room or "")
        if room is None:
            return
        if leg.role != "link":
            self.bus.publish(
                ParticipantLeft(leg.conversation_id, leg.id, room=room.id, role=leg.role, reason="hangup")
            )
        if room.members.pop(leg.id, None) is not None and not room.members:
            self.rooms.pop(room.id, None)
            log.info("conference room closed", room=room.id)

    # -- blind transfer asked for by a phone (REFER) -------------------------------------------------

    async def _phone_transfer(self, worker_id: str, ev: LegTransfer) -> None:
        """The phone on `ev.leg` asked (REFER) to transfer its party to `ev.target`; the worker placed
        `ev.new_leg` there. When it answers, the party is bridged to it and the transferor released."""
        transferor = self.legs.get(ev.leg)
        conv = self.conversations.get(transferor.conversation_id) if transferor is not None else None
        if transferor is None or conv is None:
            await self._send(worker_id, Hangup(leg=ev.new_leg))
            return
        async with self._lock(conv.id):
            transferee = self.legs.get(transferor.peer) if transferor.peer else None
            number = _user_of(ev.target) or ev.target
            recipient = Leg(
                ev.new_leg, worker_id, conv.id, "outbound", "callee",
                transferee.from_ if transferee is not None else transferor.to, number,
                user=number if number in self.users else None, created_at=self.clock(),
            )  # fmt: skip
            conv.legs[recipient.id] = recipient
            self.legs[recipient.id] = recipient
            self._publish(CallInitiated, recipient, user=recipient.user)
            if transferee is None or transferee.ended:
                recipient.final_status, recipient.released_by = "canceled", "local"
                await self._send(worker_id, Hangup(leg=recipient.id))
                return
            refer = PhoneTransfer(
                "TR" + secrets.token_hex(8), transferor.id, transferee.id,
                {"kind": "user" if number in self.users else "external", "id": number},
            )  # fmt: skip
            self._refers[recipient.id] = refer
            self.bus.publish(TransferInitiated(**self._refer_fields(conv, refer, recipient.id)))
            log.info("phone transfers its call", transfer_id=refer.transfer_id, target=number)

    def _refer_fields(self, conv: Conversation, refer: PhoneTransfer, recipient: str) -> dict[str, Any]:
        return {
            "conversation_id": conv.id, "transfer_id": refer.transfer_id, "flow": "blind",
            "transferred_call": refer.transferee, "initiator_call": refer.transferor,
            "recipient_call": recipient, "target": refer.target,
        }  # fmt: skip

    async def _phone_transfer_answered(self, conv: Conversation, recipient: Leg) -> None:
        refer = self._refers.pop(recipient.id)
        transferor, transferee = self.legs.get(refer.transferor), self.legs.get(refer.transferee)
        fields = self._refer_fields(conv, refer, recipient.id)
        if transferee is None or transferee.ended:
            self.bus.publish(TransferFailed(**fields, reason="transferee_gone"))
            recipient.final_status, recipient.released_by = "completed", "local"
            await self._send(recipient.worker_id, Hangup(leg=recipient.id))
            return
        if transferor is not None and not transferor.ended:
            await self._send(transferor.worker_id, Unbridge(a=transferor.id, b=transferee.id))
            transferor.peer, transferor.detached = None, True
            if conv.a_leg == transferor.id:
                conv.a_leg = transferee.id
            self._spawn(self._release_after(transferor.id, REFER_RELEASE_S))
        await self._retrieve_into(transferee, recipient)
        self.bus.publish(TransferCompleted(**fields))
        log.info("phone transfer completed", transfer_id=refer.transfer_id)

    def _leg_replaced(self, worker_id: str, ev: LegReplaced) -> None:
        """An INVITE with Replaces (RFC 3891) took the place of `ev.leg`: the new leg joins that leg's
        conversation (registered at once: its state changes follow this event) and, once confirmed,
        talks to its party; the replaced leg's end ends nobody else."""
        old = self.legs.get(ev.leg)
        conv = self.conversations.get(old.conversation_id) if old is not None else None
        if old is None or conv is None:
            self._spawn(self._send(worker_id, Hangup(leg=ev.new_leg)))
            return
        old.detached = True
        if not old.final_status:
            old.final_status, old.released_by = "completed", "local"
        caller = _user_of(ev.from_uri)
        new = Leg(
            ev.new_leg, worker_id, conv.id, "inbound", old.role, caller, old.to, ev.sip_call_id,
            user=caller if caller in self.users else None, created_at=self.clock(),
        )  # fmt: skip
        conv.legs[new.id] = new
        self.legs[new.id] = new
        self._replacing[new.id] = old.id
        self._publish(CallInitiated, new, user=new.user)
        log.info("leg replaced", call_id=old.id, new_call_id=new.id)

    async def _replacement_answered(self, conv: Conversation, new: Leg) -> None:
        old = self.legs.get(self._replacing.pop(new.id))
        party = self.legs.get(old.peer) if old is not None and old.peer else None
        if old is None or party is None or party.ended:
            new.final_status, new.released_by = "completed", "local"
            await self._send(new.worker_id, Hangup(leg=new.id))
            return
        await self._send(old.worker_id, Unbridge(a=old.id, b=party.id))
        old.peer = None
        if conv.a_leg == old.id:
            conv.a_leg = new.id
        await self._retrieve_into(party, new)
        if conv.state is ConversationState.SETUP:
            conv.move(ConversationState.ACTIVE)
            conv.answered_at = new.answered_at
        self.bus.publish(
            TransferCompleted(
                conversation_id=conv.id, transfer_id="TR" + secrets.token_hex(8), flow="attended",
                transferred_call=party.id, initiator_call=old.id, recipient_call=new.id,
                target={"kind": "user" if new.user else "external", "id": new.from_},
            )
        )  # fmt: skip
        await self._release_supervisor_of(conv, old)

    async def _release_after(self, leg_id: str, delay_s: float) -> None:
        """The transferor's phone ends its call once told the transfer worked (RFC 5589 §6.1); should it
        not, the node does."""
        await asyncio.sleep(delay_s)
        leg = self.legs.get(leg_id)
        if leg is not None and not leg.ended and not leg.final_status:
            leg.final_status, leg.released_by = "completed", "local"
            await self._send(leg.worker_id, Hangup(leg=leg.id))

    @staticmethod
    def _agent_leg(conv: Conversation, agent_id: str) -> Leg | None:
        live = [leg for leg in conv.legs.values() if leg.agent_id == agent_id]
        return live[-1] if live else None

    async def _run_ivr(self, conv: Conversation, leg: Leg, menu: actions.IvrMenu) -> None:
        channel = LegChannel(leg.id, lambda cmd: self._command(leg.worker_id, cmd))
        self._channels[leg.id] = channel
        with structlog.contextvars.bound_contextvars(conversation_id=conv.id, call_id=leg.id):
            try:
                chosen = await ivr(
                    channel, menu, self.prompts, number=conv.callee, caller=leg.from_,
                    answered=leg.answered_at is not None,
                )  # fmt: skip
            except LegGone:
                return
            except PromptError as exc:
                log.error("prompt missing in an IVR menu", menu=menu.name, error=str(exc))
                chosen = None
            finally:
                self._channels.pop(leg.id, None)
            async with self._lock(conv.id):
                if leg.ended or leg.final_status:
                    return
                log.info("IVR option chosen", menu=menu.name, action=type(chosen).__name__)
                if chosen is None:  # no valid key in every attempt, and no fallback: goodbye
                    leg.final_status, leg.released_by, leg.sip_code = "completed", "local", 200
                    await self._send(leg.worker_id, Hangup(leg=leg.id))
                    return
                await self._act(conv, leg, chosen)

    async def _run_playback(self, conv: Conversation, leg: Leg, action: actions.Playback) -> None:
        channel = LegChannel(leg.id, lambda cmd: self._command(leg.worker_id, cmd))
        self._channels[leg.id] = channel
        with structlog.contextvars.bound_contextvars(conversation_id=conv.id, call_id=leg.id):
            try:
                await playback(channel, action, self.prompts)
                failed = False
            except LegGone:
                return
            except PromptError as exc:
                log.error("prompt missing during playback", error=str(exc))
                failed = True
            finally:
                self._channels.pop(leg.id, None)
            async with self._lock(conv.id):
                if leg.ended or leg.final_status:
                    return
                leg.released_by = "local"
                if failed:
                    leg.final_status, leg.sip_code = "failed", 500
                else:
                    leg.final_status = "completed" if leg.answered_at is not None else "failed"
                    leg.sip_code = 200
                await self._send(leg.worker_id, Hangup(leg=leg.id))

    async def _reject(self, leg: Leg, code: int, reason: str) -> None:
        leg.sip_code = code
        leg.final_status = final_status(code, reason, answered=False)
        leg.released_by = "local"
        if leg.answered_at is not None:  # answered already (an originating agent): end it with BYE
            await self._send(leg.worker_id, Hangup(leg=leg.id))
            return
        await self._send(leg.worker_id, Reject(leg=leg.id, code=code, reason=reason))

    async def _dial(
        self,
        conv: Conversation,
        a: Leg,
        action: actions.Dial,
        role: str = "callee",
        agent_id: str | None = None,
    ) -> None:
        """Call the user of `action` for `a`; `agent_id` names the agent on that device when the call is
        a transfer to that agent (busy once it answers)."""
        target = action.target
        if target not in self.users:
            await self._reject(a, 404, "Not Found")
            return
        if not self.has_binding(target):
            await self._reject(a, 480, "Temporarily Unavailable")
            return
        conv.max_duration_s = action.max_duration_s
        b = Leg(
            self._new_leg_id(), a.worker_id, conv.id, "outbound", role, a.from_, target,
            user=target, created_at=self.clock(), agent_id=agent_id, direct_agent=agent_id is not None,
        )  # fmt: skip
        conv.legs[b.id] = b
        self.legs[b.id] = b
        self._publish(CallInitiated, b, user=target)
        display = self.users.get(a.from_, "")
        sent = await self._send(
            a.worker_id,
            Originate(
                leg=b.id,
                uri=f"sip:{target}@{self.domain}",
                from_uri=f"sip:{a.from_}@{self.domain}",
                display_name=display,
                timeout_s=action.timeout_s,
            ),
        )
        if not sent and not b.ended:
            self._unplaced(b)
            await self._reject(a, 503, "Service Unavailable")

    # -- leg state changes ----------------------------------------------------------------------

    async def _leg_state(self, leg: Leg, ev: LegStateEvent) -> None:
        conv = self.conversations.get(leg.conversation_id)
        if conv is None:
            return
        with structlog.contextvars.bound_contextvars(conversation_id=conv.id, call_id=leg.id):
            async with self._lock(conv.id):
                if ev.sip_call_id and not leg.sip_call_id:
                    leg.sip_call_id = ev.sip_call_id
                if leg.ended:
                    return
                if ev.state == "ringing" or ev.state == "early":
                    await self._progress(conv, leg, early_media=ev.state == "early")
                elif ev.state == "confirmed":
                    await self._answered(conv, leg)
                elif ev.state == "disconnected":
                    await self._disconnected(conv, leg, ev)

    async def _progress(self, conv: Conversation, leg: Leg, *, early_media: bool) -> None:
        first = leg.state is LegState.INITIATED
        leg.move(LegState.EARLY if early_media else LegState.RINGING)
        if first:
            leg.ring_at = self.clock()
            self._publish(CallRinging, leg, early_media=early_media)
            if leg.id in self._refers:
                return  # the transferred party hears what the transferor's hold gives it meanwhile
            if leg.agent_id is not None and leg.offer and leg.id != conv.a_leg and self.queues is not None:
                self.queues.offer_ringing(leg.agent_id, conv.id)
            consult = conv.consult
            if leg.role == "consult" and consult is not None and consult.recipient == leg.id:
                initiator = self.legs.get(consult.initiator)
                if initiator is not None and not initiator.ended:
                    await self._send(initiator.worker_id, Tone(leg=initiator.id, kind="ringback"))
        if leg.role not in ("callee", "customer"):
            return
        caller = self._caller(conv)
        if caller is None or caller.ended:
            return
        if caller.state is LegState.INITIATED:
            caller.move(LegState.EARLY)
            caller.ring_at = self.clock()
            await self._send(caller.worker_id, Answer(leg=caller.id, code=183))
            self._publish(CallRinging, caller, early_media=True)
        if early_media:
            # The callee's own ringback or announcement reaches the caller (RFC 3960 §3).
            await self._send(caller.worker_id, StopTone(leg=caller.id))
            await self._send(caller.worker_id, Bridge(a=caller.id, b=leg.id))
        elif first:
            await self._send(caller.worker_id, Tone(leg=caller.id, kind="ringback"))

    async def _answered(self, conv: Conversation, leg: Leg) -> None:
        now = self.clock()
        leg.move(LegState.ANSWERED)
        leg.answered_at = now
        self._publish(CallAnswered, leg, answered_by=leg.user or leg.to)
        if leg.direct_agent and self.queues is not None and leg.agent_id is not None:
            self.queues.agent_call_started(leg.agent_id, conv.id)  # a transfer or consult to the agent
        if leg.id in self._refers:
            await self._phone_transfer_answered(conv, leg)
            return
        if leg.id in self._replacing:
            await self._replacement_answered(conv, leg)
            return
        if leg.role == "consult" and (conv.consult is None or conv.consult.recipient == leg.id):
            await self._consult_answered(conv, leg)
            return
        if leg.role == "supervisor":
            await self._supervisor_answered(conv, leg)
            return
        if leg.role == "link":
            await self._link_answered(conv, leg)
            return
        if leg.agent_id is not None and leg.offer and leg.id != conv.a_leg:
            if self.queues is not None:
                self.queues.offer_answered(leg.agent_id, conv.id)  # the CTI layer connects the caller
            return
        if leg.id == conv.a_leg and leg.role == "agent":
            await self._dial_customer(conv, leg)  # call.originate: the agent answered, now the customer
            return
        if leg.role == "caller":
            callee = self._callee(conv)
            if callee is None and conv.state is ConversationState.SETUP:
                conv.move(ConversationState.ACTIVE)  # answered by the node itself (echo, playback)
                conv.answered_at = now
            if callee is not None and callee.state is LegState.ANSWERED:
                self._bridged(callee, leg)
            return
        caller = self._caller(conv)
        if caller is None or caller.ended:
            await self._send(leg.worker_id, Hangup(leg=leg.id))
            return
        if conv.state is ConversationState.SETUP:
            conv.move(ConversationState.ACTIVE)
            conv.answered_at = now
            if conv.max_duration_s:
                self._arm_time_limit(conv)
        await self._send(caller.worker_id, StopTone(leg=caller.id))
        # A caller answered already (by a queue, then routed on) is bridged at once.
        if caller.answered_at is not None or await self._send(
            caller.worker_id, Answer(leg=caller.id, code=200)
        ):
            await self._send(caller.worker_id, Bridge(a=caller.id, b=leg.id))
        if caller.state is LegState.ANSWERED:
            self._bridged(caller, leg)

    def _bridged(self, a: Leg, b: Leg) -> None:
        a.peer, b.peer = b.id, a.id
        self._publish(CallBridged, a, peer_call_id=b.id)
        self._publish(CallBridged, b, peer_call_id=a.id)

    async def _disconnected(self, conv: Conversation, leg: Leg, ev: LegStateEvent) -> None:
        now = self.clock()
        answered = leg.answered_at is not None
        remote = not leg.final_status  # not ended by this node's own decision
        leg.move(LegState.ENDED)
        leg.ended_at = now
        if not leg.final_status:
            leg.sip_code = ev.sip_code
            leg.cause = ev.reason
            leg.released_by = ev.released_by or "remote"
            # The system ends a leg on a failure (a worker died, shutdown) or when its ring timeout
            # expired (the worker CANCELs it and reports 408): the latter is a no-answer, not a failure.
            ring_timeout = ev.sip_code == RING_TIMEOUT_CODE and not answered
            leg.final_status = (
                "failed"
                if ev.released_by == "system" and not ring_timeout
                else final_status(ev.sip_code, ev.reason, answered)
            )
        self._publish_ended(leg)
        if self.queues is not None and leg.agent_id is not None:
            if answered or leg.id == conv.a_leg:  # an originating agent's call ends even unanswered
                self.queues.agent_call_ended(leg.agent_id, conv.id, leg.talk_seconds())
            elif remote and leg.released_by != "system" and leg.offer:
                # Rejected, busy or unreachable: a missed offer. (A worker that died is no fault of the
                # agent's: the caller's leg ends with it and the CTI layer withdraws the offer.)
                self.queues.offer_failed(leg.agent_id, conv.id)
        if await self._party_left(conv, leg):
            if not conv.live_legs():
                await self._stop_recording(conv)
                self._conversation_ended(conv)
            return
        if leg.offer and leg.id != conv.a_leg and leg.peer is None:
            # An offer that ended (or an answer that came too late): the caller waits on for the next
            # one, or is with another agent; nothing else ends with it.
            if not conv.live_legs():
                self._conversation_ended(conv)
            return
        if self.queues is not None and leg.role == "caller" and conv.queue_id is not None:
            conv.queue_id = None
            self.queues.caller_gone(conv.id)  # abandoned: the CTI layer withdraws its offers
        await self._stop_recording(conv)
        for other in conv.live_legs():
            if other.final_status:
                continue  # already being released
            other.released_by = "local" if leg.released_by != "system" else "system"
            if other.answered_at is None and other.role == "caller" and not answered:
                code = caller_response(leg.final_status, leg.sip_code)
                other.sip_code = code
                other.final_status = final_status(code, "", answered=False)
                await self._send(other.worker_id, Reject(leg=other.id, code=code))
            else:
                if leg.released_by == "system":
                    other.final_status = "failed"
                elif other.answered_at is not None:
                    other.final_status = "completed"
                else:
                    other.final_status = "canceled" if other.role == "callee" else "failed"
                await self._send(other.worker_id, Hangup(leg=other.id))
        if not conv.live_legs():
            self._conversation_ended(conv)

    async def _party_left(self, conv: Conversation, leg: Leg) -> bool:
        """A leg of a multi-party call ended: True when the call goes on without it (a supervisor, a
        consulted party before the transfer, a leg that left on purpose, one of a three-way call, the
        customer or the agent during a consultation); False when the others end with it."""
        for listener, source in list(conv.edges):
            if leg.id in (listener, source):
                conv.edges.discard((listener, source))
        if leg.room is not None:
            self._room_left(leg)
        refer = self._refers.pop(leg.id, None)
        if refer is not None:
            # The target of a phone's transfer failed: the transferor's phone hears so in the REFER's
            # NOTIFY and takes its party back.
            fields = self._refer_fields(conv, refer, leg.id)
            self.bus.publish(TransferFailed(**fields, reason=leg.final_status))
            return True
        if leg.role == "supervisor":
            self._supervision_ended(conv, leg)
            return True
        consult = conv.consult
        if consult is not None and leg.id == consult.recipient:
            await self._consult_ended(conv, leg)
            return True
        if leg.detached:
            return True
        if leg.id in conv.conference:
            self._conference_left(conv, leg, reason="hangup")
            if len([x for x in conv.live_legs() if x.role != "supervisor"]) >= 2:
                await self._supervision_refresh(conv)
                return True
            return False
        if consult is not None and leg.id == consult.transferee:
            # The held customer hung up: the agent and the consulted party talk on.
            conv.consult = None
            self.bus.publish(TransferFailed(**self._transfer_fields(conv, consult), reason="transferee_gone"))
            return consult.answered
        if consult is not None and leg.id == consult.initiator and consult.answered:
            # The agent hung up while talking to the consulted party: that completes the transfer (the
            # usual PBX behaviour of an attended transfer).
            conv.consult = None
            transferee, recipient = self.legs[consult.transferee], self.legs[consult.recipient]
            if transferee.ended or recipient.ended:
                return False
            await self._retrieve_into(transferee, recipient)
            if conv.a_leg == leg.id:
                conv.a_leg = transferee.id
            self.bus.publish(TransferCompleted(**self._transfer_fields(conv, consult)))
            await self._release_supervisor_of(conv, leg)
            return True
        return False

    def _unplaced(self, leg: Leg) -> None:
        """A leg the worker did not originate: it ends here, failed by the system (no leg.state comes)."""
        leg.move(LegState.ENDED)
        leg.ended_at = self.clock()
        leg.final_status, leg.released_by, leg.sip_code = "failed", "system", 500
        self._publish_ended(leg)

    def _publish_ended(self, leg: Leg) -> None:
        self._publish(
            CallEnded,
            leg,
            final_status=leg.final_status,
            released_by=leg.released_by,
            sip_code=leg.sip_code,
            cause=leg.cause,
            ring_s=round(leg.ring_seconds(), 3),
            talk_s=round(leg.talk_seconds(), 3),
            hold_s=0.0,
        )
        log.info("leg ended", call_id=leg.id, final_status=leg.final_status, sip_code=leg.sip_code,
                 released_by=leg.released_by)  # fmt: skip

    def _conversation_ended(self, conv: Conversation) -> None:
        now = self.clock()
        conv.move(ConversationState.ENDED)
        conv.ended_at = now
        timer = self._timers.pop(conv.id, None)
        if timer is not None:
            timer.cancel()
        callee = self._callee(conv)
        caller = self._caller(conv)
        main = callee if callee is not None and callee.answered_at else caller
        conv.final_status = main.final_status if main else "failed"
        self.bus.publish(
            ConversationEnded(
                conversation_id=conv.id,
                legs=tuple(i for i, x in conv.legs.items() if x.role != "link"),
                duration_s=round(now - conv.created_at, 3),
                final_status=conv.final_status,
            )
        )
        for leg_id in conv.legs:
            self.legs.pop(leg_id, None)
        self.conversations.pop(conv.id, None)
        self._locks.pop(conv.id, None)
        self._reroutes.pop(conv.id, None)

    # -- time limit -----------------------------------------------------------------------------

    def _arm_time_limit(self, conv: Conversation) -> None:
        assert conv.max_duration_s is not None
        loop = asyncio.get_running_loop()
        self._timers[conv.id] = loop.call_later(
            conv.max_duration_s, lambda: self._spawn(self._time_limit(conv.id))
        )

    async def _time_limit(self, conversation_id: str) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            return
        async with self._lock(conv.id):
            log.info("conversation reached its time limit", conversation_id=conv.id)
            for leg in conv.live_legs():
                leg.final_status, leg.released_by, leg.sip_code = "time_limit", "system", 200
                await self._send(leg.worker_id, Hangup(leg=leg.id))

    # -- helpers --------------------------------------------------------------------------------

    def _new_leg_id(self) -> str:
        return f"L{self._node}{next(self._leg_ids)}"

    @staticmethod
    def _caller(conv: Conversation) -> Leg | None:
        """The leg that started the conversation (an inbound caller, or an originating agent)."""
        if conv.a_leg is not None:
            return conv.legs.get(conv.a_leg)
        return next((leg for leg in conv.legs.values() if leg.role == "caller"), None)

    @staticmethod
    def _callee(conv: Conversation) -> Leg | None:
        return next((leg for leg in conv.legs.values() if leg.role in ("callee", "customer")), None)


def _user_of(uri: str) -> str:
    try:
        return parse_uri(uri).user or ""
    except SipError:
        return ""
