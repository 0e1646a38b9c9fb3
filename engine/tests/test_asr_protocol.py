"""Kyutai's streaming STT protocol against a real engine process (tiny STT model, real websockets)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest

from asr_helpers import FRAME, SAMPLE_RATE, noise, stt_model_dir, tone
from conftest import EngineProcess, start_engine

ROUTE = "/api/asr-streaming"
MAX_MESSAGE = 256 * 1024
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[EngineProcess]:
    modules = {
        "asr": {
            "kind": "asr",
            "model_dir": str(stt_model_dir(models_root)),
            "slots": 2,
            "precision": "fp32",
            "device": "cpu",
            "options": {"max_buffered_seconds": 60},
        }
    }
    proc = start_engine(tmp_path_factory.mktemp("asr-engine"), modules, {"max_message_bytes": MAX_MESSAGE})
    yield proc
    proc.stop()


def audio_msg(pcm: Any) -> bytes:
    return msgpack.packb({"type": "Audio", "pcm": [float(x) for x in pcm]}, use_single_float=True)


def marker_msg(marker: int) -> bytes:
    return msgpack.packb({"type": "Marker", "id": marker})


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout: float = TIMEOUT) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data)
    data = msgpack.unpackb(msg.data, raw=False)
    assert isinstance(data, dict)
    return data


async def until(
    ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = TIMEOUT
) -> list[dict[str, Any]]:
    """Every message up to and including the first of type ``kind``."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        msg = await recv(ws, max(0.1, deadline - time.monotonic()))
        got.append(msg)
        if msg["type"] == kind:
            return got


async def session(
    engine: EngineProcess, http: aiohttp.ClientSession, **kw: Any
) -> aiohttp.ClientWebSocketResponse:
    headers = kw.pop("headers", {"kyutai-api-key": "public_token"})
    return await http.ws_connect(engine.ws + ROUTE + kw.pop("query", ""), headers=headers, **kw)


async def transcribe(
    ws: aiohttp.ClientWebSocketResponse, pieces: list[np.ndarray], marker: int = 1
) -> list[dict[str, Any]]:
    """Send audio pieces, a marker and silence; every message up to the marker (Ready excluded)."""
    for piece in pieces:
        await ws.send_bytes(audio_msg(piece))
    await ws.send_bytes(marker_msg(marker))
    await ws.send_bytes(audio_msg(np.zeros(SAMPLE_RATE, dtype=np.float32)))
    got = await until(ws, "Marker")
    assert got[-1] == {"type": "Marker", "id": marker}
    return got[:-1]


