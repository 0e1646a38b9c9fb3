"""PersonaPlex prompts and the chat reply voice end to end: the real engine (``asr``, ``tts`` and ``chat``
on the tiny PersonaPlex-shaped set with its voices), a real HTTP MAS stand-in, and the bridge over its
real websocket.

The chat reply voice needs the user's audio to step (one model frame per user frame), so a
microphone task streams 80 ms frames all along, silence unless a test makes it speak. The tiny
tokenizer knows lower-case letters only: MAS's ``echo: ...`` is said as ``echo ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from agent_helpers import Mic, agent_settings
from conftest import Client, base_settings
from personaplex_bridge.config import ConfigError, load_settings

VOICE = "TINYF0.pt"
TEXT_PROMPT = "you are a tiny model"


@dataclass
class Microphone:
    """Streams the client's microphone: silence, or speech while ``speaking``."""

    client: Client
    mic: Mic
    speaking: bool = False
    sent: int = 0

    async def run(self) -> None:
        while True:
            frame = (self.mic.speech(1) if self.speaking else self.mic.silence(1))[0]
            await self.client.ws.send_bytes(frame)
            self.sent += 1
            await asyncio.sleep(0.08)


@contextlib.asynccontextmanager
async def microphone(client: Client) -> AsyncIterator[Microphone]:
    mic = Microphone(client, Mic())
    task = asyncio.create_task(mic.run())
    try:
        yield mic
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def chat_settings(mas, chat_engine, **overrides):
    values = {
        "moshi_urls": (chat_engine.chat_url,),
        "reply_voice": "chat",
        "voice_prompt": VOICE,
        "text_prompt": TEXT_PROMPT,
        "moshi_connect_timeout_s": 30.0,
        **overrides,
    }
    return agent_settings(mas, chat_engine, **values)


async def test_reply_spoken_by_the_chat_voice(mas, chat_engine, start_bridge):
    mas.mode = "minimal"
    # No TTS at all: every reply audio frame below comes from the chat slot.
    rb = await start_bridge(chat_settings(mas, chat_engine, tts_url=None))
    backend = (await rb.status())["moshi"]["backends"][0]
    assert backend["kind"] == "engine"
    assert backend["flavor"] == "personaplex"
    assert backend["slots_total"] == chat_engine.chat_slots
    assert backend["slots_free"] == chat_engine.chat_slots
    prefills = chat_engine.chat_status()["prefills"]
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    ready = await client.expect("voice_ready", timeout=40)
    assert ready == {
        "type": "voice_ready",
        "backend": chat_engine.asr_url,
        "mode": "agent",
        "reply_voice": "chat",
    }
    # The session holds one chat slot, opened with its prompts (the engine ran their prefill).
    assert chat_engine.chat_status()["slots_used"] == 1
    assert chat_engine.chat_status()["prefills"] == prefills + 1
    held = (await rb.status())["moshi"]["backends"][0]
    assert held["held"] == 1
    assert held["slots_free"] == chat_engine.chat_slots - 1
    async with microphone(client):
        await client.send({"type": "text", "text": "tell me a story"})
        reply = await client.expect("mas_response", timeout=10)
        assert reply["text"] == "echo: tell me a story"
        before = len(client.binary)
        spoken = await client.expect("reply_spoken", timeout=60)
        await client.expect("tts_done", timeout=10)
    audio = client.binary[before:]
    assert audio, "the chat voice sent the reply's audio"
    assert all(frame[:1] == b"\x01" for frame in audio)
    # A fresh Ogg stream per reply, headers first, as a TTS reply.
    assert audio[0][1:5] == b"OggS"
    assert b"OpusHead" in audio[0]
    assert spoken == {
        "type": "reply_spoken",
        "voice": "chat",
        "text": "echo tell me a story",
        "reason": "done",
    }
    assert not client.of_type("tts_skipped")
    assert not client.of_type("reply_voice_fallback")
    # Outside the reply the chat audio is not relayed: nothing more comes while the user is silent.
    async with microphone(client):
        at_end = len(client.binary)
        await client.drain_for(1.0)
        assert len(client.binary) == at_end
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")
    assert (await rb.status())["moshi"]["backends"][0]["held"] == 0
    metrics = await rb.metrics()
    assert 'bridge_chat_voice_sessions_total{outcome="ready"} 1' in metrics
    assert 'bridge_tts_turns_total{outcome="done"} 1' in metrics


