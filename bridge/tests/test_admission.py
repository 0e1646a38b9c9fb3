"""Endpoints and admission: healthz, status, metrics, origins, token, capacity, logs."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from conftest import base_settings


async def test_healthz_status_metrics(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url, moshi_urls=("ws://127.0.0.1:9/api/chat",)))
    async with rb.http.get(rb.base + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    client = await rb.connect()
    status = await rb.status()
    assert status["sessions"] == {"active": 1, "voice": 0, "max": 128, "total": 1}
    assert status["moshi"]["state"] == "down"
    assert status["moshi"]["backends"][0]["url"] == "ws://127.0.0.1:9/api/chat"
    assert status["moshi"]["backends"][0]["state"] == "down"
    assert status["mas"]["state"] == "unknown"
    assert status["tts"]["state"] == "off"
    assert status["draining"] is False
    async with rb.http.get(rb.base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    assert "# TYPE bridge_sessions_active gauge\nbridge_sessions_active 1\n" in text
    assert "# TYPE bridge_sessions_total counter\nbridge_sessions_total 1\n" in text
    assert 'bridge_moshi_backend_up{url="ws://127.0.0.1:9/api/chat"} 0' in text
    # Every sample line is "name{labels} value".
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("bridge_")
    await client.close()
    async with rb.http.get(rb.base + "/ws") as resp:
        assert resp.status == 400  # a plain GET is not a websocket


async def test_origin_allowlist(mas, start_bridge):
    settings = base_settings(mas.url, allowed_origins=frozenset({"http://localhost:3010"}))
    rb = await start_bridge(settings)
    # No Origin: a non-browser client, allowed.
    await rb.connect()
    # Listed origin (case and trailing slash do not matter).
    await rb.connect(headers={"Origin": "HTTP://localhost:3010/"})
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await rb.connect(headers={"Origin": "http://evil.example"})
    assert refused.value.status == 403
    async with rb.http.get(rb.base + "/status", headers={"Origin": "http://evil.example"}) as resp:
        assert resp.status == 403
    assert 'bridge_rejected_total{reason="origin"} 2' in await rb.metrics()


async def test_bearer_token(mas, start_bridge, caplog):
    caplog.set_level(logging.INFO)
    rb = await start_bridge(base_settings(mas.url, token="s3cret-token"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await rb.connect(headers=headers)
        assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await rb.http.ws_connect(rb.ws_url + "?token=nope")
    client = await rb.connect(headers={"Authorization": "Bearer s3cret-token"})
    await client.send({"type": "text", "text": "PRIVATE-USER-TEXT"})
    await client.expect("mas_response")
    via_query = await rb.http.ws_connect(rb.ws_url + "?token=s3cret-token")
    assert (await via_query.receive_json())["type"] == "ready"
    await via_query.close()
    # Neither the token nor user text is logged at info level.
    assert "s3cret-token" not in caplog.text
    assert "PRIVATE-USER-TEXT" not in caplog.text
    assert "session" in caplog.text  # but sessions are


async def test_max_sessions(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url, max_sessions=2))
    first = await rb.connect()
    await rb.connect()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await rb.connect()
    assert refused.value.status == 503
    await first.close()
    for _ in range(50):  # the slot frees once the session has ended
        if (await rb.status())["sessions"]["active"] < 2:
            break
        await asyncio.sleep(0.02)
    await rb.connect()
