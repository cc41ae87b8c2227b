"""Tone generation and tone measurement for the media checks of the integration tests.

Each party of a test call sends its own sine tone (a WAV made with sox); what a party heard is measured
with the Goertzel algorithm (a single-bin DFT, G. Goertzel 1958, the detector ITU-T Q.24 era DTMF receivers
use) over the 16-bit PCM samples read with :mod:`wave`. Different tones per party prove who hears whom.
G.711 (ITU-T G.711, 8 kHz sampling) carries 300-3400 Hz, so every tone used here sits in that band.
"""

from __future__ import annotations

import array
import math
import shutil
import subprocess
import sys
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE_HZ = 8_000  # G.711 narrowband: the rate baresip's PCMU path runs at, so no resampling
TONE_AMPLITUDE = 0.5  # half scale: loud enough to dominate, far from clipping in the mu-law companding
DEFAULT_TONE_SECONDS = 60  # longer than any test call, so the tone never runs out mid-call
SOX_TIMEOUT_S = 30  # generating a minute of 8 kHz audio takes well under a second; bound it anyway
ANALYSIS_WINDOW_S = 0.25  # fine Goertzel block: 4 Hz resolution at 8 kHz, enough to tell 440 from 446
COARSE_WINDOW_S = 0.025  # coarse block: 40 Hz main lobe, so a 20 Hz scan step cannot miss a tone
SCAN_LOW_HZ = 100  # below the G.711 passband edge with margin (mains hum would sit at 50/60 Hz)
SCAN_HIGH_HZ = 3_800  # just under Nyquist for 8 kHz, above the G.711 band edge
COARSE_STEP_HZ = 20  # half the coarse main lobe: the scan lands inside every tone's lobe
FINE_SPAN_HZ = 40  # refine around the coarse peak over one coarse lobe each side
FINE_STEP_HZ = 2  # half the fine bin spacing
MAX_ANALYSIS_BLOCKS = 8  # blocks averaged per measurement: enough to ignore a glitch, bounded CPU in Python
SILENCE_RMS = 0.01  # a block quieter than -40 dBFS is silence (jitter-buffer warm-up, call set-up gaps)


class AudioError(Exception):
    """A tone could not be generated or a recording could not be analysed."""


