"""``python -m voice_engine.probe``: check a running engine through its real protocols, as a client would.

    python -m voice_engine.probe --config /etc/voice-engine/voice-engine.json [--voice NAME] [--json]
    python -m voice_engine.probe --url http://127.0.0.1:8080 --key public_token --asr --tts --chat

``GET /healthz`` must answer 200; then, for each module kind served (read from the configuration, or
chosen with ``--asr`` / ``--tts`` / ``--chat``):

- ``asr``: a websocket session on ``/api/asr-streaming`` gets ``Ready``, then ``Step`` messages for the
  audio sent (``--seconds`` of a tone, in 80 ms frames), and the ``Marker`` sent after the audio;
- ``tts``: a session on ``/api/tts_streaming`` (``format=PcmMessagePack``) gets ``Ready``, then audio
  for the text sent, and the server closes after ``Eos``;
- ``chat``: a session on ``/api/chat`` (Moshi's protocol; ``--chat-voice NAME`` and ``--chat-text`` as
  PersonaPlex's ``voice_prompt`` / ``text_prompt``, else the module's defaults) gets the ``0x00``
  handshake after its prefill, then ``0x01`` Ogg/Opus audio for the ``--seconds`` of Opus sent.

Prints one JSON object (``--json``) or one line per check; exits 0 when everything answered, 1 otherwise,
2 on a bad argument or configuration. Used by the ``voice_engine`` role's health gate and its Molecule test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import sphn

from .config import ConfigError, load

FRAME = 1920  # samples per 80 ms at 24 kHz
SAMPLE_RATE = 24000
ASR_ROUTE = "/api/asr-streaming"
TTS_ROUTE = "/api/tts_streaming"
CHAT_ROUTE = "/api/chat"


def _tone(seconds: float) -> list[float]:
    count = max(FRAME, int(seconds * SAMPLE_RATE) // FRAME * FRAME)
    return [0.3 * math.sin(2 * math.pi * 440.0 * i / SAMPLE_RATE) for i in range(count)]


async def _receive(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> dict[str, Any] | None:
    """The next MessagePack message, or None when the server closed the socket."""
    msg = await ws.receive(timeout=timeout)
    if msg.type == aiohttp.WSMsgType.BINARY:
        value = msgpack.unpackb(msg.data, raw=False)
        if not isinstance(value, dict):
            raise ValueError(f"the server sent a MessagePack {type(value).__name__}, not a map")
        return value
    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
        return None
    raise ValueError(f"the server sent a {msg.type.name} frame")


async def _ready(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> None:
    first = await _receive(ws, timeout)
    if first is None:
        raise ValueError("the server closed the socket before Ready")
    if first.get("type") != "Ready":
        raise ValueError(f"the first message is {first!r}, not Ready")


async def probe_asr(
    session: aiohttp.ClientSession, base: str, key: str, pcm: Sequence[float], timeout: float
) -> dict[str, Any]:
    """One STT session for ``pcm`` (24 kHz floats): its Step and Word counts, and ``text``, the words."""
    result: dict[str, Any] = {"ready": False, "frames_sent": 0, "steps": 0, "words": 0, "marker": False}
    words: list[str] = []
    async with session.ws_connect(base + ASR_ROUTE, headers={"kyutai-api-key": key}) as ws:
        await _ready(ws, timeout)
        result["ready"] = True
        for start in range(0, len(pcm), FRAME):
            await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": pcm[start : start + FRAME]}))
            result["frames_sent"] += 1
        await ws.send_bytes(msgpack.packb({"type": "Marker", "id": 7}))
        silence = [0.0] * FRAME
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not result["marker"]:
            # Silence after the marker flushes the model's delay, as Kyutai's file client does.
            await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": silence}))
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no Marker within {timeout} s ({result['steps']} Step messages)")
            message = await _receive(ws, left)
            if message is None:
                raise ValueError("the server closed the socket before the Marker came back")
            kind = message.get("type")
            if kind == "Step":
                result["steps"] += 1
            elif kind == "Word":
                result["words"] += 1
                words.append(str(message.get("text", "")))
            elif kind == "Marker":
                result["marker"] = message.get("id") == 7
            elif kind == "Error":
                raise ValueError(f"Error from the server: {message.get('message')}")
    result["text"] = " ".join(words)
    return result


async def probe_tts(
    session: aiohttp.ClientSession, base: str, key: str, text: str, voice: str, timeout: float
) -> dict[str, Any]:
    result: dict[str, Any] = {"ready": False, "audio_messages": 0, "samples": 0, "words": 0, "closed": False}
    params = {"format": "PcmMessagePack", **({"voice": voice} if voice else {})}
    async with session.ws_connect(base + TTS_ROUTE, params=params, headers={"kyutai-api-key": key}) as ws:
        await _ready(ws, timeout)
        result["ready"] = True
        for word in text.split():
            await ws.send_bytes(msgpack.packb({"type": "Text", "text": word}))
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        while True:
            message = await _receive(ws, timeout)
            if message is None:
                result["closed"] = True
                break
            kind = message.get("type")
            if kind == "Audio":
                result["audio_messages"] += 1
                result["samples"] += len(message.get("pcm") or [])
            elif kind == "Text":
                result["words"] += 1
            elif kind == "Error":
                raise ValueError(f"Error from the server: {message.get('message')}")
    return result


async def probe_chat(
    session: aiohttp.ClientSession,
    base: str,
    key: str,
    seconds: float,
    prompts: dict[str, str],
    timeout: float,
) -> dict[str, Any]:
    result: dict[str, Any] = {"handshake": False, "frames_sent": 0, "audio_messages": 0, "text_pieces": 0}
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    params = {k: v for k, v in prompts.items() if v}
    async with session.ws_connect(base + CHAT_ROUTE, params=params, headers={"kyutai-api-key": key}) as ws:
        first = await ws.receive(timeout=timeout)
        if first.type != aiohttp.WSMsgType.BINARY or first.data[:1] != b"\x00":
            data = first.data if isinstance(first.data, bytes) else b""
            raise ValueError(f"the first message is {first.type.name} {data[:16]!r}, not the 0x00 handshake")
        result["handshake"] = True
        pcm = np.asarray(_tone(seconds), dtype=np.float32)
        for start in range(0, len(pcm), FRAME):
            page = writer.append_pcm(pcm[start : start + FRAME])
            if page:
                await ws.send_bytes(b"\x01" + page)
            result["frames_sent"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Audio for half the frames sent (Opus pages lag their frames): enough to show the model runs.
        while result["audio_messages"] < max(1, result["frames_sent"] // 2):
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"{result['audio_messages']} audio messages within {timeout} s")
            msg = await ws.receive(timeout=left)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise ValueError(f"the server sent a {msg.type.name} frame after the handshake")
            kind = msg.data[:1]
            if kind == b"\x01":
                result["audio_messages"] += 1
            elif kind == b"\x02":
                result["text_pieces"] += 1
            elif kind == b"\x05":
                raise ValueError(f"error from the server: {msg.data[1:].decode(errors='replace')}")
    return result


async def run(
    base: str,
    key: str,
    kinds: list[str],
    seconds: float,
    text: str,
    voice: str,
    timeout: float,
    chat_prompts: dict[str, str] | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {"url": base, "ok": False}
    client_timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        try:
            async with session.get(base + "/healthz") as response:
                report["healthz"] = response.status
                report["status"] = await (await session.get(base + "/status")).json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            report["error"] = f"GET /healthz: {exc!r}"
            return report
        ok = report["healthz"] == 200
        for kind in kinds:
            try:
                if kind == "asr":
                    result = await probe_asr(session, base, key, _tone(seconds), timeout)
                    good = result["steps"] > 0 and result["marker"]
                elif kind == "chat":
                    result = await probe_chat(session, base, key, seconds, chat_prompts or {}, timeout)
                    good = result["handshake"] and result["audio_messages"] > 0
                else:
                    result = await probe_tts(session, base, key, text, voice, timeout)
                    good = result["samples"] > 0 and result["closed"]
            except (aiohttp.ClientError, aiohttp.WSServerHandshakeError, TimeoutError, ValueError) as exc:
                result, good = {"error": f"{type(exc).__name__}: {exc}"}, False
            result["ok"] = good
            report[kind] = result
            ok = ok and good
        report["ok"] = ok
    return report


def _from_config(path: Path) -> tuple[str, str, list[str]]:
    cfg = load(path)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    return f"http://{host}:{cfg.port}", cfg.api_keys[0], sorted({m.kind for m in cfg.modules})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voice_engine.probe", description=__doc__)
    parser.add_argument("--config", help="the engine's JSON configuration (address, key and modules from it)")
    parser.add_argument("--url", help="http://HOST:PORT of the engine (instead of --config)")
    parser.add_argument("--key", default="public_token", help="kyutai-api-key (with --url)")
    parser.add_argument("--asr", action="store_true", help="check the asr route (with --url)")
    parser.add_argument("--tts", action="store_true", help="check the tts route (with --url)")
    parser.add_argument("--chat", action="store_true", help="check the chat route (with --url)")
    parser.add_argument("--voice", default="", help="TTS voice name (default: the engine's default voice)")
    parser.add_argument("--chat-voice", default="", help="chat voice_prompt (default: the module's default)")
    parser.add_argument("--chat-text", default="", help="chat text_prompt (default: the module's default)")
    parser.add_argument("--seconds", type=float, default=1.0, help="audio sent to the asr module")
    parser.add_argument("--text", default="hello from the probe", help="text sent to the tts module")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds any one wait may take")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.url):
        print("voice_engine.probe: give --config FILE or --url URL", file=sys.stderr)
        return 2
    if args.config:
        try:
            base, key, kinds = _from_config(Path(args.config))
        except (ConfigError, OSError) as exc:
            print(f"voice_engine.probe: {exc}", file=sys.stderr)
            return 2
    else:
        base, key = args.url.rstrip("/"), args.key
        kinds = [k for k, wanted in (("asr", args.asr), ("tts", args.tts), ("chat", args.chat)) if wanted]
    prompts = {"voice_prompt": args.chat_voice, "text_prompt": args.chat_text}
    report = asyncio.run(run(base, key, kinds, args.seconds, args.text, args.voice, args.timeout, prompts))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"GET {base}/healthz -> {report.get('healthz', report.get('error'))}")
        for kind in kinds:
            print(f"{kind}: {json.dumps(report[kind])}")
        print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
