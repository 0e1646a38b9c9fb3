"""Agent voice mode end to end: the real engine (``asr`` + ``tts`` on tiny random models), a real HTTP
MAS stand-in, and the bridge over its real websocket.

The tiny STT's words and pause predictions are noise (random weights), so turn-taking is made
deterministic with settings, not with luck:

* ``asr_pause_threshold=0``: the pause head always agrees, so a turn ends when it has words and the
  client has sent ``asr_min_silence_s`` of audio below ``asr_silence_dbfs`` (a silent tail);
* ``asr_barge_in_threshold=1``: during a reply, any loud audio interrupts it (the pause prediction is
  always below 1); silent audio never does (the level gate).
"""

from __future__ import annotations

import asyncio
import signal
import time

from agent_helpers import Mic, agent_settings, send
from conftest import Client, base_settings, free_port
from personaplex_bridge.audio import ogg_end_s


async def speak_turn(client: Client, mic: Mic) -> tuple[dict, float]:
    """Speak for 1.6 s, then stay silent until the turn's final transcript.

    Returns the final transcript and how long after the speech ended it came (the turn must end in
    the silence, not during the speech).
    """
    spoke: list[float] = []

    async def microphone() -> None:
        await send(client, mic.speech(20))
        spoke.append(time.monotonic())
        await send(client, mic.silence(40))

    task = asyncio.create_task(microphone())
    try:
        final = await client.expect("transcript", timeout=15, final=True)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert spoke, "the turn ended while the user was still speaking"
    return final, time.monotonic() - spoke[0]


async def test_spoken_turn_is_transcribed_answered_and_spoken(mas, engine, start_bridge):
    rb = await start_bridge(agent_settings(mas, engine))
    client = await rb.connect()
    assert client.ready["asr"] == "up"
    assert client.ready["tts"] == "up"
    await client.send({"type": "voice_start"})  # agent is the default with an STT
    ready = await client.expect("voice_ready")
    assert ready == {"type": "voice_ready", "backend": engine.asr_url, "mode": "agent", "reply_voice": "tts"}
    assert (await rb.status())["sessions"]["voice"] == 1

    mic = Mic()
    final, after_speech_s = await speak_turn(client, mic)
    # BRIDGE_ASR_MIN_SILENCE_S (0.3 s) of silence, then the flush: the Marker comes back once the
    # STT has stepped the flush silence (its text delay), well under 3 s on the tiny model.
    assert 0.3 <= after_speech_s < 3.0, after_speech_s
    words = [e["text"] for e in client.seen if e["type"] == "transcript" and not e["final"]]
    assert words, "the STT's words come as transcript events while the user speaks"
    assert final["text"], final
    # MAS got the user's words, labelled as voice; the answer came back and was spoken.
    reply = await client.expect("mas_response", timeout=10)
    assert reply["source"] == "voice"
    session = client.ready["session"]
    assert mas.requests[0] == {"session_id": session, "text": final["text"], "source": "voice"}
    assert reply["text"] == f"echo: {final['text']}"
    before = len(client.binary)
    await client.read_until(lambda: len(client.binary) > before, timeout=30)
    first_audio = time.monotonic()
    await client.expect("tts_done", timeout=60)
    relayed_s = time.monotonic() - first_audio
    audio = client.binary[before:]
    assert all(frame[:1] == b"\x01" for frame in audio)
    assert audio[0][1:5] == b"OggS"
    # Paced to real time: the reply took about as long to arrive as it lasts (lead 0.15 s).
    duration_s = ogg_end_s(audio[-1][1:])
    assert duration_s is not None
    assert duration_s > 0.5, "the tiny TTS speaks for a while"
    assert relayed_s > duration_s - 0.5, (relayed_s, duration_s)
    order = [e["type"] for e in client.seen]
    assert order.index("transcript") < order.index("mas_response") < order.index("tts_done")

    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")
    metrics = await rb.metrics()
    assert 'bridge_voice_turns_total{outcome="sent"}' in metrics
    assert 'bridge_asr_sessions_total{outcome="ready"} 1' in metrics
    assert 'bridge_tts_turns_total{outcome="done"}' in metrics
    assert (await rb.status())["sessions"]["voice"] == 0


async def test_barge_in_stops_the_reply_within_200_ms(mas, engine, start_bridge):
    mas.mode = "long"  # a reply of many words: seconds of speech
    rb = await start_bridge(agent_settings(mas, engine, playback_lead_s=0.1))
    client = await rb.connect()
    await client.send({"type": "voice_start", "mode": "agent"})
    await client.expect("voice_ready")
    mic = Mic()
    await send(client, mic.silence(16))  # past the STT's warm-up, all quiet
    # A typed turn during agent voice is spoken into the voice stream, like a spoken one.
    await client.send({"type": "text", "text": "tell me a long story"})
    await client.expect("mas_response")
    await client.read_until(lambda: len(client.binary) >= 1, timeout=30)
    # Quiet audio during the reply does not interrupt it.
    await send(client, mic.silence(6))
    await client.drain_for(0.3)
    assert not client.of_type("tts_interrupted")
    assert not client.of_type("tts_done"), "the reply must still be playing for this test"
    # The user speaks: the playback stops, and the client is told.
    speech = mic.speech(6)
    started = time.monotonic()
    sender = asyncio.create_task(send(client, speech))
    event = await client.expect("tts_interrupted", timeout=5)
    elapsed = time.monotonic() - started
    await sender
    assert event == {"type": "tts_interrupted", "reason": "barge_in"}
    assert elapsed < 0.2, f"barge-in took {elapsed * 1000:.0f} ms"
    # No audio of that reply after the event, and no tts_done for it.
    at_event = len(client.binary)
    await client.drain_for(1.0)
    assert len(client.binary) == at_event
    assert not client.of_type("tts_done")
    metrics = await rb.metrics()
    assert "bridge_barge_in_total 1" in metrics
    assert 'bridge_tts_turns_total{outcome="interrupted"} 1' in metrics
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")


