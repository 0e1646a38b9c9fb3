"""16-bit mono PCM WAV files from float samples (no torch: the selftest's remote mode imports it)."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np


def write_wav(path: Path, pcm: np.ndarray[Any, Any], rate: int) -> None:
    """``pcm`` (floats in [-1, 1]) as 16-bit mono PCM at ``rate`` Hz; the same samples give the same bytes."""
    data = np.clip(np.round(pcm * 32767.0), -32768, 32767).astype("<i2").tobytes()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(data)
