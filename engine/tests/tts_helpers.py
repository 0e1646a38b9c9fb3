"""A small test client of the engine's ``/api/tts_streaming`` (real websockets, aiohttp)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import msgpack

from voice_engine.tiny import tts as tiny_tts

KEY = "public_token"


def tts_module(model_dir: Path, slots: int = 2, **options: Any) -> dict[str, Any]:
    """The engine configuration ``modules`` object for one tiny TTS module."""
    return {
        "tts": {
            "kind": "tts",
            "model_dir": str(model_dir),
            "voices_dir": str(model_dir / tiny_tts.VOICES_DIR_NAME),
            "slots": slots,
            "precision": "fp32",
            "device": "cpu",
            "options": options,
        }
    }


@dataclass
class Session:
    messages: list[Any] = field(default_factory=list)  # dicts (MessagePack formats) or bytes (raw)
    close_code: int | None = None
    close_reason: str = ""

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if isinstance(m, dict) and m.get("type") == kind]

    @property
    def types(self) -> list[str]:
        return [m["type"] if isinstance(m, dict) else "bytes" for m in self.messages]


def url(base: str, **query: Any) -> str:
    q = {k: v for k, v in query.items() if v is not None}
    return f"{base}/api/tts_streaming?{urlencode(q)}" if q else f"{base}/api/tts_streaming"


async def converse(
    ws_base: str,
    texts: Sequence[str | bytes] = ("hello this is a test",),
    *,
    eos: bool = True,
    fmt: str | None = "PcmMessagePack",
    voice: str | None = tiny_tts.DEFAULT_VOICE,
    key: str | None = KEY,
    query: dict[str, Any] | None = None,
    raw: Sequence[bytes] = (),
    wait_ready: bool = True,
    timeout_s: float = 60.0,
) -> Session:
    """Connect, (wait for Ready,) send ``raw`` frames, ``texts`` as Text messages (bytes as-is), Eos."""
    headers = {"kyutai-api-key": key} if key else {}
    session = Session()
    target = url(ws_base, format=fmt, voice=voice, **(query or {}))
    msgpack_format = fmt is not None and fmt.endswith("MessagePack")  # no format: raw OggOpus
    async with aiohttp.ClientSession() as http, http.ws_connect(target, headers=headers) as ws:

        async def receive() -> None:
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    data = bytes(msg.data)
                    session.messages.append(msgpack.unpackb(data) if msgpack_format else data)
                elif msg.type == aiohttp.WSMsgType.CLOSE:
                    session.close_reason = str(msg.extra or "")
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.ERROR,
                ):
                    return

        reader = asyncio.create_task(receive())
        if wait_ready and msgpack_format:
            for _ in range(200):
                if session.messages:
                    break
                await asyncio.sleep(0.02)
        frames = list(raw)
        frames += [t if isinstance(t, bytes) else msgpack.packb({"type": "Text", "text": t}) for t in texts]
        if eos:
            frames.append(msgpack.packb({"type": "Eos"}))
        try:
            for frame in frames:
                await ws.send_bytes(frame)
        except ConnectionResetError:
            pass  # the server closed the session (an error): what it sent is in `messages`
        await asyncio.wait_for(reader, timeout_s)
        session.close_code = ws.close_code
    return session


def tiny_tts_dir(models_root: Path) -> Path:
    """The tiny TTS set under ``models_root`` (session-scoped in conftest), made once per test run."""
    out = models_root / "tts"
    done = models_root / "tts.done"
    if not done.exists():
        tiny_tts.make(out, seed=0)
        done.write_text("ok\n")
    return out
