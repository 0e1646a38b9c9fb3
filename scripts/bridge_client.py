"""A real browser-side client of the bridge, run on a test host with a Python that has aiohttp, numpy
and sphn (the Moshi or the engine venv).

    python bridge_client.py voice --sessions N [--frames 20] [--url ws://127.0.0.1:8999/ws]
        [--mode duplex] [--voice-prompt NATF2.pt] [--text-prompt "You are ..."]
    python bridge_client.py text --text "hello"

Prints one JSON object: for voice, per session the ready event, the backend and what came back;
for text, the ready event and the mas_response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
import sphn

SAMPLE_RATE = 24000
FRAME = 1920  # 80 ms


def opus_frames(count: int) -> list[bytes]:
    """``count`` Ogg/Opus chunks of 80 ms each: a quiet 220 Hz tone (the first may be empty)."""
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    t = np.arange(FRAME * count, dtype=np.float32) / SAMPLE_RATE
    pcm = (0.1 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
    return [bytes(writer.append_pcm(pcm[i * FRAME : (i + 1) * FRAME])) for i in range(count)]


async def next_event(
    ws: aiohttp.ClientWebSocketResponse, wanted: set[str], timeout: float = 30
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                event: dict[str, Any] = json.loads(msg.data)
                if event["type"] in wanted:
                    return event
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise ConnectionError(f"closed while waiting for {wanted}")


async def voice_session(
    url: str, frames: int, opened: asyncio.Barrier, start: dict[str, str]
) -> dict[str, Any]:
    result: dict[str, Any] = {"audio": 0, "moshi_text": 0}
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        result["ready"] = await next_event(ws, {"ready"})
        await ws.send_json({"type": "voice_start", **start})
        answer = await next_event(ws, {"voice_ready", "voice_unavailable"})
        result["answer"] = answer
        # Every session holds its backend until all have asked for one: they are concurrent.
        await opened.wait()
        if answer["type"] != "voice_ready":
            return result
        for chunk in opus_frames(frames):
            if chunk:
                await ws.send_bytes(b"\x01" + chunk)
            await asyncio.sleep(0.02)
        try:
            async with asyncio.timeout(20):
                while result["audio"] < frames // 2:
                    msg = await ws.receive()
                    if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
                        result["audio"] += 1
                    elif msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "moshi_text":
                        result["moshi_text"] += 1
        except TimeoutError:
            pass
        await ws.send_json({"type": "voice_stop"})
        await next_event(ws, {"voice_stopped"})
    return result


async def voice(url: str, sessions: int, frames: int, start: dict[str, str]) -> dict[str, Any]:
    """Concurrent Moshi voice sessions; ``start`` adds to voice_start (mode "duplex" where the bridge also
    has an STT, whose default is agent mode; PersonaPlex's voice_prompt and text_prompt)."""
    opened = asyncio.Barrier(sessions)
    results = await asyncio.gather(*(voice_session(url, frames, opened, start) for _ in range(sessions)))
    return {"sessions": list(results)}


async def text(url: str, words: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        ready = await next_event(ws, {"ready"})
        await ws.send_json({"type": "text", "text": words})
        reply = await next_event(ws, {"mas_response", "error"})
    return {"ready": ready, "reply": reply}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("voice", "text"))
    parser.add_argument("--url", default="ws://127.0.0.1:8999/ws")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--text", default="hello from the multihost scenario")
    parser.add_argument("--mode", default="")
    parser.add_argument("--voice-prompt", default="")
    parser.add_argument("--text-prompt", default="")
    args = parser.parse_args()
    if args.kind == "voice":
        fields = {"mode": args.mode, "voice_prompt": args.voice_prompt, "text_prompt": args.text_prompt}
        start = {k: v for k, v in fields.items() if v}
        outcome = asyncio.run(voice(args.url, args.sessions, args.frames, start))
    else:
        outcome = asyncio.run(text(args.url, args.text))
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
