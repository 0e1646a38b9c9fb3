"""What the agent voice tests share: a microphone of Ogg/Opus frames, a paced sender, the settings."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import sphn

from conftest import Client, base_settings
from personaplex_bridge.config import Settings

SR = 24_000
FRAME = 1920


class Mic:
    """One client's microphone: a single continuous Ogg/Opus stream, one page per 80 ms."""

    def __init__(self) -> None:
        self._writer = sphn.OpusStreamWriter(SR)
        self._t = 0

    def _encode(self, pcm: np.ndarray) -> bytes:
        return b"\x01" + bytes(self._writer.append_pcm(pcm.astype(np.float32)))

    def speech(self, frames: int) -> list[bytes]:
        """A voice-like signal: a 140 Hz buzz with harmonics under a 4 Hz syllable envelope."""
        out = []
        for _ in range(frames):
            t = (self._t + np.arange(FRAME)) / SR
            self._t += FRAME
            buzz = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
            envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
            out.append(self._encode(0.2 * envelope * buzz))
        return out

    def silence(self, frames: int) -> list[bytes]:
        out = []
        for _ in range(frames):
            self._t += FRAME
            out.append(self._encode(np.zeros(FRAME, dtype=np.float32)))
        return out


async def send(client: Client, frames: list[bytes], pace_s: float = 0.08) -> None:
    for frame in frames:
        await client.ws.send_bytes(frame)
        await asyncio.sleep(pace_s)


def agent_settings(mas: Any, engine: Any, **overrides: Any) -> Settings:
    values = {
        "asr_url": engine.asr_url,
        "asr_key": engine.key,
        "tts_url": engine.tts_url,
        "tts_key": engine.key,
        "tts_voice": engine.voice,
        "tts_timeout_s": 10.0,
        "asr_timeout_s": 10.0,
        "asr_pause_threshold": 0.0,
        "asr_barge_in_threshold": 1.0,
        "asr_min_silence_s": 0.3,
        "asr_flush_s": 0.5,
        **overrides,
    }
    return base_settings(mas.url, **values)