async def test_barge_in_cancels_the_chat_reply(mas, chat_engine, start_bridge):
    mas.mode = "long"  # "echo: ... word0 word1 ...": many words, seconds of speech
    rb = await start_bridge(chat_settings(mas, chat_engine, playback_lead_s=0.1))
    client = await rb.connect()
    await client.send({"type": "voice_start", "reply_voice": "chat"})
    assert (await client.expect("voice_ready", timeout=40))["reply_voice"] == "chat"
    async with microphone(client) as mic:
        await client.send({"type": "text", "text": "tell me a long story"})
        await client.expect("mas_response")
        await client.read_until(lambda: len(client.binary) >= 3, timeout=30)
        assert not client.of_type("tts_done"), "the reply must still be playing for this test"
        started = time.monotonic()
        mic.speaking = True
        event = await client.expect("tts_interrupted", timeout=5)
        elapsed = time.monotonic() - started
        assert event == {"type": "tts_interrupted", "reason": "barge_in"}
        assert elapsed < 0.4, f"barge-in took {elapsed * 1000:.0f} ms"
        at_event = len(client.binary)
        # The engine stops at the end of the word and says what was spoken.
        spoken = await client.expect("reply_spoken", timeout=10)
        mic.speaking = False
        await client.drain_for(0.5)
    assert spoken["reason"] in ("cancelled", "barge_in")
    said = "echo tell me a long story " + " ".join("word" for _ in range(60))
    assert spoken["text"], spoken
    assert said.startswith(spoken["text"]), spoken
    assert len(client.binary) == at_event, "no audio of the reply after tts_interrupted"
    assert not client.of_type("tts_done")
    assert "bridge_barge_in_total 1" in await rb.metrics()
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")


async def test_chat_voice_full_or_absent_falls_back_to_the_tts(mas, chat_engine, start_bridge):
    # Every chat slot taken by other clients: the engine answers 503, the TTS speaks instead.
    held = [await chat_engine.hold_chat_slot() for _ in range(chat_engine.chat_slots)]
    try:
        rb = await start_bridge(chat_settings(mas, chat_engine))
        client = await rb.connect()
        await client.send({"type": "voice_start"})
        assert (await client.expect("voice_ready", timeout=20))["reply_voice"] == "tts"
        fallback = await client.expect("reply_voice_fallback")
        assert fallback["reason"] == "busy"
        assert fallback["scope"] == "session"
        assert fallback["voice"] == "tts"
        async with microphone(client):
            await client.send({"type": "text", "text": "hello"})
            await client.expect("tts_done", timeout=60)
        assert not client.of_type("reply_spoken")
        await client.send({"type": "voice_stop"})
        await client.expect("voice_stopped")
    finally:
        for h in held:
            await h.close()
    # No engine chat backend in the pool at all.
    rb = await start_bridge(chat_settings(mas, chat_engine, moshi_urls=()))
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    assert (await client.expect("voice_ready"))["reply_voice"] == "tts"
    assert (await client.expect("reply_voice_fallback"))["reason"] == "no_backend"
    metrics = await rb.metrics()
    assert 'bridge_reply_voice_fallback_total{reason="no_backend"} 1' in metrics


