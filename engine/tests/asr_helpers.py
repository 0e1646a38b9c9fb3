"""Shared by the ASR tests: the tiny STT model set (made once per run) and test audio."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from voice_engine.tiny import stt

FRAME = 1920
SAMPLE_RATE = 24000


def stt_model_dir(models_root: Path, seed: int = 0) -> Path:
    """The tiny STT set under the session's ``models_root``, generated on first use."""
    out = models_root / f"stt-{seed}"
    if not (out / "config.json").is_file():
        stt.make(out, seed)
    return out


def noise(seconds: float, seed: int, level: float = 0.3) -> np.ndarray:
    """Seeded white noise (the tiny model turns it into words and word ends)."""
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def tone(seconds: float, freq: float = 440.0, level: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (level * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def frames(audio: np.ndarray) -> list[np.ndarray]:
    whole = len(audio) // FRAME
    return [audio[i * FRAME : (i + 1) * FRAME] for i in range(whole)]
