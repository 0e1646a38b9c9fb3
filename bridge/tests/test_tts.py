"""Spoken replies through a stand-in speaking Kyutai's streaming TTS protocol (MessagePack)."""

from __future__ import annotations

import time

from conftest import base_settings, free_port


def tts_settings(mas, tts, **overrides):
    return base_settings(
        mas.url, tts_url=tts.url, tts_key=tts.key, tts_voice="expresso/happy.wav", **overrides
    )


async def test_reply_is_spoken_as_ogg_frames_then_tts_done(mas, tts, start_bridge):
    rb = await start_bridge(tts_settings(mas, tts))
    client = await rb.connect()
    assert client.ready["tts"] == "up"
    await client.send({"type": "text", "text": "say something"})
    reply = await client.expect("mas_response")
    assert reply["text"] == "echo: say something"
    await client.expect("tts_done")
    # Every Ogg page arrived, in order, as a 0x01 frame; byte arrays and integer arrays alike.
    assert client.binary == [b"\x01" + page for page in tts.pages]
    assert client.binary[0][1:5] == b"OggS"
    # The text reply came first, the audio after it.
    assert [e["type"] for e in client.seen] == ["ready", "mas_response", "tts_done"]
    # What the TTS server saw: the query, the key (checked by the stand-in), the text, then Eos.
    assert tts.queries == [{"format": "OggOpusMessagePack", "voice": "expresso/happy.wav"}]
    assert tts.received == [{"type": "Text", "text": "echo: say something"}, {"type": "Eos"}]
    metrics = await rb.metrics()
    assert 'bridge_tts_turns_total{outcome="done"} 1' in metrics
    assert f"bridge_tts_frames_total {len(tts.pages)}" in metrics


async def test_integer_array_data(mas, tts, start_bridge):
    tts.data_as = "ints"
    rb = await start_bridge(tts_settings(mas, tts))
    client = await rb.connect()
    await client.send({"type": "text", "text": "ints"})
    await client.expect("tts_done")
    assert client.binary == [b"\x01" + page for page in tts.pages]


async def test_wrong_key_gets_401_and_skipped(mas, tts, start_bridge):
    rb = await start_bridge(base_settings(mas.url, tts_url=tts.url, tts_key="wrong"))
    client = await rb.connect()
    await client.send({"type": "text", "text": "hello"})
    assert (await client.expect("mas_response"))["text"] == "echo: hello"
    skipped = await client.expect("tts_skipped")
    assert skipped["reason"] == "unauthorized"
    assert "401" in skipped["message"]
    assert client.binary == []
    status = await rb.status()
    assert status["tts"]["state"] == "down"
    assert (await rb.connect()).ready["tts"] == "down"


async def test_at_capacity_error(mas, tts, start_bridge):
    tts.mode = "capacity"
    rb = await start_bridge(tts_settings(mas, tts))
    client = await rb.connect()
    await client.send({"type": "text", "text": "busy?"})
    await client.expect("mas_response")
    skipped = await client.expect("tts_skipped")
    assert skipped["reason"] == "at_capacity"
    assert "no free channels" in skipped["message"]
    assert tts.received == []  # nothing is sent before Ready
    assert (await rb.status())["tts"]["state"] == "up"  # full is not broken


async def test_error_midway_keeps_the_text(mas, tts, start_bridge):
    tts.mode = "error_midway"
    rb = await start_bridge(tts_settings(mas, tts))
    client = await rb.connect()
    await client.send({"type": "text", "text": "partial"})
    await client.expect("mas_response")
    skipped = await client.expect("tts_skipped")
    assert skipped["reason"] == "error"
    assert "boom" in skipped["message"]
    assert client.binary == [b"\x01" + tts.pages[0]]


async def test_slow_tts_times_out(mas, tts, start_bridge):
    tts.mode = "slow"
    rb = await start_bridge(tts_settings(mas, tts, tts_timeout_s=0.5))
    client = await rb.connect()
    started = time.monotonic()
    await client.send({"type": "text", "text": "slowly"})
    await client.expect("mas_response")
    skipped = await client.expect("tts_skipped")
    assert skipped["reason"] == "timeout"
    assert 0.4 < time.monotonic() - started < 2.0


async def test_garbage_from_tts(mas, tts, start_bridge):
    tts.mode = "garbage"
    rb = await start_bridge(tts_settings(mas, tts))
    client = await rb.connect()
    await client.send({"type": "text", "text": "what"})
    skipped = await client.expect("tts_skipped")
    assert skipped["reason"] == "error"
    assert "MessagePack" in skipped["message"]


async def test_unreachable_tts(mas, start_bridge):
    url = f"ws://127.0.0.1:{free_port()}/api/tts_streaming"
    rb = await start_bridge(base_settings(mas.url, tts_url=url))
    client = await rb.connect()
    assert client.ready["tts"] == "down"  # the start-up probe found nothing listening
    await client.send({"type": "text", "text": "anyone"})
    assert (await client.expect("mas_response"))["text"] == "echo: anyone"
    assert (await client.expect("tts_skipped"))["reason"] == "unreachable"


async def test_empty_reply_is_not_spoken(mas, tts, start_bridge):
    mas.mode = "empty"
    rb = await start_bridge(tts_settings(mas, tts))
    client = await rb.connect()
    await client.send({"type": "text", "text": "x"})
    assert (await client.expect("mas_response"))["text"] == ""
    assert (await client.expect("tts_skipped"))["reason"] == "empty"
    assert tts.queries == []
