"""Speak Moshi's websocket protocol to a running server and report what came back.

Usage::

    python -m moshi_tools.probe [--url ws://127.0.0.1:8998/api/chat] [--frames 20] [--timeout 60]

It waits for the ``0x00`` handshake, sends ``--frames`` Ogg/Opus frames of 80 ms (a quiet tone),
then collects the ``0x01`` audio and ``0x02`` text messages the model answers with. It prints one
JSON object and exits 0 when the handshake came and both kinds of answer arrived, 1 otherwise.
It needs aiohttp, numpy and sphn >= 0.2, all present in a Moshi venv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field

SAMPLE_RATE = 24000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz
KIND_HANDSHAKE, KIND_AUDIO, KIND_TEXT = 0, 1, 2


@dataclass
class ProbeResult:
    url: str
    handshake: bool = False
    handshake_s: float | None = None
    frames_sent: int = 0
    audio_messages: int = 0
    text_messages: int = 0
    text: str = ""
    error: str | None = None
    other_kinds: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.handshake and self.audio_messages > 0 and self.text_messages > 0 and not self.error


def opus_frames(count: int) -> list[bytes]:
    """``count`` Ogg/Opus chunks of 80 ms each: a quiet 220 Hz tone."""
    import numpy as np
    import sphn

    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    chunks: list[bytes] = []
    t = np.arange(FRAME_SAMPLES * count, dtype=np.float32) / SAMPLE_RATE
    pcm = (0.1 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
    for i in range(count):
        chunks.append(bytes(writer.append_pcm(pcm[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES])))
    return chunks


async def probe(url: str, frames: int = 20, timeout: float = 60.0, settle: float = 2.0) -> ProbeResult:
    """Run one conversation against ``url``."""
    import aiohttp

    result = ProbeResult(url=url)
    started = time.monotonic()
    chunks = opus_frames(frames)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws,
        ):
            first = await asyncio.wait_for(ws.receive(), timeout)
            if first.type != aiohttp.WSMsgType.BINARY or first.data[:1] != b"\x00":
                result.error = f"expected the 0x00 handshake, got {first.type.name}"
                return result
            result.handshake = True
            result.handshake_s = round(time.monotonic() - started, 3)

            async def receive() -> None:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                        continue
                    kind = msg.data[0]
                    if kind == KIND_AUDIO:
                        result.audio_messages += 1
                    elif kind == KIND_TEXT:
                        result.text_messages += 1
                        result.text += msg.data[1:].decode("utf-8", "replace")
                    else:
                        result.other_kinds.append(kind)

            receiver = asyncio.create_task(receive())
            try:
                for chunk in chunks:
                    if chunk:
                        await ws.send_bytes(b"\x01" + chunk)
                    result.frames_sent += 1
                    await asyncio.sleep(0.01)
                deadline = time.monotonic() + timeout
                # Wait until answers stop coming for `settle` seconds (or the deadline).
                last = (-1, -1)
                while time.monotonic() < deadline:
                    await asyncio.sleep(settle)
                    now = (result.audio_messages, result.text_messages)
                    if now == last and result.audio_messages > 0:
                        break
                    last = now
            finally:
                receiver.cancel()
                await asyncio.gather(receiver, return_exceptions=True)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moshi-probe")
    parser.add_argument("--url", default="ws://127.0.0.1:8998/api/chat")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    result = asyncio.run(probe(args.url, args.frames, args.timeout))
    print(json.dumps(asdict(result) | {"ok": result.ok}))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
