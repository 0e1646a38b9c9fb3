"""Kyutai's published STT client, message for message, against a real engine process.

Our own rewrite (not a copy) of the message logic of ``scripts/stt_from_file_rust_server.py`` in
kyutai-labs/delayed-streams-modeling at commit f6074cb684fcf3c46161f1c3abda3c0805e10d18, with the
same libraries (``websockets``, ``msgpack``, ``sphn``, ``numpy``):

* connect to ``<url>/api/asr-streaming`` with the header ``kyutai-api-key`` (or ``?auth_id=``);
* send ``{"type": "Audio", "pcm": [...]}`` packed with ``msgpack.packb(..., use_single_float=True)``
  (no ``use_bin_type``): first one second of silence, then the file (read with ``sphn.read`` at
  24 kHz) in 1920-sample chunks paced at ``rtf`` times real time, then five seconds of silence one
  second per message, then ``{"type": "Marker", "id": 0}``, then 35 more seconds of silence;
* meanwhile read every message with ``msgpack.unpackb(message, raw=False)``: skip ``Step``; a ``Word``
  appends ``{text, timestamp: [start_time, start_time]}``; an ``EndWord`` sets the last word's end to
  ``stop_time``; a ``Marker`` ends the reading; the transcript is the list of words.

The test checks that this client gets a transcript, and that it is exactly what the engine's model
gives for the same audio stream when stepped directly (same words, same times).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import sphn
import torch
import websockets

from asr_helpers import FRAME, SAMPLE_RATE, frames, noise, stt_model_dir
from voice_engine.models.asr import AsrStepper

RTF = 50.0  # the script's --rtf: how much faster than real time the file is fed


def load_and_process_audio(path: Path) -> np.ndarray:
    pcm, _ = sphn.read(str(path), sample_rate=SAMPLE_RATE)
    return pcm[0]


async def receive_messages(ws: Any) -> list[dict[str, Any]]:
    transcript: list[dict[str, Any]] = []
    async for message in ws:
        data = msgpack.unpackb(message, raw=False)
        if data["type"] == "Step":
            continue
        if data["type"] == "Word":
            transcript.append({"text": data["text"], "timestamp": [data["start_time"], data["start_time"]]})
        if data["type"] == "EndWord" and transcript:
            transcript[-1]["timestamp"][1] = data["stop_time"]
        if data["type"] == "Marker":
            break
    return transcript


async def send_messages(ws: Any, audio: np.ndarray, rtf: float) -> None:
    async def send_audio(pcm: Any) -> None:
        await ws.send(msgpack.packb({"type": "Audio", "pcm": [float(x) for x in pcm]}, use_single_float=True))

    await send_audio([0.0] * SAMPLE_RATE)
    start = time.time()
    for i in range(0, len(audio), FRAME):
        await send_audio(audio[i : i + FRAME])
        expected = start + (i + 1) / SAMPLE_RATE / rtf
        now = time.time()
        await asyncio.sleep(expected - now if now < expected else 0.001)
    for _ in range(5):
        await send_audio([0.0] * SAMPLE_RATE)
    await ws.send(msgpack.packb({"type": "Marker", "id": 0}, use_single_float=True))
    for _ in range(35):
        await send_audio([0.0] * SAMPLE_RATE)


async def stream_audio(url: str, api_key: str, audio: np.ndarray, rtf: float) -> list[dict[str, Any]]:
    async with websockets.connect(url, additional_headers={"kyutai-api-key": api_key}) as ws:
        send = asyncio.create_task(send_messages(ws, audio, rtf))
        receive = asyncio.create_task(receive_messages(ws))
        _, transcript = await asyncio.wait_for(asyncio.gather(send, receive), 120)
    return transcript


def expected_transcript(model_dir: Path, audio: np.ndarray) -> list[dict[str, Any]]:
    """The same stream stepped directly: silence, the file, 5 s silence, marker (+ text delay)."""
    stepper = AsrStepper.from_model_dir(model_dir, 1, "fp32", "cpu")
    silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
    before_marker = np.concatenate([silence, audio, *([silence] * 5)])
    stream = frames(np.concatenate([before_marker, *([silence] * 35)]))
    last_step = len(before_marker) // FRAME + stepper.asr_delay_in_tokens
    transcript: list[dict[str, Any]] = []
    for t in range(last_step):
        out = stepper.step({0: [stream[t]]}, {0: None} if t == 0 else {})[0]
        if out.word is not None:
            start = float(np.float64(out.word.start_time))
            transcript.append({"text": out.word.text, "timestamp": [start, start]})
        if out.end_word is not None and transcript:
            transcript[-1]["timestamp"][1] = out.end_word
    return transcript


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    path = tmp_path / "speech.wav"
    sphn.write_wav(str(path), noise(4.0, seed=21), SAMPLE_RATE)
    return path


async def test_kyutai_stt_client_gets_the_models_transcript(engine_process, models_root, wav):
    model_dir = stt_model_dir(models_root)
    engine = engine_process({"asr": {"kind": "asr", "model_dir": str(model_dir), "slots": 2}})
    audio = load_and_process_audio(wav)
    transcript = await stream_audio(f"{engine.ws}/api/asr-streaming", "public_token", audio, RTF)
    assert transcript, "no words came back"
    assert all(isinstance(w["text"], str) and w["text"] for w in transcript)
    torch.set_num_threads(1)
    assert transcript == expected_transcript(model_dir, audio)


async def test_kyutai_stt_client_with_auth_id_and_a_wrong_key(engine_process, models_root, wav):
    engine = engine_process(
        {"asr": {"kind": "asr", "model_dir": str(stt_model_dir(models_root)), "slots": 1}}
    )
    with pytest.raises(websockets.exceptions.InvalidStatus) as err:
        await stream_audio(f"{engine.ws}/api/asr-streaming", "not-a-key", np.zeros(FRAME, np.float32), RTF)
    assert err.value.response.status_code == 401
    # The script's other way to authenticate: ?auth_id= on the URL (no header needed).
    url = f"{engine.ws}/api/asr-streaming?auth_id=public_token"
    audio = load_and_process_audio(wav)
    assert await stream_audio(url, "", audio, RTF)
