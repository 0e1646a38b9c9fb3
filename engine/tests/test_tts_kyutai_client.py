"""Kyutai's published TTS client against the engine.

:func:`kyutai_tts_client` is our own copy of the exact message logic of ``scripts/tts_rust_server.py``
in kyutai-labs/delayed-streams-modeling at commit ``f6074cb684fcf3c46161f1c3abda3c0805e10d18``
(2025-09-11): the URL ``{url}/api/tts_streaming?voice=...&format=PcmMessagePack`` (``urlencode``), the
``kyutai-api-key`` header, one ``{"type": "Text", "text": word}`` per whitespace-separated word of each
input line, then ``{"type": "Eos"}``, sent while receiving; every received message is
``msgpack.unpackb``-ed, ``Audio`` messages' ``pcm`` become float32 frames, anything else is ignored,
the stream ends when the server closes the socket, and the frames are written with
``sphn.write_wav(out, np.concat(frames, -1), 24000)``.

What differs, and why: the script uses the ``websockets`` package (not installed here; aiohttp's client
sends the same frames) and ``sounddevice``/``tqdm`` for playback and progress (no audio device in
tests; the file output path is the one exercised). Kyutai's default ``--voice`` is a path in the
``kyutai/tts-voices`` repository; the engine takes voice names only, so the test passes ``--voice``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import msgpack
import numpy as np
import pytest
import sphn

from conftest import EngineProcess, start_engine
from tts_helpers import converse, tiny_tts_dir, tts_module

SAMPLE_RATE = 24000


async def kyutai_tts_client(
    inp: Path, out: Path, voice: str, url: str, api_key: str = "public_token"
) -> None:
    """``tts_rust_server.py inp out --voice VOICE --url URL --api-key KEY`` (the file-output path)."""
    params = {"voice": voice, "format": "PcmMessagePack"}
    uri = f"{url}/api/tts_streaming?{urlencode(params)}"
    headers = {"kyutai-api-key": api_key}
    async with aiohttp.ClientSession() as http, http.ws_connect(uri, headers=headers) as websocket:

        async def send_loop() -> None:
            for line in inp.read_text(encoding="utf-8").splitlines(keepends=True):
                for word in line.split():
                    await websocket.send_bytes(msgpack.packb({"type": "Text", "text": word}))
            await websocket.send_bytes(msgpack.packb({"type": "Eos"}))

        async def receive_messages(output_queue: asyncio.Queue[np.ndarray | None]) -> None:
            async for message in websocket:  # ends when the server closes the socket
                msg = msgpack.unpackb(message.data)
                if msg["type"] == "Audio":
                    pcm = np.array(msg["pcm"]).astype(np.float32)
                    await output_queue.put(pcm)
            await output_queue.put(None)

        async def output_audio(output_queue: asyncio.Queue[np.ndarray | None]) -> None:
            frames = []
            while True:
                item = await output_queue.get()
                if item is None:
                    break
                frames.append(item)
            sphn.write_wav(str(out), np.concat(frames, -1), SAMPLE_RATE)

        output_queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        receive_task = asyncio.create_task(receive_messages(output_queue))
        output_audio_task = asyncio.create_task(output_audio(output_queue))
        send_task = asyncio.create_task(send_loop())
        await asyncio.wait_for(asyncio.gather(receive_task, output_audio_task, send_task), 60)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[EngineProcess]:
    eng = start_engine(tmp_path_factory.mktemp("tts-kyutai"), tts_module(tiny_tts_dir(models_root), slots=2))
    yield eng
    eng.stop()


def test_kyutai_client_gets_the_speech(engine: EngineProcess, tmp_path: Path):
    text = "Hello, this is a test of the tiny model.\nIt speaks two lines.\n"
    inp = tmp_path / "in.txt"
    inp.write_text(text, encoding="utf-8")
    out = tmp_path / "out.wav"
    asyncio.run(kyutai_tts_client(inp, out, "tiny-a.wav", engine.ws))
    wav, sample_rate = sphn.read(str(out))
    assert sample_rate == SAMPLE_RATE
    samples = wav[0]
    assert len(samples) > 0
    assert len(samples) % 1920 == 0
    # The same words through our own client: the same audio, sample for sample (wav precision).
    reference = asyncio.run(converse(engine.ws, text.split(), voice="tiny-a.wav"))
    pcm = np.concatenate([np.asarray(m["pcm"], dtype=np.float32) for m in reference.of("Audio")])
    assert samples.shape == pcm.shape
    assert np.abs(samples - pcm).max() < 1e-3
    assert float(np.abs(samples).max()) > 1e-3
