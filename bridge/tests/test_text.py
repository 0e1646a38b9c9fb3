"""Text turns through a real HTTP MAS stand-in: replies, bad replies, outages, backoff, concurrency."""

from __future__ import annotations

import asyncio
import time

from conftest import base_settings, free_port


async def test_ready_then_text_turn_reaches_mas_and_client(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url))
    client = await rb.connect()
    assert client.ready == {
        "type": "ready",
        "session": client.ready["session"],
        "moshi": "down",
        "mas": "unknown",
        "tts": "off",
        "asr": "off",
    }
    assert len(client.ready["session"]) >= 16

    await client.send({"type": "text", "text": "hello brain"})
    reply = await client.expect("mas_response")
    assert mas.requests == [{"session_id": client.ready["session"], "text": "hello brain", "source": "text"}]
    assert reply == {
        "type": "mas_response",
        "text": "echo: hello brain",
        "tool_calls": [{"name": "lookup", "args": {"q": "hello brain"}}],
        "agent_activity": [{"agent": "planner", "session": client.ready["session"]}],
        "memory": [{"kind": "note", "source": "text"}],
        "extra": {"model": "mas-test", "latency_ms": 3},
        "source": "text",
    }
    skipped = await client.expect("tts_skipped")
    assert skipped["reason"] == "off"
    await client.close()


async def test_missing_lists_become_empty(mas, start_bridge):
    mas.mode = "minimal"
    rb = await start_bridge(base_settings(mas.url))
    client = await rb.connect()
    await client.send({"type": "text", "text": "hi"})
    reply = await client.expect("mas_response")
    assert (reply["tool_calls"], reply["agent_activity"], reply["memory"], reply["extra"]) == ([], [], [], {})


async def test_bad_mas_replies_get_mas_bad_reply(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url))
    client = await rb.connect()
    for mode, needle in [
        ("garbage", "not JSON"),
        ("list", "not an object"),
        ("no_response", "no string 'response'"),
        ("404", "HTTP 404"),
    ]:
        mas.mode = mode
        await client.send({"type": "text", "text": f"try {mode}"})
        event = await client.expect("error")
        assert event["code"] == "mas_bad_reply", event
        assert needle in event["message"]
    # A bad reply is not an outage: no backoff, the next call goes through at once.
    mas.mode = "ok"
    await client.send({"type": "text", "text": "fine now"})
    assert (await client.expect("mas_response"))["text"] == "echo: fine now"
    assert client.of_type("mas_response")
    assert not client.of_type("tts_done")


async def test_slow_mas_times_out_and_session_continues(mas, start_bridge):
    mas.delay_s = 1.5
    rb = await start_bridge(base_settings(mas.url, mas_timeout_s=0.4))
    client = await rb.connect()
    started = time.monotonic()
    await client.send({"type": "text", "text": "are you there"})
    event = await client.expect("error")
    assert event["code"] == "mas_unavailable"
    assert "timed out" in event["message"]
    assert 0.35 < time.monotonic() - started < 2.5
    assert event["retry_in_s"] > 0
    # `mas` in a new session's ready event reflects the failed call.
    other = await rb.connect()
    assert other.ready["mas"] == "down"
    # After the backoff, a healthy MAS answers again and the state goes back up.
    mas.delay_s = 0
    await asyncio.sleep(0.35)
    await client.send({"type": "text", "text": "again"})
    assert (await client.expect("mas_response"))["text"] == "echo: again"
    third = await rb.connect()
    assert third.ready["mas"] == "up"


async def test_mas_500_is_unavailable_with_backoff(mas, start_bridge):
    mas.mode = "500"
    rb = await start_bridge(base_settings(mas.url, mas_backoff_s=0.5, mas_backoff_max_s=4.0))
    client = await rb.connect()
    await client.send({"type": "text", "text": "one"})
    first = await client.expect("error")
    assert first["code"] == "mas_unavailable"
    assert "HTTP 500" in first["message"]
    assert len(mas.requests) == 1
    # Within the backoff the bridge does not call MAS at all.
    await client.send({"type": "text", "text": "two"})
    second = await client.expect("error")
    assert second["code"] == "mas_unavailable"
    assert 0 < second["retry_in_s"] <= 0.5
    assert len(mas.requests) == 1
    # The backoff doubles with consecutive failures.
    await asyncio.sleep(second["retry_in_s"] + 0.05)
    await client.send({"type": "text", "text": "three"})
    third = await client.expect("error")
    assert len(mas.requests) == 2
    assert 0.9 <= third["retry_in_s"] <= 1.0
    status = await rb.status()
    assert status["mas"]["state"] == "down"
    assert status["mas"]["consecutive_failures"] == 2
    metrics = await rb.metrics()
    assert 'bridge_mas_requests_total{outcome="unavailable"} 2' in metrics
    assert 'bridge_mas_requests_total{outcome="backoff"} 1' in metrics


async def test_mas_refusing_connections(start_bridge):
    closed = f"http://127.0.0.1:{free_port()}/api/chat"
    rb = await start_bridge(base_settings(closed))
    client = await rb.connect()
    await client.send({"type": "text", "text": "anyone?"})
    event = await client.expect("error")
    assert event["code"] == "mas_unavailable"
    assert "connection failed" in event["message"]
    # The session stays usable: a protocol round trip still works.
    await client.send({"type": "nonsense"})
    assert (await client.expect("error"))["code"] == "unknown_type"


async def test_mas_health_url_drives_state(mas, start_bridge):
    mas.health_status = 503
    rb = await start_bridge(base_settings(mas.url, mas_health_url=mas.health_url))
    client = await rb.connect()
    assert client.ready["mas"] == "down"
    mas.health_status = 204
    await asyncio.sleep(0.7)  # two probe intervals
    again = await rb.connect()
    assert again.ready["mas"] == "up"
    assert (await rb.status())["mas"]["reason"] == "health check answered HTTP 204"


async def test_fifty_concurrent_text_sessions(mas, start_bridge):
    mas.delay_s = 0.2
    rb = await start_bridge(base_settings(mas.url))
    clients = await asyncio.gather(*(rb.connect() for _ in range(50)))
    ids = {c.ready["session"] for c in clients}
    assert len(ids) == 50

    async def turn(i: int) -> dict:
        client = clients[i]
        await client.send({"type": "text", "text": f"message {i}"})
        reply = await client.expect("mas_response", timeout=20)
        await client.expect("tts_skipped")
        return reply

    started = time.monotonic()
    replies = await asyncio.gather(*(turn(i) for i in range(50)))
    elapsed = time.monotonic() - started
    assert [r["text"] for r in replies] == [f"echo: message {i}" for i in range(50)]
    assert {r["session_id"] for r in mas.requests} == ids
    # The turns ran concurrently, not one after another (50 x 0.2 s would be 10 s).
    assert mas.max_in_flight >= 10
    assert elapsed < 8
    status = await rb.status()
    assert status["sessions"]["active"] == 50
    await asyncio.gather(*(c.close() for c in clients))
