"""``/api/chat`` on real engine processes (tiny PersonaPlex- and Moshi-shaped sets): Moshi's protocol.

Frames as Kyutai's web client (``kyutai-labs/moshi`` ``client/src/protocol/encoder.ts``) and NVIDIA's
fork's client send them: a kind byte, then the payload; audio is Ogg/Opus both ways.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from chat_helpers import Conversation, chat_module, converse, talk, tiny_chat_dir, url, user_frames
from conftest import EngineProcess, start_engine

SLOTS = 3
PROMPT = {"voice_prompt": "TINYF0.pt", "text_prompt": "you are a tiny model", "seed": 42}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[EngineProcess]:
    model_dir = tiny_chat_dir(models_root, "personaplex")
    modules = chat_module(model_dir, SLOTS, idle_timeout_s=5.0)
    eng = start_engine(tmp_path_factory.mktemp("chat-engine"), modules)
    yield eng
    eng.stop()


def chat_status(engine: EngineProcess) -> dict:
    return engine.status()["modules"]["chat"]


def wait_free(engine: EngineProcess) -> None:
    for _ in range(100):
        if chat_status(engine)["slots_used"] == 0:
            return
        asyncio.run(asyncio.sleep(0.05))
    assert chat_status(engine)["slots_used"] == 0


def test_handshake_after_prefill_then_audio_and_text_per_frame(engine: EngineProcess) -> None:
    frames = user_frames(1, 12)
    conv = talk(engine.ws, frames, **PROMPT)
    assert conv.before_handshake == []  # nothing before 0x00
    assert len(conv.audio) == len(frames)  # after a prefill, every frame gives audio
    assert conv.audio[0].startswith(b"OggS") and b"OpusHead" in conv.audio[0]
    pcm = conv.pcm()
    assert pcm.shape[0] >= 1920 * (len(frames) - 1) and float(np.abs(pcm).max()) > 1e-3
    assert conv.text and all("▁" not in piece for piece in conv.text)
    assert not conv.errors
    status = chat_status(engine)
    assert status["flavor"] == "personaplex" and status["kind"] == "chat" and status["route"] == "/api/chat"
    assert status["prefills"] >= 1 and status["prefill_ms_p50"] > 0 and status["prefill_ms_max"] > 0
    assert "TINYF0.pt" in status["voices"] and "TINYM0.wav" in status["voices"]
    wait_free(engine)


def test_seed_reproduces_and_prompts_change_the_conversation(engine: EngineProcess) -> None:
    frames = user_frames(2, 8)
    a = talk(engine.ws, frames, **PROMPT)
    b = talk(engine.ws, frames, **PROMPT)
    assert a.settled == b.settled
    wav = talk(engine.ws, frames, **{**PROMPT, "voice_prompt": "TINYF0.wav"})
    assert wav.settled == a.settled  # the .pt was made from that WAV: the same prefill
    for change in ({"seed": 43}, {"voice_prompt": "TINYM0.wav"}, {"text_prompt": "the weather"}):
        other = talk(engine.ws, frames, **{**PROMPT, **change})
        assert other.settled != a.settled, change
    # Kyutai's query parameters are honoured (text_seed as the seed, temperatures, top-k).
    kyutai = {  # what Kyutai's web client sends (useModelParams.ts defaults), plus the prompts
        "voice_prompt": "TINYF0.pt",
        "text_prompt": "you are a tiny model",
        "text_temperature": 0.7,
        "text_topk": 25,
        "audio_temperature": 0.8,
        "audio_topk": 250,
        "pad_mult": 0,
        "text_seed": 42,
        "audio_seed": 1234,
        "repetition_penalty_context": 64,
        "repetition_penalty": 1.0,
    }
    assert talk(engine.ws, frames, **kyutai).settled == a.settled
    greedy = {**PROMPT, "audio_temperature": 0, "text_temperature": 0, "audio_topk": 5, "text_topk": 3}
    assert talk(engine.ws, frames, **greedy).settled != a.settled
    wait_free(engine)


def test_empty_or_absent_prompts_are_served(engine: EngineProcess) -> None:
    frames = user_frames(3, 4)
    empty = talk(engine.ws, frames, voice_prompt="", text_prompt="", seed=1)
    absent = talk(engine.ws, frames, seed=1)
    assert len(empty.audio) == len(frames) and empty.settled == absent.settled
    wait_free(engine)


def http_get(engine: EngineProcess, **query: str) -> tuple[int, dict]:
    target = url(engine.http, **query)
    try:
        with urllib.request.urlopen(target, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    "name",
    [
        "../config.json",
        "voices/TINYF0.pt",
        "/etc/passwd",
        "..",
        "TINYF0.txt",
        "NOPE.pt",
        "a\\b.pt",
        ".hidden.pt",
    ],
)
def test_bad_voice_prompt_names_are_400_before_the_upgrade(engine: EngineProcess, name: str) -> None:
    status, body = http_get(engine, voice_prompt=name)
    assert status == 400, body
    assert body["reason"] in ("bad_voice", "unknown_voice") and "voice_prompt" in body["error"]


def test_bad_numbers_are_400_and_a_bad_key_401(engine: EngineProcess) -> None:
    status, body = http_get(engine, seed="x")
    assert status == 400 and "seed" in body["error"]
    status, body = http_get(engine, audio_topk="-1")
    assert status == 400 and "audio_topk" in body["error"]
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{engine.http}/api/chat?auth_id=wrong", timeout=10)
    assert exc.value.code == 401


def test_a_full_engine_refuses_at_once_with_503(engine: EngineProcess) -> None:
    async def scenario() -> tuple[int, dict, float]:
        async with aiohttp.ClientSession() as http:
            held = [await http.ws_connect(url(engine.ws, **PROMPT)) for _ in range(SLOTS)]
            for ws in held:  # every slot through its prefill
                msg = await asyncio.wait_for(ws.receive(), 20)
                assert msg.data == b"\x00"
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                await http.ws_connect(url(engine.ws, **PROMPT))
            except aiohttp.WSServerHandshakeError as exc:
                status = exc.status
            took = loop.time() - started
            async with http.get(url(engine.http, **PROMPT)) as resp:
                body = await resp.json()
            for ws in held:
                await ws.close()
            return status, body, took

    status, body, took = asyncio.run(scenario())
    assert status == 503 and took < 2.0
    assert body["reason"] == "full" and body["slots_total"] == SLOTS
    wait_free(engine)
    assert len(talk(engine.ws, user_frames(4, 2), **PROMPT).audio) == 2  # and serves again


def test_bad_frames_get_an_error_and_the_session_carries_on(engine: EngineProcess) -> None:
    frames = user_frames(5, 6)
    bad = [b"\x01not ogg at all", b"\x09\x01\x02", b"\x02\xff\xfe", b"", b"\x03\x00", b"\x06"]
    conv = talk(engine.ws, frames, extra=bad, **PROMPT)
    assert len(conv.errors) == 4, conv.errors
    joined = " | ".join(conv.errors)
    assert "Ogg" in joined and "0x09" in joined and "not valid UTF-8" in joined and "empty" in joined
    assert len(conv.audio) == len(frames)
    clean = talk(engine.ws, frames, **PROMPT)
    assert [m for m in conv.settled if m[:1] != b"\x05"] == clean.settled  # the bad frames changed nothing
    wait_free(engine)


def test_independent_of_other_conversations_through_the_server(engine: EngineProcess) -> None:
    """One conversation alone, then again while others join, prefill and leave: the same bytes."""
    frames = user_frames(6, 30)
    query = {**PROMPT, "seed": 7}
    alone = talk(engine.ws, frames, pace_s=0.03, **query)

    async def crowd() -> Conversation:
        main = asyncio.create_task(converse(engine.ws, frames, pace_s=0.03, **query))
        await asyncio.sleep(0.05)  # joins during the main conversation's prefill, talks, leaves
        short = await converse(engine.ws, user_frames(7, 5), seed=1)
        late = await converse(
            engine.ws, user_frames(8, 8), voice_prompt="TINYM0.wav", text_prompt="coffee", seed=2
        )
        assert len(short.audio) == 5 and len(late.audio) == 8
        assert not main.done()  # both came and went while it was talking
        return await main

    among = asyncio.run(crowd())
    assert among.settled == alone.settled
    wait_free(engine)


@pytest.fixture(scope="module")
def moshi_engine(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[EngineProcess]:
    modules = chat_module(tiny_chat_dir(models_root, "moshi"), 1)
    eng = start_engine(tmp_path_factory.mktemp("chat-moshi"), modules)
    yield eng
    eng.stop()


def test_moshi_flavor_handshakes_at_once_and_refuses_prompts(moshi_engine: EngineProcess) -> None:
    frames = user_frames(9, 6)
    conv = talk(moshi_engine.ws, frames, expect_audio=len(frames) - 1, seed=3)
    assert len(conv.audio) == len(frames) - 1  # as Kyutai's server: the first frame gives no audio
    assert conv.settled == talk(moshi_engine.ws, frames, expect_audio=len(frames) - 1, seed=3).settled
    status = moshi_engine.status()["modules"]["chat"]
    assert status["flavor"] == "moshi" and status["prefills"] == 0
    code, body = http_get(moshi_engine, text_prompt="hello")
    assert code == 400 and "Moshi" in body["error"]


def test_leaving_during_the_prefill_frees_the_slot_at_once(engine: EngineProcess) -> None:
    long_prompt = " ".join(["listen to the music and the weather"] * 100)  # about 700 steps of prefill

    async def scenario() -> float:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(url(engine.ws, voice_prompt="TINYF0.pt", text_prompt=long_prompt))
            await asyncio.sleep(0.2)
            assert chat_status(engine)["slots_used"] == 1
            await ws.close()
            loop = asyncio.get_running_loop()
            started = loop.time()
            while chat_status(engine)["slots_used"]:
                await asyncio.sleep(0.05)
            return loop.time() - started

    assert asyncio.run(scenario()) < 1.5
    assert len(talk(engine.ws, user_frames(10, 2), **PROMPT).audio) == 2
