"""The CTI snapshot in the store: save, load, replace, per node, and a restart that restores it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from softswitch.config import AgentConfig, QueueConfig
from softswitch.cti.core import CtiCore
from softswitch.cti.queues import QueuedCall
from softswitch.store.agents import CtiStateStore
from softswitch.store.db import Store

T0 = 1_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'softswitch.db'}")
    yield store
    store.close()


def make_core() -> CtiCore:
    agents = [
        AgentConfig(id="8001", password="x", extension="1001", queues=["support"]),
        AgentConfig(id="8002", password="x", extension="1002", queues=["support"]),
    ]
    return CtiCore(agents, [QueueConfig(id="support")], users=["1001", "1002"])


def test_nothing_saved_loads_none(store: Store) -> None:
    assert CtiStateStore(store, "node-1").load() is None


def test_save_load_replace_and_clear(store: Store) -> None:
    core = make_core()
    core.device_registered("1001", T0)
    core.login("8001", T0)
    core.login("8002", T0)  # offline: 1002 is not registered
    core.call_queued("support", QueuedCall("CV1", "CA1", from_="+86"), T0)
    states = CtiStateStore(store, "node-1")
    states.save(core.snapshot(), T0)
    assert states.load() == core.snapshot()

    core.offer_answered("8001", "CV1", T0 + 1)
    states.save(core.snapshot(), T0 + 1)
    assert states.load() == core.snapshot()
    assert CtiStateStore(store, "node-2").load() is None  # nodes keep their own snapshot
    states.clear()
    assert states.load() is None


def test_a_restart_restores_from_the_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    first = Store(url)
    core = make_core()
    core.device_registered("1001", T0)
    core.login("8001", T0, state="not_ready", reason="break")
    CtiStateStore(first, "node-1").save(core.snapshot(), T0)
    first.close()

    second = Store(url)
    snapshot = CtiStateStore(second, "node-1").load()
    second.close()
    restarted = make_core()
    restarted.restore(snapshot, ["1001"], [], T0 + 60)
    agent = restarted.agent("8001")
    assert (agent.state.value, agent.reason, agent.logged_in_at) == ("not_ready", "break", T0)


def test_long_ids_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="agent id longer"):
        CtiStateStore(store, "n").save({"version": 1, "agents": {"x" * 200: {}}, "queues": {}}, T0)