async def test_prompts_refused_by_the_engine(mas, chat_engine, start_bridge):
    rb = await start_bridge(chat_settings(mas, chat_engine))
    client = await rb.connect()
    # A well-formed name that is not in the engine's voice folder: its 400 comes back, once.
    await client.send({"type": "voice_start", "voice_prompt": "NOPE.pt"})
    await client.expect("voice_ready", timeout=20)
    fallback = await client.expect("reply_voice_fallback")
    assert fallback["reason"] == "prompt_refused"
    assert "HTTP 400" in fallback["message"]
    assert "NOPE.pt" in fallback["message"]
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")
    await client.send({"type": "voice_start", "mode": "duplex", "voice_prompt": "NOPE.pt"})
    unavailable = await client.expect("voice_unavailable", timeout=20)
    assert unavailable["reason"] == "prompt_refused"
    assert "NOPE.pt" in unavailable["message"]
    status = await rb.status()
    assert status["moshi"]["backends"][0]["state"] == "up", "a refused prompt is not a backend down"
    assert status["moshi"]["backends"][0]["held"] == 0


async def test_duplex_passes_the_session_prompts(mas, chat_engine, start_bridge):
    rb = await start_bridge(base_settings(mas.url, moshi_urls=(chat_engine.chat_url,), voice_prompt=VOICE,
                                          moshi_connect_timeout_s=30.0))  # fmt: skip
    prefills = chat_engine.chat_status()["prefills"]
    client = await rb.connect()
    await client.send({"type": "voice_start", "mode": "duplex", "voice_prompt": "TINYM0.wav",
                       "text_prompt": "the weather"})  # fmt: skip
    ready = await client.expect("voice_ready", timeout=40)
    assert ready["mode"] == "duplex"
    assert chat_engine.chat_status()["prefills"] == prefills + 1
    async with microphone(client):
        await client.read_until(lambda: len(client.binary) >= 5, timeout=20)
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")
    status = (await rb.status())["moshi"]["backends"][0]
    # The engine measured its steps: the pool knows whether it is real time, and says why.
    assert isinstance(status["step_ms_p99"], float)
    assert status["real_time"] == (status["step_ms_p99"] <= 80.0)
    assert "ms" in status["real_time_reason"]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("voice_prompt", "../etc/passwd.pt", "not a voice file name"),
        ("voice_prompt", "NATF2.exe", "must end in"),
        ("voice_prompt", 7, "must be a string"),
        ("text_prompt", "x" * 1001, "longer than 1000"),
        ("text_prompt", "bell\x07", "control characters"),
        ("text_prompt", "\ud800", "UTF-8"),
        ("reply_voice", "loud", "tts or chat"),
    ],
)
async def test_bad_prompts_in_voice_start_are_refused(mas, start_bridge, field, value, words):
    rb = await start_bridge(base_settings(mas.url))
    client = await rb.connect()
    await client.send({"type": "voice_start", field: value})
    error = await client.expect("error")
    assert error["code"] == "bad_message"
    assert field in error["message"]
    assert words in error["message"]
    assert not client.of_type("voice_ready")
    assert not client.of_type("voice_unavailable")
    await client.send({"type": "text", "text": "still here"})
    assert (await client.expect("mas_response"))["text"].endswith("still here")


def test_prompt_settings_are_checked_at_start():
    env = {"BRIDGE_MAS_URL": "http://mas:8001/api/chat"}
    settings = load_settings({**env, "BRIDGE_VOICE_PROMPT": "NATF2.pt", "BRIDGE_TEXT_PROMPT": "be brief"})
    assert (settings.voice_prompt, settings.text_prompt, settings.reply_voice) == (
        "NATF2.pt",
        "be brief",
        "tts",
    )
    assert load_settings(env).voice_prompt is None
    assert load_settings(env).text_prompt is None
    assert load_settings(env, ["--reply-voice", "chat"]).reply_voice == "chat"
    for name, value, words in [
        ("BRIDGE_VOICE_PROMPT", "voices/NATF2.pt", "not a voice file name"),
        ("BRIDGE_VOICE_PROMPT", "NATF2", "must end in"),
        ("BRIDGE_TEXT_PROMPT", "é" * 1001, "longer than 1000"),
        ("BRIDGE_REPLY_VOICE", "moshi", "must be tts or chat"),
    ]:
        with pytest.raises(ConfigError) as refused:
            load_settings({**env, name: value})
        assert str(refused.value).startswith(name)
        assert words in str(refused.value)


