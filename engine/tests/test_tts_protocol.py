"""``/api/tts_streaming`` on a real engine process (tiny TTS set): Kyutai's streaming TTS protocol."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import pytest
import sphn

from conftest import EngineProcess, start_engine
from tts_helpers import KEY, Session, converse, tiny_tts_dir, tts_module, url

WORDS = ["hello", "this", "is", "a", "tiny", "test"]
MAX_MESSAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[EngineProcess]:
    model_dir = tiny_tts_dir(models_root)
    modules = tts_module(model_dir, slots=2, idle_timeout_s=2.0, max_text_chars=2000)
    eng = start_engine(
        tmp_path_factory.mktemp("tts-engine"), modules, extra={"max_message_bytes": MAX_MESSAGE_BYTES}
    )
    yield eng
    eng.stop()


def talk(engine: EngineProcess, *args, **kwargs) -> Session:
    return asyncio.run(converse(engine.ws, *args, **kwargs))


def metrics(engine: EngineProcess) -> str:
    with urllib.request.urlopen(engine.http + "/metrics", timeout=5) as r:
        return r.read().decode()


def assert_serves(engine: EngineProcess) -> None:
    """The engine still answers a whole session, and nothing holds a slot any more."""
    wait_free(engine)
    session = talk(engine, ["still", "here", "ok"])
    assert session.types[0] == "Ready"
    assert session.of("Audio")
    assert [m["text"] for m in session.of("Text")] == ["still", "here", "ok"]
    wait_free(engine)


def wait_free(engine: EngineProcess) -> None:
    for _ in range(50):
        if engine.status()["modules"]["tts"]["slots_used"] == 0:
            return
        time.sleep(0.1)
    assert engine.status()["modules"]["tts"]["slots_used"] == 0


def pcm_of(session: Session) -> np.ndarray:
    return np.concatenate([np.asarray(m["pcm"], dtype=np.float32) for m in session.of("Audio")])


def test_pcm_messagepack_ready_audio_word_timings_close(engine: EngineProcess):
    session = talk(engine, [" ".join(WORDS[:3]), *WORDS[3:]])
    assert session.types[0] == "Ready"
    audio = session.of("Audio")
    assert audio
    assert all(len(m["pcm"]) == 1920 for m in audio)
    words = session.of("Text")
    assert [w["text"] for w in words] == WORDS
    assert all(isinstance(w["start_s"], float) and w["start_s"] < w["stop_s"] for w in words)
    assert [w["start_s"] for w in words] == sorted(w["start_s"] for w in words)
    assert not session.of("Error")
    assert session.close_code == 1000
    assert float(np.abs(pcm_of(session)).max()) > 1e-3


def test_same_request_same_audio_and_seed_matters(engine: EngineProcess):
    a = talk(engine, WORDS)
    b = talk(engine, WORDS)
    assert pcm_of(a).tobytes() == pcm_of(b).tobytes()
    c = talk(engine, WORDS, query={"seed": 5})
    assert pcm_of(c).tobytes() != pcm_of(a).tobytes()
    d = talk(engine, WORDS, voice="tiny-b.wav")
    assert pcm_of(d).tobytes() != pcm_of(a).tobytes()


def test_ogg_opus_messagepack_is_a_decodable_ogg_stream(engine: EngineProcess):
    session = talk(engine, WORDS, fmt="OggOpusMessagePack")
    assert session.types[:2] == ["Ready", "OggOpus"]
    pages = [bytes(m["data"]) for m in session.of("OggOpus")]
    assert pages[0].startswith(b"OggS")
    assert b"OpusHead" in pages[0]
    assert [w["text"] for w in session.of("Text")] == WORDS
    pcm, sample_rate = sphn.read_opus_bytes(b"".join(pages))
    assert sample_rate == 48000
    frames = len(pages) - 1
    assert pcm.shape[-1] == pytest.approx(frames * 1920 * 2, rel=0.1)


def test_raw_ogg_opus_and_raw_pcm(engine: EngineProcess):
    ogg = talk(engine, WORDS, fmt="OggOpus")
    assert all(isinstance(m, bytes) for m in ogg.messages)
    assert ogg.messages[0].startswith(b"OggS")
    assert b"OpusHead" in ogg.messages[0]
    pcm, _ = sphn.read_opus_bytes(b"".join(ogg.messages))
    assert pcm.shape[-1] > 0
    raw = talk(engine, WORDS, fmt="Pcm")
    assert raw.messages
    assert {len(m) for m in raw.messages} == {1920 * 4}
    samples = np.frombuffer(b"".join(raw.messages), dtype="<f4")
    reference = pcm_of(talk(engine, WORDS))
    assert samples.tobytes() == reference.tobytes()


def test_default_format_is_raw_ogg_opus_as_kyutais_server(engine: EngineProcess):
    session = talk(engine, WORDS, fmt=None, wait_ready=False)
    assert session.messages and all(isinstance(m, bytes) for m in session.messages)
    assert session.messages[0].startswith(b"OggS")  # the Ogg header first, then one page per frame


def test_audio_starts_before_eos(engine: EngineProcess):
    async def scenario() -> tuple[list[str], bool]:
        got: list[str] = []
        async with aiohttp.ClientSession() as http:
            target = url(engine.ws, format="PcmMessagePack", voice="tiny-a.wav")
            async with http.ws_connect(target, headers={"kyutai-api-key": KEY}) as ws:
                first = msgpack.unpackb((await ws.receive(timeout=10)).data)
                got.append(first["type"])
                for word in ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]:
                    await ws.send_bytes(msgpack.packb({"type": "Text", "text": word}))
                audio_before_eos = False
                for _ in range(200):
                    msg = msgpack.unpackb((await ws.receive(timeout=10)).data)
                    got.append(msg["type"])
                    if msg["type"] == "Audio":
                        audio_before_eos = True
                        break
                await ws.send_bytes(msgpack.packb({"type": "Eos"}))
                async for msg in ws:
                    got.append(msgpack.unpackb(msg.data)["type"])
        return got, audio_before_eos

    got, audio_before_eos = asyncio.run(scenario())
    assert got[0] == "Ready"
    assert audio_before_eos


def test_auth_header_or_auth_id_else_401(engine: EngineProcess):
    for key in (None, "wrong"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            talk(engine, WORDS, key=key)
        assert err.value.status == 401
    session = talk(engine, WORDS, key=None, query={"auth_id": KEY})
    assert session.types[0] == "Ready"
    assert 'outcome="unauthorized"' in metrics(engine)


def test_unknown_voice_or_a_path_is_a_clear_error(engine: EngineProcess):
    for voice, words in (("nobody.wav", "unknown voice"), ("../voices/tiny-a.wav", "not a voice name")):
        session = talk(engine, WORDS, voice=voice)
        assert session.types == ["Error"]
        assert words in session.messages[0]["message"]
    raw = talk(engine, WORDS, voice="nobody", fmt="Pcm")
    assert raw.messages == []
    assert raw.close_code == 1008
    assert "unknown voice" in raw.close_reason
    assert 'reason="unknown_voice"' in metrics(engine)
    assert_serves(engine)


def test_bad_query_values(engine: EngineProcess):
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        talk(engine, WORDS, fmt="Wav")
    assert err.value.status == 400
    for query, words in (
        ({"seed": "abc"}, "is not a int"),
        ({"temperature": "-1"}, "outside"),
        ({"cfg_alpha": "1.7"}, "cfg 1.7 is not one of"),
        ({"voices": "a"}, "not supported"),
        ({"top_k": "100000"}, "top_k must be at most"),
    ):
        session = talk(engine, WORDS, query=query)
        assert session.types == ["Error"], query
        assert words in session.messages[0]["message"], query
    assert_serves(engine)


def test_bad_messages_get_errors_and_the_session_carries_on(engine: EngineProcess):
    bad = [
        b"\xc1",  # never valid MessagePack
        msgpack.packb([1, 2]),
        msgpack.packb({"type": "Nope"}),
        msgpack.packb({"type": "Text", "text": 3}),
        msgpack.packb({"type": "Voice", "embeddings": [0.0], "shape": [1]}),
        msgpack.packb({"type": "Text", "text": "x" * 2500}),
    ]
    session = talk(engine, WORDS, raw=bad)
    errors = [m["message"] for m in session.of("Error")]
    assert len(errors) == len(bad)
    assert "not MessagePack" in errors[0]
    assert "not a map" in errors[1]
    assert "unknown message type 'Nope'" in errors[2]
    assert "'text' must be a string" in errors[3]
    assert "Voice messages are not supported" in errors[4]
    assert "longer than 2000 characters" in errors[5]
    assert [w["text"] for w in session.of("Text")] == WORDS  # the good text was still spoken
    assert session.of("Audio")
    text = metrics(engine)
    for reason in ("bad_message", "unknown_type", "bad_field", "unsupported", "text_too_long"):
        assert f'reason="{reason}"' in text
    assert_serves(engine)


def test_text_after_eos_is_refused(engine: EngineProcess):
    eos = msgpack.packb({"type": "Eos"})
    late = msgpack.packb({"type": "Text", "text": "late"})
    session = talk(engine, [" ".join(WORDS), eos, late], eos=False)
    assert any("after Eos" in m["message"] for m in session.of("Error"))
    assert [w["text"] for w in session.of("Text")] == WORDS


def test_kyutai_raw_frames_text_and_nul_eos(engine: EngineProcess):
    async def scenario() -> list[dict]:
        out = []
        async with aiohttp.ClientSession() as http:
            target = url(engine.ws, format="PcmMessagePack", voice="tiny-a.wav")
            async with http.ws_connect(target, headers={"kyutai-api-key": KEY}) as ws:
                await ws.send_str("hello this is")
                await ws.send_str("a tiny test")
                await ws.send_bytes(b"\0")
                async for msg in ws:
                    out.append(msgpack.unpackb(msg.data))
        return out

    messages = asyncio.run(scenario())
    assert messages[0]["type"] == "Ready"
    assert [m["text"] for m in messages if m["type"] == "Text"] == WORDS


def test_eos_without_text_closes_without_audio(engine: EngineProcess):
    session = talk(engine, [])
    assert session.types == ["Ready"]
    assert session.close_code == 1000


def test_oversized_frame_closes_only_that_session(engine: EngineProcess):
    session = talk(engine, [], raw=[b"\x00" * (MAX_MESSAGE_BYTES + 10)], eos=False)
    assert session.close_code == 1009
    assert_serves(engine)


def test_idle_client_times_out_and_frees_its_slot(engine: EngineProcess):
    session = talk(engine, [], eos=False, timeout_s=20)
    assert session.types[0] == "Ready"
    assert "no text or Eos for 2 s" in session.messages[-1]["message"]
    assert_serves(engine)


def test_all_slots_taken_gives_no_free_channels_first(engine: EngineProcess):
    async def scenario() -> tuple[list[dict], list[dict]]:
        async with aiohttp.ClientSession() as http:
            target = url(engine.ws, format="PcmMessagePack", voice="tiny-a.wav")
            headers = {"kyutai-api-key": KEY}
            holders = [await http.ws_connect(target, headers=headers) for _ in range(2)]
            for ws in holders:
                assert msgpack.unpackb((await ws.receive(timeout=10)).data)["type"] == "Ready"
                await ws.send_bytes(msgpack.packb({"type": "Text", "text": "hold"}))
            async with http.ws_connect(target, headers=headers) as third:
                refused = [msgpack.unpackb(m.data) async for m in third]
            raw_target = url(engine.ws, format="Pcm", voice="tiny-a.wav")
            async with http.ws_connect(raw_target, headers=headers) as fourth:
                raw = [m.data async for m in fourth]
                raw_close = (fourth.close_code, raw)
            for ws in holders:
                await ws.close()
            return refused, [{"close": raw_close[0], "messages": raw_close[1]}]

    refused, raw = asyncio.run(scenario())
    assert refused == [{"type": "Error", "message": "no free channels"}]
    assert raw == [{"close": 1013, "messages": []}]
    assert 'outcome="full"' in metrics(engine)
    assert_serves(engine)


def test_client_leaving_mid_stream_frees_the_slot(engine: EngineProcess):
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            target = url(engine.ws, format="PcmMessagePack", voice="tiny-a.wav")
            async with http.ws_connect(target, headers={"kyutai-api-key": KEY}) as ws:
                await ws.send_bytes(msgpack.packb({"type": "Text", "text": " ".join(WORDS * 5)}))
                await ws.send_bytes(msgpack.packb({"type": "Eos"}))
                for _ in range(50):
                    if msgpack.unpackb((await ws.receive(timeout=10)).data)["type"] == "Audio":
                        break
            # leaving the block closes the socket mid-speech

    asyncio.run(scenario())
    assert_serves(engine)


def test_status_lists_voices_and_health(engine: EngineProcess):
    entry = engine.status()["modules"]["tts"]
    assert entry["route"] == "/api/tts_streaming"
    assert entry["voices"] == ["tiny-a.wav", "tiny-b.wav"]
    assert entry["default_voice"] == "tiny-a.wav"
    with urllib.request.urlopen(engine.http + "/healthz", timeout=5) as r:
        assert json.loads(r.read())["status"] == "ok"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(engine.http + "/nope", timeout=5)
