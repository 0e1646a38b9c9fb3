"""From the end of the user's speech to the first byte of the spoken reply, through the real bridge.

    python scripts/bench_agent_latency.py --stt DIR --tts DIR [--device cuda --precision bf16] [--turns 5]

Starts the engine (``asr`` and ``tts`` on the given model directories), an instant MAS stand-in
(scripts/mas_standin.py) and the bridge in agent mode, then speaks ``--turns`` turns as a browser
would: 1.6 s of a voice-like buzz as Ogg/Opus frames paced at 80 ms, then silence. Per turn it prints
the time from the last frame of speech sent to: the final ``transcript`` (the turn ended), the
``mas_response``, and the first reply audio frame; then the medians.

The turn ends on the bridge's settings: with random weights the STT's pause prediction is noise, so
the bench sets ``BRIDGE_ASR_PAUSE_THRESHOLD=0`` (the turn ends after ``BRIDGE_ASR_MIN_SILENCE_S`` of
silence) and the bridge then flushes the STT for its text delay (``BRIDGE_ASR_FLUSH_S``). Both are
printed: they are a fixed part of the figure, the rest is MAS and TTS time to first audio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave
from pathlib import Path
from typing import Any

import aiohttp
from agent_turns import Listener, microphone_frames, write_wav

HERE = Path(__file__).resolve().parent
KEY = "public_token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"{proc.args!r} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {timeout_s} s:\n{log.read_text(errors='replace')[-3000:]}")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _header(frame: bytes) -> bool:
    return b"OpusHead" in frame[:64] or b"OpusTags" in frame[:64]


async def one_turn(url: str, wav: Path, timeout: float) -> dict[str, float]:
    frames = microphone_frames(wav, silence_s=8.0)
    with wave.open(str(wav), "rb") as w:
        speech_frames = -(-w.getnframes() // 1920)  # the frames that hold the WAV's samples
    marks: dict[str, float] = {}
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        listen = Listener(ws)
        await listen.until({"ready"}, 10)
        await ws.send_json({"type": "voice_start", "mode": "agent"})
        if await listen.until({"voice_ready"}, 30) is None:
            raise SystemExit(f"no voice_ready: {listen.events[-3:]}")

        async def microphone() -> None:
            for index, frame in enumerate(frames):
                await ws.send_bytes(frame)
                if index == speech_frames - 1:
                    marks["speech_end"] = time.perf_counter()
                await asyncio.sleep(0.08)

        mic = asyncio.create_task(microphone())
        try:
            if await listen.until({"transcript"}, timeout, final=True) is None:
                raise SystemExit(f"no final transcript: {listen.events[-3:]}")
            marks["final"] = time.perf_counter()
            if await listen.until({"mas_response"}, timeout, source="voice") is None:
                raise SystemExit(f"no mas_response: {listen.events[-3:]}")
            marks["mas"] = time.perf_counter()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=timeout)
                # The first pages of the reply's Ogg stream are its headers (OpusHead, OpusTags),
                # relayed as soon as the TTS answers: the first audio is the first page after them.
                if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01" and not _header(msg.data):
                    break
            marks["audio"] = time.perf_counter()
        finally:
            mic.cancel()
            await asyncio.gather(mic, return_exceptions=True)
    end = marks["speech_end"]
    return {k: round((marks[k] - end) * 1000, 1) for k in ("final", "mas", "audio")}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stt", required=True, type=Path)
    parser.add_argument("--tts", required=True, type=Path)
    parser.add_argument("--voice", default="", help="a voice name in TTS_DIR/voices (default: the first)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--min-silence-s", default="0.3")
    parser.add_argument("--flush-s", default="0.5")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        engine_port, mas_port, bridge_port = free_port(), free_port(), free_port()
        module = {"device": args.device, "precision": args.precision, "slots": 1}
        config = {
            "host": "127.0.0.1",
            "port": engine_port,
            "api_keys": [KEY],
            "modules": {
                "asr": {"kind": "asr", "model_dir": str(args.stt), **module},
                "tts": {
                    "kind": "tts",
                    "model_dir": str(args.tts),
                    "voices_dir": str(args.tts / "voices"),
                    **module,
                },
            },
        }
        (tmp / "engine.json").write_text(json.dumps(config))
        env = {"NO_TORCH_COMPILE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        procs = []
        try:
            engine = start(
                [sys.executable, "-m", "voice_engine", "serve", "--config", str(tmp / "engine.json")],
                env,
                tmp / "engine.log",
            )
            procs.append(engine)
            mas = start(
                [sys.executable, str(HERE / "mas_standin.py"), "--port", str(mas_port)], {}, tmp / "mas.log"
            )
            procs.append(mas)
            started = time.monotonic()
            wait_http(f"http://127.0.0.1:{engine_port}/healthz", engine, 900, tmp / "engine.log")
            print(f"# engine ready in {time.monotonic() - started:.1f} s ({args.device}, {args.precision})")
            bridge_env = {
                "BRIDGE_HOST": "127.0.0.1",
                "BRIDGE_PORT": str(bridge_port),
                "BRIDGE_MAS_URL": f"http://127.0.0.1:{mas_port}/api/chat",
                "BRIDGE_ASR_URL": f"ws://127.0.0.1:{engine_port}/api/asr-streaming",
                "BRIDGE_ASR_KEY": KEY,
                "BRIDGE_TTS_URL": f"ws://127.0.0.1:{engine_port}/api/tts_streaming",
                "BRIDGE_TTS_KEY": KEY,
                "BRIDGE_TTS_VOICE": args.voice,
                "BRIDGE_ASR_PAUSE_THRESHOLD": "0",
                "BRIDGE_ASR_MIN_SILENCE_S": args.min_silence_s,
                "BRIDGE_ASR_FLUSH_S": args.flush_s,
            }
            bridge = start([sys.executable, "-m", "personaplex_bridge"], bridge_env, tmp / "bridge.log")
            procs.append(bridge)
            wait_http(f"http://127.0.0.1:{bridge_port}/healthz", bridge, 60, tmp / "bridge.log")
            wav = write_wav(tmp / "speech.wav")
            url = f"ws://127.0.0.1:{bridge_port}/ws"
            print(
                f"# {args.turns} turns; BRIDGE_ASR_MIN_SILENCE_S={args.min_silence_s}, "
                f"BRIDGE_ASR_FLUSH_S={args.flush_s}; times in ms after the last frame of speech was sent"
            )
            rows: list[dict[str, float]] = []
            for turn in range(args.turns):
                row = asyncio.run(one_turn(url, wav, args.timeout))
                rows.append(row)
                print(
                    f"turn {turn + 1}: turn ended {row['final']:8.1f}  mas_response {row['mas']:8.1f}  "
                    f"first reply audio {row['audio']:8.1f}",
                    flush=True,
                )
            med: dict[str, Any] = {
                k: statistics.median(r[k] for r in rows) for k in ("final", "mas", "audio")
            }
            print(
                f"median: turn ended {med['final']:.1f} ms, mas_response {med['mas']:.1f} ms, "
                f"first reply audio {med['audio']:.1f} ms (of which MAS + TTS to first audio: "
                f"{med['audio'] - med['final']:.1f} ms)"
            )
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
