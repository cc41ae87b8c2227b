"""The prompt set: named WAV files the media workers play (8 kHz, 16-bit mono PCM).

Prompts are looked up by name (``enter_digits``, ``digit_5``) in this order: the operator's directory
(``[prompts] dir``), first its ``{language}/`` folder, then its top level; then the shipped set under
``softswitch/prompts/sounds/{language}/``; then ``sounds/common/`` (music on hold, no speech). The
shipped set is rendered by ``scripts/build-prompts.sh`` (espeak-ng) in English (``en``) and Mandarin
(``zh``); an operator replaces any prompt with a recording of the same name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Final

SHIPPED_DIR: Final = Path(__file__).resolve().parent / "sounds"
LANGUAGES: Final = ("en", "zh")
COMMON: Final = "common"
NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The prompt of every character a caller can key (RFC 4733 §3.2 events 0-11).
DIGIT_PROMPTS: Final = {**{str(d): f"digit_{d}" for d in range(10)}, "*": "digit_star", "#": "digit_pound"}


class PromptError(LookupError):
    """A prompt name that is malformed or found nowhere."""


class PromptSet:
    """Resolves prompt names to absolute WAV paths for one default language."""

    def __init__(self, language: str = "en", directory: Path | None = None) -> None:
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
        self.language = language
        self.directory = directory

    def _folders(self, language: str) -> list[Path]:
        folders = []
        if self.directory is not None:
            folders += [self.directory / language, self.directory]
        return [*folders, SHIPPED_DIR / language, SHIPPED_DIR / COMMON]

    def path(self, name: str, language: str | None = None) -> Path:
        """The WAV file of prompt ``name``; PromptError naming where it was looked for."""
        if not NAME_RE.fullmatch(name):
            raise PromptError(f"bad prompt name {name!r}: letters, digits, '.', '_' or '-' only")
        folders = self._folders(language or self.language)
        for folder in folders:
            candidate = folder / f"{name}.wav"
            if candidate.is_file():
                return candidate.resolve()
        raise PromptError(f"no prompt {name!r} in {', '.join(str(f) for f in folders)}")

    def has(self, name: str) -> bool:
        try:
            self.path(name)
        except PromptError:
            return False
        return True

    def names(self) -> set[str]:
        """Every prompt name available in the default language."""
        found: set[str] = set()
        for folder in self._folders(self.language):
            if folder.is_dir():
                found.update(p.stem for p in folder.glob("*.wav") if NAME_RE.fullmatch(p.stem))
        return found

    def digits(self, text: Iterable[str], language: str | None = None) -> list[Path]:
        """The prompts that read ``text`` (0-9, ``*``, ``#``) one key at a time."""
        paths = []
        for char in text:
            name = DIGIT_PROMPTS.get(char)
            if name is None:
                raise PromptError(f"no prompt reads {char!r}: digits, '*' and '#' only")
            paths.append(self.path(name, language))
        return paths
