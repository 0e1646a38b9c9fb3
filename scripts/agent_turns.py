"""The agent loop through the bridge, step by step, as a browser client sees it (scripts/demo_summary.py).

- :func:`typed_turn`: a typed turn is answered (``mas_response``) and spoken (``0x01`` Ogg/Opus frames,
  then ``tts_done``);
- :func:`spoken_turn`: a WAV file (a voice-like buzz, written once under ``build/demo/``) is streamed as
  the microphone of an agent voice session, followed by silence; the STT's words come as ``transcript``
  events, the turn ends (``transcript`` final), the echo agent answers (``mas_response``, source
  ``voice``) and the reply is spoken into the same session.

Each returns ``[(line, ok), ...]``, one per step. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

SR = 24_000
FRAME = 1920
WAV = Path(__file__).resolve().parents[1] / "build" / "demo" / "spoken-turn.wav"
Steps = list[tuple[str, bool]]


class Listener:
    """Everything the bridge sends on one socket: events by type, and the audio frames."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.audio = 0

    async def until(self, kinds: set[str], timeout: float, **fields: Any) -> dict[str, Any] | None:
        """The next event of one of ``kinds`` (with ``fields``), or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await self.ws.receive(timeout=left)
            except TimeoutError:
                return None
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
                self.audio += 1
            elif msg.type == aiohttp.WSMsgType.TEXT:
                event: dict[str, Any] = json.loads(msg.data)
                self.events.append(event)
                if event.get("type") in kinds and all(event.get(k) == v for k, v in fields.items()):
                    return event
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return None
        return None


def write_wav(path: Path = WAV, seconds: float = 1.6) -> Path:
    """A voice-like signal (a 140 Hz buzz with harmonics, 4 Hz syllables), 24 kHz mono 16-bit."""
    if path.is_file():
        return path
    t = np.arange(int(seconds * SR)) / SR
    buzz = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    pcm = 0.2 * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)) * buzz
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SR)
        out.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def microphone_frames(path: Path, silence_s: float) -> list[bytes]:
    """The WAV file, then ``silence_s`` of silence, as one Ogg/Opus stream: one ``0x01`` frame per 80 ms."""
    import sphn

    with wave.open(str(path), "rb") as wav:
        if (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) != (1, 2, SR):
            raise ValueError(f"{path}: need mono 16-bit {SR} Hz")
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768
    pcm = np.concatenate([pcm, np.zeros(int(silence_s * SR), dtype=np.float32)])
    pcm = np.pad(pcm, (0, -len(pcm) % FRAME))
    writer = sphn.OpusStreamWriter(SR)
    return [b"\x01" + bytes(writer.append_pcm(pcm[i : i + FRAME])) for i in range(0, len(pcm), FRAME)]


async def typed_turn(url: str, words: str, timeout: float = 60) -> Steps:
    steps: Steps = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        listen = Listener(ws)
        ready = await listen.until({"ready"}, 10)
        await ws.send_json({"type": "text", "text": words})
        reply = await listen.until({"mas_response", "error"}, timeout)
        ok = reply is not None and reply["type"] == "mas_response"
        steps.append((f"Typed turn {words!r} -> {json.dumps(reply)[:160]}", ok))
        end = await listen.until({"tts_done", "tts_skipped"}, timeout) if ok else None
        steps.append(
            (
                f"Typed turn spoken: {listen.audio} audio frames, then {json.dumps(end)} "
                f"(TTS {(ready or {}).get('tts', '?')})",
                end is not None and end["type"] == "tts_done" and listen.audio > 0,
            )
        )
    return steps


async def spoken_turn(url: str, timeout: float = 60) -> Steps:
    steps: Steps = []
    wav = write_wav()
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        listen = Listener(ws)
        ready = await listen.until({"ready"}, 10)
        await ws.send_json({"type": "voice_start", "mode": "agent"})
        answer = await listen.until({"voice_ready", "voice_unavailable", "error"}, 20)
        agent = answer is not None and answer["type"] == "voice_ready" and answer.get("mode") == "agent"
        steps.append(
            (
                f"Spoken turn: voice_start agent -> {json.dumps(answer)} (STT {(ready or {}).get('asr')})",
                agent,
            )
        )
        if not agent:
            return steps

        async def microphone() -> None:
            for frame in microphone_frames(wav, silence_s=4.0):
                await ws.send_bytes(frame)
                await asyncio.sleep(0.08)

        mic = asyncio.create_task(microphone())
        try:
            final = await listen.until({"transcript"}, timeout, final=True)
            words = [e["text"] for e in listen.events if e.get("type") == "transcript" and not e.get("final")]
            steps.append(
                (
                    f"Spoken turn transcribed ({wav.name} as the microphone): {len(words)} words as heard, "
                    f"final {json.dumps((final or {}).get('text'))} (random weights: the words are noise)",
                    final is not None and bool(final.get("text")),
                )
            )
            reply = await listen.until({"mas_response"}, timeout, source="voice") if final else None
            steps.append((f"Spoken turn answered: {json.dumps(reply)[:160]}", reply is not None))
            audio_before = listen.audio
            end = (
                await listen.until({"tts_done", "tts_skipped", "tts_interrupted"}, timeout) if reply else None
            )
            steps.append(
                (
                    f"Spoken turn reply spoken: {listen.audio} audio frames, then {json.dumps(end)}",
                    end is not None and end["type"] == "tts_done" and listen.audio > audio_before,
                )
            )
        finally:
            mic.cancel()
            await asyncio.gather(mic, return_exceptions=True)
        await ws.send_json({"type": "voice_stop"})
        await listen.until({"voice_stopped"}, 10)
    return steps
