"""Shared pieces of the chat tests: tiny model sets, module configuration, a Moshi-protocol client."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import numpy as np
import sphn

from voice_engine.tiny import chat as tiny_chat

KEY = "public_token"
FRAME = 1920


def tiny_chat_dir(root: Path, flavor: str) -> Path:
    """The tiny set of ``flavor`` (made once per test run)."""
    out = root / f"chat-{flavor}"
    if not (out / "config.json").is_file():
        tiny_chat.make(out, 0, flavor)
    return out


def chat_module(model_dir: Path, slots: int, **options: Any) -> dict[str, Any]:
    module: dict[str, Any] = {
        "kind": "chat",
        "model_dir": str(model_dir),
        "slots": slots,
        "precision": "fp32",
        "device": "cpu",
        "options": options,
    }
    if (model_dir / "voices").is_dir():
        module["voices_dir"] = str(model_dir / "voices")
    return {"chat": module}


def user_frames(seed: int, n: int) -> list[np.ndarray]:
    """``n`` frames of seeded noise bursts and tones (a stand-in for a user's voice)."""
    rng = np.random.default_rng(seed)
    t = np.arange(FRAME) / 24000
    frames = []
    for i in range(n):
        tone = 0.3 * np.sin(2 * np.pi * (150 + 40 * (i % 5)) * t)
        frames.append((tone + 0.05 * rng.standard_normal(FRAME)).astype(np.float32))
    return frames


@dataclass
class Conversation:
    status: int | None = None  # HTTP status when the upgrade was refused
    body: Any = None  # its JSON body
    handshake_s: float | None = None
    before_handshake: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)  # after the handshake, in order

    def of(self, kind: int) -> list[bytes]:
        return [m[1:] for m in self.messages if m[:1] == bytes([kind])]

    @property
    def audio(self) -> list[bytes]:
        return self.of(1)

    @property
    def text(self) -> list[str]:
        return [m.decode() for m in self.of(2)]

    @property
    def errors(self) -> list[str]:
        return [m.decode() for m in self.of(5)]

    @property
    def settled(self) -> list[bytes]:
        """The messages up to the last audio message (a last step's text may still be in flight)."""
        last = max((i for i, m in enumerate(self.messages) if m[:1] == b"\x01"), default=-1)
        return self.messages[: last + 1]

    def pcm(self) -> np.ndarray:
        reader = sphn.OpusStreamReader(24000)
        parts = [np.asarray(reader.append_bytes(page), dtype=np.float32) for page in self.audio]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def url(base: str, **query: Any) -> str:
    q = {"auth_id": KEY, **{k: v for k, v in query.items() if v is not None}}
    return f"{base}/api/chat?{urlencode(q)}"


async def converse(
    base: str,
    frames: list[np.ndarray],
    *,
    expect_audio: int | None = None,
    pace_s: float = 0.0,
    extra: list[bytes] | None = None,
    timeout_s: float = 30.0,
    **query: Any,
) -> Conversation:
    """Connect, wait for 0x00, send ``frames`` as Ogg/Opus (after the ``extra`` raw messages), read until
    ``expect_audio`` audio messages came back (default: one per frame), then close."""
    conv = Conversation()
    expect = len(frames) if expect_audio is None else expect_audio
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(url(base, **query), timeout=aiohttp.ClientWSTimeout(ws_close=5))
        except aiohttp.WSServerHandshakeError as exc:
            conv.status = exc.status
            async with http.get(url(base, **query).replace("ws://", "http://")) as resp:
                conv.body = await resp.json()
                conv.status = resp.status
            return conv
        started = time.monotonic()
        async with ws:
            async with asyncio.timeout(timeout_s):
                while True:
                    msg = await ws.receive()
                    assert msg.type == aiohttp.WSMsgType.BINARY, msg
                    if msg.data == b"\x00":
                        conv.handshake_s = time.monotonic() - started
                        break
                    conv.before_handshake.append(msg.data)
                writer = sphn.OpusStreamWriter(24000)

                async def send() -> None:
                    for data in extra or []:
                        await ws.send_bytes(data)
                    for frame in frames:
                        await ws.send_bytes(b"\x01" + writer.append_pcm(frame))
                        if pace_s:
                            await asyncio.sleep(pace_s)

                sender = asyncio.create_task(send())
                audio = 0
                while audio < expect or not sender.done():
                    if audio >= expect and not sender.done():
                        await sender
                        continue
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    conv.messages.append(msg.data)
                    audio += msg.data[:1] == b"\x01"
                await sender
    return conv


def talk(base: str, frames: list[np.ndarray], **kw: Any) -> Conversation:
    return asyncio.run(converse(base, frames, **kw))
