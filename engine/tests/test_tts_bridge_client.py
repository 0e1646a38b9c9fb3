"""The bridge's own TTS client (``personaplex_bridge.tts.TtsClient``, unchanged) against a real engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgpack
import pytest
import sphn
from personaplex_bridge.config import Settings
from personaplex_bridge.tts import R_AT_CAPACITY, R_ERROR, R_UNAUTHORIZED, TtsClient, TtsSkipped

from conftest import EngineProcess, start_engine
from tts_helpers import KEY, tiny_tts_dir, tts_module, url


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[EngineProcess]:
    eng = start_engine(tmp_path_factory.mktemp("tts-bridge"), tts_module(tiny_tts_dir(models_root), slots=1))
    yield eng
    eng.stop()


def settings(engine: EngineProcess, voice: str = "tiny-a.wav", key: str | None = KEY) -> Settings:
    return Settings(
        mas_url="http://127.0.0.1:9/unused",
        tts_url=f"{engine.ws}/api/tts_streaming",
        tts_voice=voice,
        tts_key=key,
        tts_timeout_s=10.0,
    )


async def speak(cfg: Settings, text: str) -> tuple[list[bytes], TtsClient]:
    pages: list[bytes] = []

    async def on_audio(page: bytes) -> None:
        pages.append(page)

    async with aiohttp.ClientSession() as http:
        client = TtsClient(cfg, http)
        count = await client.speak(text, on_audio)
        assert count == len(pages)
    return pages, client


def test_bridge_client_speaks_a_reply(engine: EngineProcess):
    pages, client = asyncio.run(speak(settings(engine), "Hello from the agent, this is a reply."))
    assert client.state == "up"
    assert pages[0].startswith(b"OggS")
    assert b"OpusHead" in pages[0]
    pcm, _ = sphn.read_opus_bytes(b"".join(pages))
    assert pcm.shape[-1] > 0


def test_bridge_client_without_a_voice_gets_the_default(engine: EngineProcess):
    pages, _ = asyncio.run(speak(settings(engine, voice=""), "Default voice."))
    assert len(pages) > 1


def test_bridge_client_reasons(engine: EngineProcess):
    with pytest.raises(TtsSkipped) as err:
        asyncio.run(speak(settings(engine, key="wrong"), "hi"))
    assert err.value.reason == R_UNAUTHORIZED
    with pytest.raises(TtsSkipped) as err:
        asyncio.run(speak(settings(engine, voice="nobody.wav"), "hi"))
    assert err.value.reason == R_ERROR
    assert "unknown voice 'nobody.wav'" in err.value.message


def test_bridge_client_at_capacity(engine: EngineProcess):
    async def scenario() -> TtsSkipped:
        async with aiohttp.ClientSession() as http:
            target = url(engine.ws, format="PcmMessagePack", voice="tiny-a.wav")
            async with http.ws_connect(target, headers={"kyutai-api-key": KEY}) as holder:
                assert msgpack.unpackb((await holder.receive(timeout=10)).data)["type"] == "Ready"
                try:
                    await speak(settings(engine), "hi")
                except TtsSkipped as exc:
                    return exc
        raise AssertionError("the second session was not refused")

    refused = asyncio.run(scenario())
    assert refused.reason == R_AT_CAPACITY
