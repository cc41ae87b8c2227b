"""Shared test setup: where the checkout and its virtualenv are, and a clean environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SOFTSWITCH_EXE = REPO_ROOT / ".venv" / "bin" / "softswitch"

if str(REPO_ROOT) not in sys.path:  # `from tests.integration.helpers import …` from any test module
    sys.path.insert(0, str(REPO_ROOT))

from softswitch.config import env_override_key  # noqa: E402
from tests.integration.helpers import RunningSoftswitch, running_softswitch  # noqa: E402


@pytest.fixture(autouse=True)
def _no_config_overrides_from_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's SOFTSWITCH_<SECTION>_<KEY> variables must not change what a test configures."""
    for name in list(os.environ):
        if env_override_key(name) is not None:
            monkeypatch.delenv(name)


@pytest.fixture
def softswitch_exe() -> Path:
    """The installed console script; the suite runs against the checkout's own virtualenv."""
    if not SOFTSWITCH_EXE.exists():
        pytest.fail(
            f"{SOFTSWITCH_EXE} is missing: run `make test` (it creates .venv and installs the package)"
        )
    return SOFTSWITCH_EXE


@pytest.fixture
def softswitch_node(tmp_path: Path) -> Iterator[RunningSoftswitch]:
    """A running `softswitch serve` with the test configuration (tests/integration/helpers.py)."""
    with running_softswitch(tmp_path) as node:
        yield node
