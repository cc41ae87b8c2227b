"""The node's dialplan, checked against what its configuration and prompt set define."""

from __future__ import annotations

from softswitch.config import Config
from softswitch.dialplan.loader import load_dialplan
from softswitch.dialplan.matcher import Dialplan
from softswitch.prompts import PromptSet


def prompt_set(config: Config) -> PromptSet:
    return PromptSet(config.prompts.language, config.prompts.dir)


def load_configured_dialplan(config: Config) -> Dialplan:
    """Load `config.dialplan` with the configuration's names; raises DialplanError.

    Queues and trunks are checked once the configuration defines some: until then their routes answer
    callers with an error instead of keeping the node from starting. Users and prompts always are.
    """
    return load_dialplan(
        config.dialplan,
        users={u.name for u in config.users},
        queues={q.id for q in config.queues} or None,
        trunks={t.name for t in config.trunks} or None,
        prompts=prompt_set(config).names(),
    )
