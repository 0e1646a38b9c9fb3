"""Bad frames: garbage, oversized, rapid-fire, binary before voice. The session always stays open."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from conftest import base_settings


async def test_garbage_frames_get_errors_and_session_stays_open(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url))
    client = await rb.connect()
    cases = [
        ("{not json", "bad_json"),
        ("[1, 2, 3]", "bad_json"),
        ('"just a string"', "bad_json"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps({"kind": "text"}), "unknown_type"),
        (json.dumps({"type": "text"}), "bad_message"),
        (json.dumps({"type": "text", "text": 42}), "bad_message"),
        (json.dumps({"type": "text", "text": "   "}), "bad_message"),
        (json.dumps({"type": "voice_stop"}), "bad_state"),
    ]
    for frame, code in cases:
        await client.ws.send_str(frame)
        event = await client.expect("error")
        assert event["code"] == code, (frame, event)
        assert event["message"]
    await client.ws.send_bytes(b"\x01OggS...")
    assert (await client.expect("error"))["code"] == "binary_before_voice"
    await client.ws.send_bytes(b"")
    assert (await client.expect("error"))["code"] == "binary_before_voice"
    # Still a working session.
    await client.send({"type": "text", "text": "still here"})
    assert (await client.expect("mas_response"))["text"] == "echo: still here"
    metrics = await rb.metrics()
    assert 'bridge_client_errors_total{code="bad_json"} 3' in metrics
    assert 'bridge_client_errors_total{code="binary_before_voice"} 2' in metrics


async def test_oversized_frames(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url, max_frame_bytes=1024, max_text_chars=100))
    client = await rb.connect()
    await client.send({"type": "text", "text": "x" * 2000})
    event = await client.expect("error")
    assert event["code"] == "frame_too_large"
    assert "1024" in event["message"]
    # Multi-byte text is measured in bytes: 400 characters of 3 bytes each exceed 1024.
    await client.send({"type": "text", "text": "€" * 400})
    assert (await client.expect("error"))["code"] == "frame_too_large"
    await client.ws.send_bytes(b"\x01" + b"\x00" * 2000)
    assert (await client.expect("error"))["code"] == "frame_too_large"
    # Within the frame limit but over the text limit.
    await client.send({"type": "text", "text": "y" * 101})
    event = await client.expect("error")
    assert event["code"] == "bad_message"
    assert "100 characters" in event["message"]
    await client.send({"type": "text", "text": "small"})
    assert (await client.expect("mas_response"))["text"] == "echo: small"
    await client.expect("tts_skipped")
    assert [r["text"] for r in mas.requests] == ["small"]
    # Past 4x the limit the websocket layer refuses the frame unread and closes with 1009.
    await client.ws.send_bytes(b"\x01" + b"\x00" * 5000)
    assert await client.next(timeout=5) is None
    assert client.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_rapid_fire_is_rate_limited(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url, rate_per_s=20, rate_burst=30))
    client = await rb.connect()
    for _ in range(200):
        await client.ws.send_str("garbage")
    await client.drain_for(1.0)
    bad_json = client.of_type("error")
    codes = [e["code"] for e in bad_json]
    limited = [e for e in bad_json if e["code"] == "rate_limited"]
    # The burst is served (plus what refilled while the frames arrived); the rest is dropped, and the
    # client hears about it at most once a second, with the count.
    assert 30 <= codes.count("bad_json") <= 50
    assert 1 <= len(limited) <= 2
    assert limited[0]["dropped"] >= 1
    assert codes.count("bad_json") + sum(e["dropped"] for e in limited) <= 200
    metrics = await rb.metrics()
    assert 'bridge_dropped_frames_total{reason="rate_limited"}' in metrics
    # Once the bucket refills, the session works normally.
    await asyncio.sleep(0.5)
    await client.send({"type": "text", "text": "calm now"})
    assert (await client.expect("mas_response"))["text"] == "echo: calm now"


async def test_too_many_pending_turns_gets_busy(mas, start_bridge):
    mas.delay_s = 0.5
    rb = await start_bridge(base_settings(mas.url, max_pending_turns=2))
    client = await rb.connect()
    await client.send({"type": "text", "text": "t0"})
    await asyncio.sleep(0.2)  # t0 is now in flight
    for i in range(1, 5):
        await client.send({"type": "text", "text": f"t{i}"})
    await client.drain_for(2.5)
    # One turn in flight, two queued, two refused.
    assert [e["code"] for e in client.of_type("error")] == ["busy", "busy"]
    assert [r["text"] for r in client.of_type("mas_response")] == ["echo: t0", "echo: t1", "echo: t2"]


async def test_idle_session_is_closed(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url, idle_timeout_s=1.0))
    client = await rb.connect()
    await asyncio.sleep(0.6)
    await client.send({"type": "text", "text": "activity resets the clock"})
    await client.expect("mas_response")
    assert await client.next(timeout=5) is not None  # tts_skipped
    started = asyncio.get_running_loop().time()
    assert await client.next(timeout=5) is None
    assert client.ws.close_code == 1000
    assert 0.4 < asyncio.get_running_loop().time() - started < 2.5


async def test_client_that_stops_reading_is_closed(mas, tts, start_bridge):
    """Memory stays bounded: a client that does not read is disconnected, not buffered for."""
    tts.mode = "flood"
    settings = base_settings(
        mas.url, tts_url=tts.url, tts_key=tts.key, send_timeout_s=1.0, out_queue_frames=8, tts_timeout_s=5.0
    )
    rb = await start_bridge(settings)
    client = await rb.connect()
    await client.send({"type": "text", "text": "flood me"})
    await asyncio.sleep(4.0)  # not reading
    while (item := await client.next(timeout=5)) is not None:
        assert not (isinstance(item, dict) and item["type"] == "tts_done")
    assert client.ws.close_code == 1008
    assert len(client.binary) < 400
    assert (await rb.status())["sessions"]["active"] == 0
