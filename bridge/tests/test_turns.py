"""Turn-taking logic and the audio helpers of agent voice, without I/O."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import sphn

from personaplex_bridge import asr
from personaplex_bridge.audio import (
    CHUNK_S,
    CHUNK_SAMPLES,
    BadAudio,
    Chunker,
    OpusDecoder,
    level_dbfs,
    ogg_end_s,
)
from personaplex_bridge.turns import WARMUP_STEPS, TurnDetector, TurnSettings

LOUD = -20.0
QUIET = -80.0


def warmed(settings: TurnSettings | None = None) -> TurnDetector:
    det = TurnDetector(settings or TurnSettings())
    for _ in range(WARMUP_STEPS):
        det.audio(CHUNK_S, LOUD)
        det.step((0.0, 0.0, 0.0, 0.0))
    return det


def test_turn_ends_on_pause_prediction_plus_silence():
    det = warmed()
    det.word("hello")
    assert det.pause == 0.0  # reset by the turn's first word
    det.audio(CHUNK_S, LOUD)
    det.word("there")
    det.step((0.9, 0.9, 0.9, 0.9))
    assert det.pause > 0.6
    assert not det.turn_ended(), "not silent yet"
    # 0.24 s of quiet audio: not enough; 0.32 s: the turn ends.
    for _ in range(3):
        det.audio(CHUNK_S, QUIET)
        det.step((0.9,) * 4)
    assert not det.turn_ended()
    det.audio(CHUNK_S, QUIET)
    det.step((0.9,) * 4)
    assert det.turn_ended()
    assert det.take_turn() == "hello there"
    assert not det.turn_ended(), "a new turn has no words"


def test_low_pause_prediction_keeps_the_turn_open():
    det = warmed()
    det.word("hello")
    for _ in range(10):
        det.audio(CHUNK_S, QUIET)
        det.step((0.9, 0.9, 0.1, 0.9))  # head 2 says "still speaking"
    assert det.pause < 0.6
    assert not det.turn_ended()
    det.step((0.1, 0.1, 0.95, 0.1))
    assert det.turn_ended()


def test_head_index_falls_back_to_the_last_head_and_warmup_is_ignored():
    det = TurnDetector(TurnSettings(pause_head=7))
    det.word("x")
    for _ in range(WARMUP_STEPS):
        det.step((0.0, 1.0))
    assert det.pause == 0.0, "warm-up steps are ignored"
    det.step((0.0, 1.0))
    assert det.pause > 0.99


def test_silence_is_the_level_gate_not_the_words():
    # Words keep coming in quiet audio (the tiny model hears words in silence): the turn still ends.
    det = warmed(TurnSettings(pause_threshold=0.0))
    for i in range(4):
        det.audio(CHUNK_S, QUIET)
        det.word(f"w{i}")
    assert det.turn_ended()
    # Loud audio keeps the turn open, with or without new words.
    det = warmed(TurnSettings(pause_threshold=0.0))
    det.word("a")
    for _ in range(8):
        det.audio(CHUNK_S, LOUD)
    assert not det.turn_ended()
    assert det.silence_s == 0.0
    # A higher gate makes the same noise count as silence.
    det = warmed(TurnSettings(pause_threshold=0.0, silence_dbfs=-10.0))
    det.word("a")
    for _ in range(4):
        det.audio(CHUNK_S, LOUD)
    assert det.turn_ended()


def test_empty_words_are_not_speech():
    det = warmed(TurnSettings(pause_threshold=0.0, min_silence_s=0.0))
    det.word("")
    det.word("   ")
    assert det.words == []
    assert not det.turn_ended()


def test_barge_in_needs_loud_audio_and_a_word_or_a_low_pause():
    det = warmed()
    det.step((1.0,) * 4)
    det.playback_started()
    det.audio(CHUNK_S, QUIET)
    det.word("echo")
    assert not det.barge_in(), "quiet audio never interrupts"
    det.audio(CHUNK_S, LOUD)
    assert det.barge_in(), "a word since the playback started, and loud audio"
    det.step((1.0,) * 4)  # (the turn's first word reset the pause prediction)
    det.playback_started()
    assert not det.barge_in(), "loud audio, but no word and the pause prediction is high"
    det.step((0.1,) * 4)
    assert det.barge_in(), "the pause prediction fell below the threshold"


def test_chunker_and_levels():
    chunker = Chunker()
    assert chunker.push(np.zeros(1000, dtype=np.float32)) == []
    chunks = chunker.push(np.ones(3000, dtype=np.float32))
    assert [c.size for c in chunks] == [CHUNK_SAMPLES, CHUNK_SAMPLES]
    assert chunks[0][:1000].sum() == 0
    assert chunks[0][1000:].min() == 1.0
    assert chunker.push(np.zeros(CHUNK_SAMPLES - 161, dtype=np.float32)) == []  # 160 were left
    assert [c.size for c in chunker.push(np.zeros(1, dtype=np.float32))] == [CHUNK_SAMPLES]
    assert level_dbfs(np.zeros(10, dtype=np.float32)) == -math.inf
    assert level_dbfs(np.full(10, 0.1, dtype=np.float32)) == pytest.approx(-20.0)


def test_decoder_and_ogg_timing():
    writer = sphn.OpusStreamWriter(24000)
    pages = [bytes(writer.append_pcm(np.full(CHUNK_SAMPLES, 0.1, dtype=np.float32))) for _ in range(5)]
    ends = [ogg_end_s(page) for page in pages]
    assert ends[1:] == pytest.approx([0.16, 0.24, 0.32, 0.40], abs=0.001)
    assert ogg_end_s(b"not ogg") is None
    decoder = OpusDecoder()
    total = sum(decoder.decode(page).size for page in pages)
    assert total == 5 * CHUNK_SAMPLES
    with pytest.raises(BadAudio):
        decoder.decode(b"garbage")
    # After a bad frame the decoder starts over with a fresh stream.
    writer = sphn.OpusStreamWriter(24000)
    assert decoder.decode(bytes(writer.append_pcm(np.zeros(CHUNK_SAMPLES, dtype=np.float32)))).size > 0


def test_stt_messages_are_parsed_strictly():
    pack = msgpack.packb
    assert asr.parse_event(pack({"type": "Word", "text": "hi", "start_time": 1.5})) == asr.Word("hi", 1.5)
    assert asr.parse_event(pack({"type": "Step", "step_idx": 3, "prs": [0.5, 1]})) == asr.Step(3, (0.5, 1.0))
    assert asr.parse_event(pack({"type": "Marker", "id": 7})) == asr.Marker(7)
    assert asr.parse_event(pack({"type": "EndWord", "stop_time": 2.0})) == asr.EndWord(2.0)
    assert asr.parse_event(pack({"type": "Ready"})) is None
    for bad in (
        b"\xc1",
        pack([1, 2]),
        pack({"type": "Word", "text": 3, "start_time": 0}),
        pack({"type": "Step", "step_idx": 1, "prs": ["x"]}),
        pack({"type": "Marker", "id": "seven"}),
    ):
        with pytest.raises(ValueError, match=r"MessagePack|map|not a|is not"):
            asr.parse_event(bad)
    with pytest.raises(asr.AsrLost, match="boom"):
        asr.parse_event(pack({"type": "Error", "message": "boom"}))
    audio = msgpack.unpackb(asr.pack_audio(np.full(1920, 0.25, dtype=np.float32)))
    assert audio["type"] == "Audio"
    assert len(audio["pcm"]) == 1920
    assert audio["pcm"][0] == 0.25
