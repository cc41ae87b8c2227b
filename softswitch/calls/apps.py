"""Dialplan applications that run on one answered leg: prompts, digit collection, read-back.

An application talks to its leg through a :class:`LegChannel`: commands go to the leg's media worker,
and the worker's events for that leg (DTMF, player finished, disconnected) arrive in the channel's inbox,
fed by call control. The application never touches call state; call control publishes the events and
closes the leg when it ends, whoever ends it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from softswitch.dialplan import actions
from softswitch.media.protocol import Answer, Command, Event, LegDtmf, LegState, Play, PlayerDone, StopPlay
from softswitch.prompts import PromptSet

#: Digits a caller may key in one collection (a phone number with a country code and an extension).
MAX_DIGITS: Final = 24
#: Seconds to wait for the first key after the prompt ended, and between keys.
FIRST_DIGIT_TIMEOUT_S: Final = 10.0
INTER_DIGIT_TIMEOUT_S: Final = 5.0
#: The key that ends a collection (it is not part of the digits).
TERMINATOR: Final = "#"
#: A player.done that never comes (a worker that lost the leg's player) must not hold the leg forever.
PLAY_SLACK_S: Final = 5.0


class LegGone(Exception):
    """The leg was disconnected (or its worker is gone) while the application ran."""


Sender = Callable[[Command], Awaitable[dict[str, object] | None]]


class LegChannel:
    """One leg as an application sees it."""

    def __init__(self, leg_id: str, send: Sender, clock: Callable[[], float] = time.monotonic) -> None:
        self.leg_id = leg_id
        self._send = send
        self._clock = clock
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self._pending_digits: list[str] = []

    async def command(self, cmd: Command) -> dict[str, object]:
        result = await self._send(cmd)
        if result is None:
            raise LegGone(f"{cmd.type} on leg {self.leg_id} failed")
        return result

    async def answer(self) -> None:
        await self.command(Answer(leg=self.leg_id, code=200))

    async def _next(self, timeout_s: float | None) -> Event | None:
        """The leg's next event, or None when ``timeout_s`` passed; LegGone when it disconnected."""
        try:
            event = await asyncio.wait_for(self.inbox.get(), timeout_s)
        except TimeoutError:
            return None
        if isinstance(event, LegState) and event.state == "disconnected":
            raise LegGone(event.reason)
        return event

    async def play(self, files: list[Path], *, barge_in: bool = False) -> str:
        """Play ``files`` to the end; with ``barge_in`` a key pressed stops the prompt and is returned
        (and kept as the first digit of the next :meth:`collect`). Returns "" when the prompt ended."""
        result = await self.command(Play(leg=self.leg_id, files=[str(f) for f in files]))
        length = result.get("duration_s")
        limit = (float(length) if isinstance(length, int | float) else 0.0) + PLAY_SLACK_S
        deadline = self._clock() + limit
        while True:
            event = await self._next(max(0.0, deadline - self._clock()))
            if event is None or isinstance(event, PlayerDone):
                return ""
            if isinstance(event, LegDtmf) and barge_in:
                await self.command(StopPlay(leg=self.leg_id))
                self._pending_digits.append(event.digit)
                return event.digit

    async def key(self, timeout_s: float) -> str:
        """One key: one pressed during the last prompt (barge-in), or the next within `timeout_s`; "" if
        none came."""
        if self._pending_digits:
            first, self._pending_digits = self._pending_digits[0], []
            return first
        deadline = self._clock() + timeout_s
        while (remaining := deadline - self._clock()) > 0:
            event = await self._next(remaining)
            if isinstance(event, LegDtmf):
                return event.digit
        return ""

    async def collect(
        self,
        *,
        max_digits: int = MAX_DIGITS,
        terminator: str = TERMINATOR,
        first_timeout_s: float = FIRST_DIGIT_TIMEOUT_S,
        inter_timeout_s: float = INTER_DIGIT_TIMEOUT_S,
    ) -> str:
        """Keys until ``terminator``, ``max_digits`` keys, or a pause; the terminator is not included."""
        digits = ""
        pending, self._pending_digits = self._pending_digits, []
        for digit in pending:
            if digit == terminator:
                return digits
            digits += digit
        while len(digits) < max_digits:
            event = await self._next(inter_timeout_s if digits else first_timeout_s)
            if event is None:
                break
            if isinstance(event, LegDtmf):
                if event.digit == terminator:
                    break
                digits += event.digit
        return digits


async def playback(channel: LegChannel, action: actions.Playback, prompts: PromptSet) -> None:
    """`playback`: answer, play the prompt; with `then: readback`, collect keys and read them back."""
    await channel.answer()
    readback = action.then == "readback"
    await channel.play([prompts.path(action.prompt)], barge_in=readback)
    if readback:
        digits = await channel.collect()
        if digits:
            files = [prompts.path("you_entered"), *prompts.digits(digits)]
        else:
            files = [prompts.path("no_digits")]
        await channel.play([*files, prompts.path("goodbye")])


async def ivr(
    channel: LegChannel,
    menu: actions.IvrMenu,
    prompts: PromptSet,
    *,
    number: str,
    caller: str,
    answered: bool = False,
) -> actions.Action | None:
    """`ivr`: answer, play the menu's prompt (a key stops it), wait `timeout_s` for one key; a key with an
    option gives its action; no key or a wrong one plays the prompt again (a wrong key first hears
    `invalid_choice`), up to `max_attempts` in all; then the `fallback` (None: hang up)."""
    if not answered:
        await channel.answer()
    for _ in range(menu.max_attempts):
        await channel.play([prompts.path(menu.prompt)], barge_in=True)
        digit = await channel.key(menu.timeout_s)
        chosen = menu.choose(digit, number=number, caller=caller) if digit else None
        if chosen is not None:
            return chosen
        if digit:
            await channel.play([prompts.path("invalid_choice")])
    return menu.fallback_action(number=number, caller=caller)