def make_tone(path: Path, frequency_hz: float, *, seconds: float = DEFAULT_TONE_SECONDS) -> Path:
    """Write a mono 16-bit 8 kHz WAV holding a sine of ``frequency_hz`` (sox ``synth``)."""
    sox = shutil.which("sox")
    if sox is None:
        raise AudioError("sox is not installed: run `make test`, which installs it")
    command = [
        sox,
        "-n",
        "-r",
        str(SAMPLE_RATE_HZ),
        "-c",
        "1",
        "-b",
        "16",
        str(path),
        "synth",
        str(seconds),
        "sine",
        str(frequency_hz),
        "vol",
        str(TONE_AMPLITUDE),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SOX_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise AudioError(f"sox failed ({done.returncode}): {done.stderr.strip()}")
    return path


@dataclass(frozen=True)
class Recording:
    """Samples of the first channel of a WAV file, scaled to [-1, 1]."""

    rate_hz: int
    samples: tuple[float, ...]

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.rate_hz if self.rate_hz else 0.0


def read_wav(path: Path) -> Recording:
    """Read a PCM WAV (8, 16 or 32-bit, any channel count) into floats, keeping the first channel."""
    try:
        with wave.open(str(path), "rb") as wav:
            rate = wav.getframerate()
            width = wav.getsampwidth()
            channels = wav.getnchannels()
            frames = wav.readframes(wav.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise AudioError(f"cannot read {path}: {exc}") from exc
    if width not in (1, 2, 4):
        raise AudioError(f"{path}: unsupported sample width {width}")
    scale = float(1 << (8 * width - 1))
    if width == 1:  # 8-bit WAV is unsigned (RIFF convention)
        values = [b - 128 for b in frames]
    else:
        pcm = array.array("h" if width == 2 else "i", frames[: len(frames) - len(frames) % width])
        if sys.byteorder == "big":  # RIFF samples are little-endian
            pcm.byteswap()
        values = pcm.tolist()
    samples = [v / scale for v in values[::channels]]
    return Recording(rate_hz=rate, samples=tuple(samples))


def goertzel_power(samples: Sequence[float], rate_hz: int, frequency_hz: float) -> float:
    """Normalised power of ``frequency_hz`` in ``samples`` (Goertzel recurrence; 0.25 for a full-scale sine
    at exactly that frequency times the amplitude squared)."""
    n = len(samples)
    if n == 0:
        return 0.0
    coeff = 2.0 * math.cos(2.0 * math.pi * frequency_hz / rate_hz)
    s_prev = 0.0
    s_prev2 = 0.0
    for x in samples:
        s = x + coeff * s_prev - s_prev2
        s_prev2 = s_prev
        s_prev = s
    power = s_prev * s_prev + s_prev2 * s_prev2 - coeff * s_prev * s_prev2
    return power / (n * n)


def rms(samples: Sequence[float]) -> float:
    """Root mean square level of ``samples`` (1.0 = full scale square wave)."""
    if not samples:
        return 0.0
    return math.sqrt(sum(x * x for x in samples) / len(samples))


@dataclass(frozen=True)
class ToneMeasurement:
    """What one recording holds: its strongest frequency and how much of it was not silence."""

    path: Path
    duration_s: float
    voiced_s: float  # seconds of blocks louder than SILENCE_RMS
    level_rms: float  # mean RMS of the voiced blocks
    dominant_hz: float  # strongest frequency over the voiced blocks analysed (0.0 when all silent)
    dominance: float  # share of the coarse spectrum's power near dominant_hz (0..1)

    def power_ratio(self, wanted_hz: float, other_hz: float) -> float:
        """How many times stronger ``wanted_hz`` is than ``other_hz`` in this recording."""
        recording = read_wav(self.path)
        blocks = _voiced_blocks(recording)
        wanted = sum(goertzel_power(b, recording.rate_hz, wanted_hz) for b in blocks)
        other = sum(goertzel_power(b, recording.rate_hz, other_hz) for b in blocks)
        return wanted / other if other > 0 else math.inf

    def describe(self) -> str:
        return (
            f"{self.path.name}: {self.duration_s:.2f} s, voiced {self.voiced_s:.2f} s, "
            f"rms {self.level_rms:.3f}, dominant {self.dominant_hz:.0f} Hz ({self.dominance:.0%} of power)"
        )


def _blocks(recording: Recording) -> list[tuple[float, ...]]:
    size = max(1, int(recording.rate_hz * ANALYSIS_WINDOW_S))
    return [recording.samples[i : i + size] for i in range(0, len(recording.samples) - size + 1, size)]


def _voiced_blocks(recording: Recording) -> list[tuple[float, ...]]:
    voiced = [b for b in _blocks(recording) if rms(b) >= SILENCE_RMS]
    if len(voiced) <= MAX_ANALYSIS_BLOCKS:
        return voiced
    # Spread the analysed blocks evenly over the whole voiced stretch.
    stride = len(voiced) / MAX_ANALYSIS_BLOCKS
    return [voiced[int(i * stride)] for i in range(MAX_ANALYSIS_BLOCKS)]


def _spectrum(blocks: Sequence[Sequence[float]], rate_hz: int, frequencies: Sequence[float]) -> list[float]:
    return [sum(goertzel_power(b, rate_hz, f) for b in blocks) / len(blocks) for f in frequencies]


def measure_tone(path: Path) -> ToneMeasurement:
    """Find the dominant frequency of a recording: a coarse Goertzel scan of SCAN_LOW_HZ..SCAN_HIGH_HZ on
    short blocks, refined around the peak on long blocks (two stages keep pure Python fast)."""
    recording = read_wav(path)
    voiced_all = [b for b in _blocks(recording) if rms(b) >= SILENCE_RMS]
    blocks = _voiced_blocks(recording)
    if not blocks:
        return ToneMeasurement(path, recording.duration_s, 0.0, 0.0, 0.0, 0.0)
    rate = recording.rate_hz
    coarse_len = max(1, int(rate * COARSE_WINDOW_S))
    coarse_blocks = [b[:coarse_len] for b in blocks]
    coarse_freqs = [float(f) for f in range(SCAN_LOW_HZ, SCAN_HIGH_HZ + 1, COARSE_STEP_HZ)]
    coarse = _spectrum(coarse_blocks, rate, coarse_freqs)
    coarse_peak = coarse_freqs[max(range(len(coarse)), key=coarse.__getitem__)]
    fine_freqs = [
        coarse_peak + df
        for df in range(-FINE_SPAN_HZ, FINE_SPAN_HZ + 1, FINE_STEP_HZ)
        if SCAN_LOW_HZ <= coarse_peak + df <= SCAN_HIGH_HZ
    ]
    fine = _spectrum(blocks, rate, fine_freqs)
    dominant = fine_freqs[max(range(len(fine)), key=fine.__getitem__)]
    # Share of the coarse spectrum's power within one coarse lobe of the peak: near 1 for a clean tone,
    # low for noise or a mix of two tones.
    total = sum(coarse)
    lobe = sum(
        p for f, p in zip(coarse_freqs, coarse, strict=True) if abs(f - dominant) <= 2 * COARSE_STEP_HZ
    )
    return ToneMeasurement(
        path=path,
        duration_s=recording.duration_s,
        voiced_s=len(voiced_all) * ANALYSIS_WINDOW_S,
        level_rms=sum(rms(b) for b in voiced_all) / len(voiced_all),
        dominant_hz=dominant,
        dominance=lobe / total if total > 0 else 0.0,
    )


def tone_levels(path: Path, frequencies: Sequence[float], start_s: float, end_s: float) -> dict[float, float]:
    """The amplitude (full scale 1.0) of each of ``frequencies`` in the stretch ``start_s``..``end_s`` of a
    recording, averaged over ANALYSIS_WINDOW_S blocks: a mix of tones shows each of them (unlike
    :func:`measure_tone`, which finds the one dominant tone), and silence shows none."""
    recording = read_wav(path)
    rate = recording.rate_hz
    segment = recording.samples[int(start_s * rate) : int(end_s * rate)]
    size = max(1, int(rate * ANALYSIS_WINDOW_S))
    blocks = [segment[i : i + size] for i in range(0, len(segment) - size + 1, size)]
    if not blocks:
        raise AudioError(f"{path}: nothing recorded between {start_s:.2f} s and {end_s:.2f} s")
    # A sine of amplitude A over a whole block has Goertzel power A²/4 (see goertzel_power).
    return {
        f: sum(2.0 * math.sqrt(goertzel_power(b, rate, f)) for b in blocks) / len(blocks) for f in frequencies
    }