async def test_pool_counts_the_engine_slots(mas, chat_engine, start_bridge):
    rb = await start_bridge(base_settings(mas.url, moshi_urls=(chat_engine.chat_url,),
                                          moshi_connect_timeout_s=30.0))  # fmt: skip
    first, second, third = [await rb.connect() for _ in range(3)]
    assert first.ready["moshi"] == "up"
    for client in (first, second):  # one engine, two conversations at once
        await client.send({"type": "voice_start", "mode": "duplex"})
        await client.expect("voice_ready", timeout=40)
    backend = (await rb.status())["moshi"]["backends"][0]
    assert backend["held"] == chat_engine.chat_slots
    assert backend["slots_free"] == 0
    assert backend["busy"] is True
    assert (await rb.connect()).ready["moshi"] == "busy"
    await third.send({"type": "voice_start", "mode": "duplex"})
    assert (await third.expect("voice_unavailable"))["reason"] == "busy"
    await first.send({"type": "voice_stop"})
    await first.expect("voice_stopped")
    await third.send({"type": "voice_start", "mode": "duplex"})
    await third.expect("voice_ready", timeout=40)
    # Another client of the engine holds a slot: the probe counts it.
    for client in (second, third):
        await client.send({"type": "voice_stop"})
        await client.expect("voice_stopped")
    held = await chat_engine.hold_chat_slot()
    try:
        await rb.bridge.services.pool.probe_all()
        backend = (await rb.status())["moshi"]["backends"][0]
        assert backend["held"] == 0
        assert backend["slots_free"] == chat_engine.chat_slots - 1
    finally:
        await held.close()
    assert 'bridge_moshi_backend_slots_free{url="' in await rb.metrics()


async def test_chat_backend_lost_mid_session_falls_back_to_the_tts(
    mas, chat_engine, chat_only_engine, start_bridge
):
    # The STT and the TTS on one engine, the chat voice on another, which dies.
    rb = await start_bridge(chat_settings(mas, chat_engine, moshi_urls=(chat_only_engine.chat_url,)))
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    assert (await client.expect("voice_ready", timeout=40))["reply_voice"] == "chat"
    async with microphone(client):
        await client.send({"type": "text", "text": "first"})
        await client.expect("reply_spoken", timeout=60)
        await client.expect("tts_done", timeout=10)
        chat_only_engine.kill()
        fallback = await client.expect("reply_voice_fallback", timeout=20)
        assert fallback["reason"] == "backend_lost"
        assert fallback["scope"] == "session"
        # The voice session goes on: the next reply is the TTS's.
        await client.send({"type": "text", "text": "second"})
        await client.expect("mas_response", timeout=10)
        await client.expect("tts_done", timeout=60)
    assert len(client.of_type("reply_spoken")) == 1
    assert not client.of_type("degraded")
    backend = (await rb.status())["moshi"]["backends"][0]
    assert backend["state"] == "down"
    assert backend["held"] == 0
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")


async def test_the_engine_key_goes_in_a_header_and_a_wrong_one_is_named(mas, chat_engine, start_bridge):
    """BRIDGE_MOSHI_KEY: the key in the kyutai-api-key header (never in the URL the bridge shows)."""
    plain = chat_engine.chat_url.split("?", 1)[0]
    rb = await start_bridge(base_settings(mas.url, moshi_urls=(plain,), moshi_key=chat_engine.key,
                                          moshi_connect_timeout_s=30.0))  # fmt: skip
    client = await rb.connect()
    await client.send({"type": "voice_start", "mode": "duplex"})
    await client.expect("voice_ready", timeout=40)
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")
    assert chat_engine.key not in str(await rb.status())

    rb = await start_bridge(base_settings(mas.url, moshi_urls=(plain,), moshi_key="wrong-key",
                                          moshi_connect_timeout_s=30.0))  # fmt: skip
    client = await rb.connect()
    await client.send({"type": "voice_start", "mode": "duplex"})
    unavailable = await client.expect("voice_unavailable", timeout=40)
    assert "wrong-key" not in str(unavailable)
    assert "BRIDGE_MOSHI_KEY" in str(await rb.status())
