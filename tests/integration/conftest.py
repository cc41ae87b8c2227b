"""Fixtures for the integration tests against real peers (SIPp, baresip) on 127.0.0.1.

Nothing is skipped: a missing peer binary fails the test with a message saying how to install it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.audio import AudioError, make_tone
from tests.integration.helpers import RunningSoftswitch, running_softswitch
from tests.integration.peers import Baresip, PeerError, Sipp

#: Edge settings the peer tests rely on: a 1 s minimum registration interval so expiry can be watched
#: within a test, and a block after 3 failed digest attempts so the 403 comes quickly.
EDGE_TEST_TOML = """
[sip]
min_expires = 1
auth_max_failures = 3
"""
EDGE_AUTH_MAX_FAILURES = 3  # keep equal to auth_max_failures above

#: The demo users of the test configuration (tests/integration/helpers.py).
DEMO_PASSWORDS = {f"100{i}": f"demo100{i}" for i in range(1, 5)}

TONE_A_HZ = 440.0  # the caller's tone (A4)
TONE_B_HZ = 660.0  # the callee's tone: a fifth above, far outside 440's analysis lobe


@dataclass(frozen=True)
class Tones:
    """WAV files each party sends as its microphone."""

    a: Path  # TONE_A_HZ
    b: Path  # TONE_B_HZ


@pytest.fixture(scope="session")
def tones(tmp_path_factory: pytest.TempPathFactory) -> Tones:
    directory = tmp_path_factory.mktemp("tones")
    try:
        return Tones(
            a=make_tone(directory / "tone-a.wav", TONE_A_HZ),
            b=make_tone(directory / "tone-b.wav", TONE_B_HZ),
        )
    except AudioError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def sipp(tmp_path: Path) -> Sipp:
    """A SIPp runner whose runs keep their traces under the test's tmp_path."""
    try:
        return Sipp(tmp_path / "sipp")
    except PeerError as exc:
        pytest.fail(str(exc))


class PhoneFactory:
    """Creates baresip phones for one test and stops every one of them afterwards."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.phones: list[Baresip] = []

    def start(
        self,
        user: str,
        tone: Path,
        *,
        registrar_port: int | None = None,
        password: str | None = None,
        transport: str = "udp",
        answermode: str = "auto",
    ) -> Baresip:
        """Start a phone for ``user`` sending ``tone``; with ``registrar_port`` it registers there using
        the demo password of ``user`` unless ``password`` is given."""
        if registrar_port is not None and password is None:
            password = DEMO_PASSWORDS.get(user)
        try:
            phone = Baresip(
                self.workdir,
                user=user,
                tone_wav=tone,
                password=password,
                registrar_port=registrar_port,
                transport=transport,
                answermode=answermode,
            )
        except PeerError as exc:
            pytest.fail(str(exc))
        self.phones.append(phone)
        phone.start()
        return phone

    def stop_all(self) -> None:
        for phone in reversed(self.phones):
            phone.stop()


@pytest.fixture
def phones(tmp_path: Path) -> Iterator[PhoneFactory]:
    factory = PhoneFactory(tmp_path / "phones")
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[RunningSoftswitch]:
    """A running softswitch with the demo users and EDGE_TEST_TOML."""
    with running_softswitch(tmp_path / "node", EDGE_TEST_TOML) as node:
        yield node