async def test_stt_full_or_down_at_voice_start_keeps_text(mas, engine, start_bridge):
    # The engine's asr module has a fixed number of slots; hold them all directly.
    held = [await engine.hold_asr_slot() for _ in range(engine.asr_slots)]
    try:
        rb = await start_bridge(agent_settings(mas, engine))
        client = await rb.connect()
        await client.send({"type": "voice_start"})
        unavailable = await client.expect("voice_unavailable", timeout=10)
        assert unavailable["reason"] == "busy"
        assert "no free channels" in unavailable["message"]
        await client.send({"type": "text", "text": "typed instead"})
        assert (await client.expect("mas_response"))["source"] == "text"
    finally:
        for ws in held:
            await ws.close()
    # A wrong key: refused at the handshake.
    rb = await start_bridge(agent_settings(mas, engine, asr_key="wrong"))
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    unavailable = await client.expect("voice_unavailable", timeout=10)
    assert unavailable["reason"] == "down"
    assert "401" in unavailable["message"]
    # Nothing listening.
    dead = f"ws://127.0.0.1:{free_port()}/api/asr-streaming"
    rb = await start_bridge(agent_settings(mas, engine, asr_url=dead))
    client = await rb.connect()
    assert client.ready["asr"] == "down"
    await client.send({"type": "voice_start"})
    assert (await client.expect("voice_unavailable", timeout=10))["reason"] == "down"
    await client.send({"type": "text", "text": "still typing"})
    assert (await client.expect("mas_response"))["text"] == "echo: still typing"
    assert 'bridge_asr_sessions_total{outcome="down"} 1' in await rb.metrics()


async def test_agent_mode_without_stt_and_bad_frames(mas, engine, start_bridge):
    rb = await start_bridge(base_settings(mas.url))
    client = await rb.connect()
    await client.send({"type": "voice_start", "mode": "agent"})
    assert (await client.expect("voice_unavailable"))["reason"] == "no_backend"
    await client.send({"type": "voice_start", "mode": "loud"})
    assert (await client.expect("error"))["code"] == "bad_message"

    rb = await start_bridge(agent_settings(mas, engine))
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    await client.expect("voice_ready")
    await client.ws.send_bytes(b"\x01not ogg at all")
    assert (await client.expect("error"))["code"] == "bad_audio"
    # The decoder starts over: a fresh Ogg stream is accepted.
    await send(client, Mic().speech(3))
    await client.drain_for(0.5)
    assert [e["code"] for e in client.of_type("error")] == ["bad_audio"]
    await client.send({"type": "voice_start"})
    assert (await client.expect("error"))["code"] == "bad_state"
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")


async def test_frozen_then_killed_stt_degrades_to_text(mas, engine_own, start_bridge):
    rb = await start_bridge(agent_settings(mas, engine_own, asr_timeout_s=1.0))
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    await client.expect("voice_ready")
    await send(client, Mic().speech(3))
    # Frozen (SIGSTOP: alive, but silent): the watchdog notices within BRIDGE_ASR_TIMEOUT_S.
    engine_own.process.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        await send(client, Mic().speech(2))
        degraded = await client.expect("degraded", timeout=6)
        assert degraded["component"] == "asr"
        assert "answered nothing for 1 s" in degraded["message"]
        assert time.monotonic() - started < 4
    finally:
        engine_own.process.proc.send_signal(signal.SIGCONT)
    await client.ws.send_bytes(Mic().speech(1)[0])
    assert (await client.expect("error"))["code"] == "binary_before_voice"
    # Back: a new voice session works without a restart of the bridge.
    await client.send({"type": "voice_start"})
    await client.expect("voice_ready", timeout=10)
    await send(client, Mic().speech(3))
    # Killed: the connection closes, the session degrades at once.
    engine_own.kill()
    degraded = await client.expect("degraded", timeout=10)
    assert degraded["component"] == "asr"
    assert degraded["mode"] == "text"
    status = await rb.status()
    assert status["sessions"]["voice"] == 0
    assert status["asr"]["state"] == "down"
    await client.send({"type": "text", "text": "still here"})
    # (Words heard before the loss, if any, were posted as a last voice turn.)
    assert (await client.expect("mas_response", source="text"))["text"] == "echo: still here"
    assert 'bridge_degraded_total{component="asr"} 2' in await rb.metrics()


async def test_voice_stop_during_a_reply_stops_it(mas, engine, start_bridge):
    mas.mode = "long"
    rb = await start_bridge(agent_settings(mas, engine))
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    await client.expect("voice_ready")
    await client.send({"type": "text", "text": "talk"})
    await client.read_until(lambda: len(client.binary) >= 1, timeout=30)
    await client.send({"type": "voice_stop"})
    assert (await client.expect("tts_interrupted"))["reason"] == "voice_stopped"
    await client.expect("voice_stopped")
    at_stop = len(client.binary)
    await client.drain_for(0.5)
    assert len(client.binary) == at_stop
    assert not client.of_type("tts_done")
