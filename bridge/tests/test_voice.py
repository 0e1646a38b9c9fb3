"""Voice sessions against the real moshi.server running the tiny random model."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from conftest import Client, base_settings, free_port


async def send_frames(client: Client, frames: list[bytes], pace_s: float = 0.05) -> None:
    for frame in frames:
        await client.ws.send_bytes(frame)
        await asyncio.sleep(pace_s)


async def wait_for(predicate, timeout: float = 10.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


async def test_duplex_session_relays_moshi_and_never_posts_its_words_to_mas(moshi, mas, start_bridge, frames):
    rb = await start_bridge(base_settings(mas.url, moshi_urls=(moshi.url,)))
    client = await rb.connect()
    assert client.ready["moshi"] == "up"
    assert client.ready["asr"] == "off"
    # Without BRIDGE_ASR_URL the default mode is duplex.
    await client.send({"type": "voice_start"})
    ready = await client.expect("voice_ready")
    assert ready == {"type": "voice_ready", "backend": moshi.url, "mode": "duplex"}
    status = await rb.status()
    assert status["moshi"]["state"] == "busy"
    assert status["moshi"]["backends"][0]["busy"] is True
    assert status["sessions"]["voice"] == 1

    sent = frames[:12]
    await send_frames(client, sent)
    # Moshi answers every frame but the first with one audio and (usually) one text message.
    await client.read_until(lambda: len(client.binary) >= len(sent) - 1)
    await client.drain_for(0.3)
    assert len(client.binary) == len(sent) - 1
    assert all(frame[:1] == b"\x01" for frame in client.binary)
    assert client.binary[0][1:5] == b"OggS"
    pieces = [e["text"] for e in client.of_type("moshi_text")]
    assert pieces, "Moshi's text pieces are relayed as moshi_text events"

    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")
    # The backend is free again at once.
    status = await rb.status()
    assert status["moshi"]["backends"][0]["busy"] is False
    assert status["sessions"]["voice"] == 0
    # Moshi's words are its own, not the user's: nothing reached MAS, no reply came back.
    await client.drain_for(1.0)
    assert mas.requests == []
    assert not client.of_type("mas_response")
    assert not client.of_type("tts_skipped")
    # Binary after voice_stop is refused again.
    await client.ws.send_bytes(frames[0])
    assert (await client.expect("error"))["code"] == "binary_before_voice"


async def test_duplex_option_posts_moshi_words_as_assistant_speech(moshi, mas, start_bridge, frames):
    settings = base_settings(mas.url, moshi_urls=(moshi.url,), duplex_moshi_to_mas=True)
    rb = await start_bridge(settings)
    client = await rb.connect()
    await client.send({"type": "voice_start", "mode": "duplex"})
    assert (await client.expect("voice_ready"))["mode"] == "duplex"
    sent = frames[:12]
    await send_frames(client, sent)
    await client.read_until(lambda: len(client.binary) >= len(sent) - 1)
    await client.drain_for(0.3)
    pieces = [e["text"] for e in client.of_type("moshi_text")]
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")
    await wait_for(lambda: bool(mas.requests))
    await client.drain_for(0.5)
    # Labelled as the assistant's speech, never as a user turn; the answers are not spoken.
    assert {r["source"] for r in mas.requests} == {"assistant_speech"}
    assert " ".join(r["text"] for r in mas.requests).split() == "".join(pieces).split()
    assert {r["session_id"] for r in mas.requests} == {client.ready["session"]}
    replies = client.of_type("mas_response")
    assert replies
    assert {e["source"] for e in replies} == {"assistant_speech"}
    assert not client.of_type("tts_skipped")


async def test_second_voice_session_while_backend_busy(moshi, mas, start_bridge, frames):
    rb = await start_bridge(base_settings(mas.url, moshi_urls=(moshi.url,)))
    first = await rb.connect()
    await first.send({"type": "voice_start"})
    await first.expect("voice_ready")
    second = await rb.connect()
    assert second.ready["moshi"] == "busy"
    await second.send({"type": "voice_start"})
    unavailable = await second.expect("voice_unavailable")
    assert unavailable["reason"] == "busy"
    # Text keeps working for the second session.
    await second.send({"type": "text", "text": "typed instead"})
    assert (await second.expect("mas_response"))["text"] == "echo: typed instead"
    # Starting twice in one session is a state error.
    await first.send({"type": "voice_start"})
    assert (await first.expect("error"))["code"] == "bad_state"
    # Disconnecting releases the backend; the second session gets it.
    await first.close()
    await wait_for(lambda: not rb.bridge.services.pool.backends[0].busy, timeout=5)
    await second.send({"type": "voice_start"})
    assert (await second.expect("voice_ready", timeout=10))["backend"] == moshi.url
    await send_frames(second, frames[:4])
    await second.read_until(lambda: len(second.binary) >= 3)


async def test_tts_is_skipped_while_moshi_speaks(moshi, mas, tts, start_bridge):
    settings = base_settings(mas.url, moshi_urls=(moshi.url,), tts_url=tts.url, tts_key=tts.key)
    rb = await start_bridge(settings)
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    await client.expect("voice_ready")
    await client.send({"type": "text", "text": "typed during voice"})
    assert (await client.expect("mas_response"))["text"] == "echo: typed during voice"
    assert (await client.expect("tts_skipped"))["reason"] == "voice_active"
    assert tts.queries == []
    await client.send({"type": "voice_stop"})
    await client.expect("voice_stopped")


async def test_busy_elsewhere_and_down_backends(moshi, mas, start_bridge):
    dead = f"ws://127.0.0.1:{free_port()}/api/chat"
    rb = await start_bridge(base_settings(mas.url, moshi_urls=(dead, moshi.url), moshi_connect_timeout_s=1.0))
    status = await rb.status()
    assert [b["state"] for b in status["moshi"]["backends"]] == ["down", "up"]
    # Someone else holds the Moshi server directly: it accepts the socket but sends no handshake.
    async with aiohttp.ClientSession() as other, other.ws_connect(moshi.url) as held:
        assert (await held.receive(timeout=5)).data == b"\x00"
        client = await rb.connect()
        started = time.monotonic()
        await client.send({"type": "voice_start"})
        unavailable = await client.expect("voice_unavailable")
        assert unavailable["reason"] == "busy"
        assert 0.9 < time.monotonic() - started < 3
    # Once it is free the same backend is handed out (the dead one never is).
    await asyncio.sleep(0.3)
    await client.send({"type": "voice_start"})
    assert (await client.expect("voice_ready", timeout=10))["backend"] == moshi.url


async def test_no_backend_configured(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url))
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    assert (await client.expect("voice_unavailable"))["reason"] == "no_backend"


async def test_moshi_killed_mid_session_then_comes_back(moshi_own, mas, start_bridge, frames):
    rb = await start_bridge(base_settings(mas.url, moshi_urls=(moshi_own.url,)))
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    await client.expect("voice_ready")
    await send_frames(client, frames[:4])
    await client.read_until(lambda: len(client.binary) >= 3)

    moshi_own.kill()
    degraded = await client.expect("degraded", timeout=10)
    assert degraded["component"] == "moshi"
    assert degraded["mode"] == "text"
    status = await rb.status()
    assert status["moshi"]["backends"][0]["state"] == "down"
    assert status["moshi"]["backends"][0]["busy"] is False
    assert status["sessions"]["voice"] == 0
    # The session continues in text mode.
    await client.send({"type": "text", "text": "still talking"})
    assert (await client.expect("mas_response", source="text"))["text"] == "echo: still talking"
    await client.ws.send_bytes(frames[0])
    assert (await client.expect("error"))["code"] == "binary_before_voice"
    await client.send({"type": "voice_start"})
    assert (await client.expect("voice_unavailable"))["reason"] == "down"

    # The server comes back on the same port: the bridge uses it again without a restart.
    moshi_own.start()
    await wait_for(lambda: rb.bridge.services.pool.backends[0].up, timeout=10)
    await client.send({"type": "voice_start"})
    assert (await client.expect("voice_ready", timeout=10))["backend"] == moshi_own.url
    before = len(client.binary)
    await send_frames(client, frames[:4])
    await client.read_until(lambda: len(client.binary) >= before + 3)
    assert 'bridge_degraded_total{component="moshi"} 1' in await rb.metrics()


async def test_frozen_moshi_is_detected_by_the_stall_watchdog(moshi_own, mas, start_bridge, frames):
    """A Moshi that stops answering (SIGSTOP: alive, but silent) degrades the session."""
    rb = await start_bridge(base_settings(mas.url, moshi_urls=(moshi_own.url,), moshi_stall_s=1.0))
    client = await rb.connect()
    await client.send({"type": "voice_start"})
    await client.expect("voice_ready")
    await send_frames(client, frames[:3])
    await client.read_until(lambda: len(client.binary) >= 2)
    assert moshi_own.proc is not None
    moshi_own.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        await send_frames(client, frames[3:5])
        degraded = await client.expect("degraded", timeout=6)
        assert "answered nothing for 1 s" in degraded["message"]
        assert 0.9 < time.monotonic() - started < 4
        await client.send({"type": "text", "text": "text still works"})
        assert (await client.expect("mas_response", source="text"))["text"] == "echo: text still works"
    finally:
        moshi_own.proc.send_signal(signal.SIGCONT)
