"""Dialplan applications on one leg (softswitch/calls/apps.py), driven through a LegChannel whose worker
is scripted: the IVR menu's choice of action, barge-in, wrong keys and timeouts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from softswitch.calls.apps import LegChannel, ivr
from softswitch.dialplan import actions, parse_dialplan
from softswitch.media.protocol import Answer, Command, LegDtmf, Play, PlayerDone, StopPlay
from softswitch.prompts import PromptSet

MENU_YAML = """
version: 1
routes:
  - match: "7000"
    action: ivr
    menu: demo
ivr:
  demo:
    prompt: ivr_demo
    timeout_s: 0.2
    max_attempts: 2
    options:
      "1": {action: queue, queue: support}
      "2": {action: dial, target: "1002"}
    fallback: {action: hangup, code: 480}
"""


class Worker:
    """Answers every command like a media worker: a prompt plays to its end (player.done) unless the
    caller presses the key scripted for that prompt (by its number, from 1) while it plays."""

    def __init__(self, keys: dict[int, str] | None = None) -> None:
        self.commands: list[Command] = []
        self.keys = keys or {}
        self.channel: LegChannel | None = None

    async def __call__(self, cmd: Command) -> dict[str, Any]:
        self.commands.append(cmd)
        if isinstance(cmd, Play):
            assert self.channel is not None
            plays = sum(isinstance(c, Play) for c in self.commands)
            key = self.keys.get(plays)
            event = LegDtmf("w1-1", key, "rfc4733") if key else PlayerDone("w1-1")
            asyncio.get_running_loop().call_later(0.01, self.channel.inbox.put_nowait, event)
            return {"duration_s": 0.5}
        return {}

    def prompts(self) -> list[str]:
        return [Path(f).stem for c in self.commands if isinstance(c, Play) for f in c.files]


def _menu() -> actions.IvrMenu:
    return parse_dialplan(MENU_YAML, "test.yaml").menus["demo"]


async def _run(worker: Worker) -> actions.Action | None:
    channel = worker.channel = LegChannel("w1-1", worker)
    return await asyncio.wait_for(ivr(channel, _menu(), PromptSet(), number="7000", caller="1001"), timeout=5)


async def test_a_key_during_the_prompt_chooses_the_option() -> None:
    worker = Worker({1: "1"})
    chosen = await _run(worker)
    assert chosen == actions.Queue(queue="support")
    assert worker.commands[0] == Answer(leg="w1-1", code=200)
    assert StopPlay(leg="w1-1") in worker.commands  # the key stopped the prompt (barge-in)


async def test_a_wrong_key_hears_invalid_choice_then_the_prompt_again() -> None:
    worker = Worker({1: "9", 3: "2"})  # a wrong key in the first prompt, 2 in the third
    chosen = await _run(worker)
    assert isinstance(chosen, actions.Dial) and chosen.target == "1002"
    assert worker.prompts() == ["ivr_demo", "invalid_choice", "ivr_demo"]


async def test_no_key_in_every_attempt_runs_the_fallback() -> None:
    worker = Worker()
    chosen = await _run(worker)
    assert chosen == actions.Hangup(code=480)
    assert worker.prompts() == ["ivr_demo", "ivr_demo"]