async def assert_serves(engine: EngineProcess, http: aiohttp.ClientSession) -> None:
    """The engine still transcribes a fresh session (after whatever the test did)."""
    async with await session(engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        got = await transcribe(ws, [noise(1.0, seed=99)], marker=42)
        assert sum(m["type"] == "Step" for m in got) >= 12


def slots_used(engine: EngineProcess) -> int:
    return int(engine.status()["modules"]["asr"]["slots_used"])


async def wait_slots_free(engine: EngineProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while slots_used(engine) != 0:
        assert time.monotonic() < deadline, "a slot was not given back"
        await asyncio.sleep(0.1)


def metrics(engine: EngineProcess) -> str:
    with urllib.request.urlopen(engine.http + "/metrics", timeout=5) as r:
        return r.read().decode()


def counter(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as client:
        yield client


# --- the protocol ---


async def test_ready_first_then_steps_words_and_the_marker(
    engine: EngineProcess, http: aiohttp.ClientSession
):
    audio = noise(4.0, seed=1)
    async with await session(engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        got = await transcribe(ws, [audio[i : i + FRAME] for i in range(0, len(audio), FRAME)])
    steps = [m for m in got if m["type"] == "Step"]
    words = [m for m in got if m["type"] == "Word"]
    ends = [m for m in got if m["type"] == "EndWord"]
    # The marker comes once the 50 frames before it are stepped plus the text delay (6 steps).
    assert [m["step_idx"] for m in steps] == list(range(1, 50 + 6 + 1))
    assert all(set(m) == {"type", "step_idx", "prs", "buffered_pcm"} and len(m["prs"]) == 4 for m in steps)
    assert words
    assert ends
    assert all(set(m) == {"type", "text", "start_time"} and isinstance(m["text"], str) for m in words)
    assert all(set(m) == {"type", "stop_time"} for m in ends)
    assert {m["type"] for m in got} <= {"Step", "Word", "EndWord"}
    # Word start times never go backwards and an EndWord never precedes its word's start.
    starts = [m["start_time"] for m in words]
    assert starts == sorted(starts)


async def test_query_auth_id_works_too(engine: EngineProcess, http: aiohttp.ClientSession):
    async with await session(engine, http, headers={}, query="?auth_id=public_token") as ws:
        assert await recv(ws) == {"type": "Ready"}


@pytest.mark.parametrize(
    ("headers", "query"),
    [({}, ""), ({"kyutai-api-key": "wrong"}, ""), ({}, "?auth_id=nope")],
)
async def test_without_a_valid_key_the_answer_is_401(engine, http, headers, query):
    before = counter(metrics(engine), "voice_engine_sessions_total", module="asr", outcome="unauthorized")
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await session(engine, http, headers=headers, query=query)
    assert err.value.status == 401
    after = counter(metrics(engine), "voice_engine_sessions_total", module="asr", outcome="unauthorized")
    assert after == before + 1


async def test_any_message_length_gives_the_same_transcript(
    engine: EngineProcess, http: aiohttp.ClientSession
):
    audio = noise(2.0, seed=2)  # under the 256 KB limit in one message

    async def run(size: int) -> list[dict[str, Any]]:
        async with await session(engine, http) as ws:
            assert await recv(ws) == {"type": "Ready"}
            got = await transcribe(ws, [audio[i : i + size] for i in range(0, len(audio), size)])
        for m in got:
            m.pop("buffered_pcm", None)  # how much was waiting depends on how it was sent
        return got

    by_frame = await run(FRAME)
    assert await run(SAMPLE_RATE) == by_frame  # whole seconds, as Kyutai's client also sends
    assert await run(1000) == by_frame  # pieces that do not line up with frames
    assert await run(len(audio)) == by_frame  # everything in one message


async def test_markers_come_back_in_order_after_their_audio(
    engine: EngineProcess, http: aiohttp.ClientSession
):
    async with await session(engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        await ws.send_bytes(audio_msg(noise(0.8, seed=3)))  # 10 frames
        await ws.send_bytes(marker_msg(1))
        await ws.send_bytes(audio_msg(noise(0.4, seed=4)))  # 5 frames
        await ws.send_bytes(marker_msg(2))
        await ws.send_bytes(audio_msg(np.zeros(SAMPLE_RATE, dtype=np.float32)))
        first = await until(ws, "Marker")
        second = await until(ws, "Marker")
    assert first[-1] == {"type": "Marker", "id": 1}
    assert second[-1] == {"type": "Marker", "id": 2}
    assert [m for m in first if m["type"] == "Step"][-1]["step_idx"] == 10 + 6
    assert [m for m in second if m["type"] == "Step"][-1]["step_idx"] == 15 + 6


async def test_all_slots_taken_gives_no_free_channels_then_close(engine, http):
    async with await session(engine, http) as a, await session(engine, http) as b:
        assert await recv(a) == {"type": "Ready"}
        assert await recv(b) == {"type": "Ready"}
        third = await session(engine, http)
        assert await recv(third) == {"type": "Error", "message": "no free channels"}
        closing = await asyncio.wait_for(third.receive(), TIMEOUT)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await third.close()
        # The two sessions are undisturbed.
        assert len(await transcribe(a, [noise(0.4, seed=5)])) > 0
        assert len(await transcribe(b, [noise(0.4, seed=6)])) > 0
    full = counter(metrics(engine), "voice_engine_sessions_total", module="asr", outcome="full")
    assert full >= 1
    await wait_slots_free(engine)
    await assert_serves(engine, http)


async def test_sessions_side_by_side_match_sessions_alone(engine, http):
    a_audio, b_audio = noise(2.0, seed=7), tone(2.0, 500.0)

    async def alone(audio: np.ndarray) -> list[dict[str, Any]]:
        async with await session(engine, http) as ws:
            await recv(ws)
            got = await transcribe(ws, [audio])
        return [{k: v for k, v in m.items() if k != "buffered_pcm"} for m in got]

    a_alone, b_alone = await alone(a_audio), await alone(b_audio)
    together = await asyncio.gather(alone(a_audio), alone(b_audio))
    assert together == [a_alone, b_alone]


# --- bad input: a clear Error, the session carries on, the engine too ---

BAD_MESSAGES = [
    (b"\xc1\x00garbage", "bad_msgpack", "not a MessagePack message"),
    (msgpack.packb([1, 2, 3]), "bad_message", "must be a MessagePack map"),
    (msgpack.packb({"pcm": [0.0]}), "bad_message", "string field 'type'"),
    (msgpack.packb({"type": "Dance"}), "bad_type", "unknown message type 'Dance'"),
    (msgpack.packb({"type": "Audio"}), "bad_field", "'pcm' with a list of numbers, got nothing"),
    (msgpack.packb({"type": "Audio", "pcm": "0.0"}), "bad_field", "got str"),
    (msgpack.packb({"type": "Audio", "pcm": [0.1, "x"]}), "bad_field", "numbers only, found str"),
    (msgpack.packb({"type": "Audio", "pcm": [0.1, [0.2]]}), "bad_field", "numbers only, found list"),
    (msgpack.packb({"type": "Audio", "pcm": [0.1, True]}), "bad_field", "numbers only, found bool"),
    (msgpack.packb({"type": "Audio", "pcm": [0.1, float("nan")]}), "bad_field", "finite numbers"),
    (msgpack.packb({"type": "Audio", "pcm": [1e300]}), "bad_field", "finite numbers"),
    (msgpack.packb({"type": "Marker", "id": "one"}), "bad_field", "integer field 'id'"),
    (msgpack.packb({"type": "Marker"}), "bad_field", "integer field 'id'"),
    (msgpack.packb({"type": "OggOpus", "data": b"OggS"}), "unsupported", "OggOpus input is not supported"),
]


@pytest.mark.parametrize(
    ("data", "reason", "text"), BAD_MESSAGES, ids=[b[1] + str(i) for i, b in enumerate(BAD_MESSAGES)]
)
async def test_bad_messages_get_an_error_and_the_session_carries_on(engine, http, data, reason, text):
    before = counter(metrics(engine), "voice_engine_client_errors_total", module="asr", reason=reason)
    async with await session(engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        await ws.send_bytes(audio_msg(noise(0.4, seed=8)))
        await ws.send_bytes(data)
        got = await transcribe(ws, [noise(0.4, seed=9)])
    errors = [m for m in got if m["type"] == "Error"]
    assert len(errors) == 1, errors
    assert text in errors[0]["message"]
    assert set(errors[0]) == {"type", "message"}
    # The good audio on both sides of the bad message was all stepped: 5 + 5 frames + delay.
    assert max(m["step_idx"] for m in got if m["type"] == "Step") == 10 + 6
    after = counter(metrics(engine), "voice_engine_client_errors_total", module="asr", reason=reason)
    assert after == before + 1


async def test_text_frames_get_an_error(engine, http):
    async with await session(engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        await ws.send_str(json.dumps({"type": "Audio", "pcm": [0.0]}))
        error = await recv(ws)
        assert error["type"] == "Error"
        assert "binary MessagePack" in error["message"]
        assert len(await transcribe(ws, [noise(0.4, seed=10)])) > 0


async def test_a_message_over_the_size_limit_gets_an_error_and_is_dropped(engine, http):
    big = msgpack.packb({"type": "Audio", "pcm": [0.0] * (MAX_MESSAGE // 5 + 100)}, use_single_float=True)
    assert MAX_MESSAGE < len(big) < 2 * MAX_MESSAGE
    async with await session(engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        await ws.send_bytes(big)
        error = await recv(ws)
        assert error["type"] == "Error"
        assert f"over the limit of {MAX_MESSAGE} bytes" in error["message"]
        got = await transcribe(ws, [noise(0.4, seed=11)])
    # The dropped audio was not stepped: only the 5 good frames and the delay.
    assert max(m["step_idx"] for m in got if m["type"] == "Step") == 5 + 6


async def test_a_huge_message_is_refused_by_the_websocket_layer(engine, http):
    before = counter(metrics(engine), "voice_engine_client_errors_total", module="asr", reason="too_large")
    huge = msgpack.packb(
        {"type": "Audio", "pcm": [0.0] * (2 * MAX_MESSAGE // 5 + 100)}, use_single_float=True
    )
    async with await session(engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        await ws.send_bytes(huge)
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009  # message too big
    await wait_slots_free(engine)
    after = counter(metrics(engine), "voice_engine_client_errors_total", module="asr", reason="too_large")
    assert after == before + 1
    await assert_serves(engine, http)


async def test_audio_far_ahead_of_real_time_is_refused_past_the_buffer_limit(engine, http):
    async with await session(engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        second = np.zeros(SAMPLE_RATE, dtype=np.float32)
        for _ in range(70):  # 70 s at once; the limit is 60 s buffered
            await ws.send_bytes(audio_msg(second))
        got = await until(ws, "Error", timeout=60)
        assert "too much audio buffered" in got[-1]["message"]
    await wait_slots_free(engine)


async def test_a_client_that_vanishes_mid_stream_frees_its_slot(engine, http):
    # A raw TCP client: websocket handshake, some audio, then the socket just closes (no close frame).
    host, port = "127.0.0.1", engine.port
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(
            (
                f"GET {ROUTE}?auth_id=public_token HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        assert raw.recv(4096).startswith(b"HTTP/1.1 101")
        payload = audio_msg(noise(2.0, seed=12))
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        header = b"\x82" + bytes([0x80 | 127]) + len(payload).to_bytes(8, "big") + mask
        raw.sendall(header + masked[: len(masked) // 2])  # half a frame, then gone
    await wait_slots_free(engine)
    await assert_serves(engine, http)


async def test_a_client_that_never_reads_does_not_disturb_another(engine, http):
    async with await session(engine, http) as deaf:
        for _ in range(20):
            await deaf.send_bytes(audio_msg(noise(1.0, seed=13)))  # 250 steps of output, never read
        t0 = time.monotonic()
        async with await session(engine, http) as ws:
            assert await recv(ws) == {"type": "Ready"}
            assert len(await transcribe(ws, [noise(1.0, seed=14)])) > 0
        assert time.monotonic() - t0 < TIMEOUT
    await wait_slots_free(engine)


async def test_an_idle_client_is_told_and_closed(engine_process, models_root, http):
    modules = {
        "asr": {
            "kind": "asr",
            "model_dir": str(stt_model_dir(models_root)),
            "slots": 1,
            "options": {"idle_timeout_s": 1.0},
        }
    }
    idle_engine = engine_process(modules)
    async with await session(idle_engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        error = await recv(ws, timeout=10)
        assert error == {"type": "Error", "message": "no message for 1 s; closing the session"}
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await wait_slots_free(idle_engine)
    await assert_serves(idle_engine, http)


def test_status_names_the_module(engine: EngineProcess):
    entry = engine.status()["modules"]["asr"]
    assert entry["kind"] == "asr"
    assert entry["route"] == ROUTE
    assert entry["slots_total"] == 2
    assert entry["asr_delay_in_tokens"] == 6
    assert entry["failed"] is None


async def test_init_and_unknown_extra_fields_are_accepted_as_kyutai_does(engine, http):
    async with await session(engine, http) as ws:
        assert await recv(ws) == {"type": "Ready"}
        await ws.send_bytes(msgpack.packb({"type": "Init"}))
        extra = {"type": "Audio", "pcm": [float(x) for x in noise(0.4, seed=15)], "sample_rate": 24000}
        await ws.send_bytes(msgpack.packb(extra, use_single_float=True))
        got = await transcribe(ws, [])
    assert not [m for m in got if m["type"] == "Error"]
    assert max(m["step_idx"] for m in got if m["type"] == "Step") == 5 + 6
