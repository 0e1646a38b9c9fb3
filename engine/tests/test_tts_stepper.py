"""The batched TTS stepper on the tiny TTS set: determinism, slot independence, streaming text, voices."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tts_helpers import tiny_tts_dir
from voice_engine.models.tts import (
    FRAME_SIZE,
    TtsEos,
    TtsInput,
    TtsOutput,
    TtsParams,
    TtsSettings,
    TtsStepper,
    TtsText,
    VoiceError,
    Word,
)
from voice_engine.tiny import tts as tiny_tts

TEXT = ["hello", "this", "is", "a", "tiny", "model", "for", "tests"]
OTHER = ["two", "three", "four", "five", "six", "seven", "eight"]


@pytest.fixture(scope="module")
def tts_dir(models_root: Path) -> Path:
    return tiny_tts_dir(models_root)


def _stepper(model_dir: Path, slots: int = 3, voices: Path | None = None, **settings: object) -> TtsStepper:
    torch.set_num_threads(1)
    return TtsStepper.load(
        model_dir,
        slots=slots,
        device="cpu",
        precision="fp32",
        voices_dir=voices or model_dir / tiny_tts.VOICES_DIR_NAME,
        settings=TtsSettings(**settings),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def stepper(tts_dir: Path) -> TtsStepper:
    return _stepper(tts_dir)


@dataclass
class Other:
    slot: int
    start: int
    stop: int  # leaves (stops being stepped, as a released slot) at this step
    seed: int = 100


@dataclass
class Result:
    pcm: np.ndarray
    words: list[Word]
    first_audio_step: int | None
    eos_step: int
    steps: int


def run(
    stepper: TtsStepper,
    slot: int = 1,
    words: Sequence[str] = TEXT,
    *,
    voice: str = tiny_tts.DEFAULT_VOICE,
    seed: int = 7,
    others: Sequence[Other] = (),
    stream_every: int = 0,  # 0: all text in the first step; n: one word every n steps
    max_steps: int = 400,
) -> Result:
    pcm: list[np.ndarray] = []
    got: list[Word] = []
    resets: dict[int, object] = {slot: TtsParams(voice=stepper.load_voice(voice), seed=seed)}
    queue = list(words)
    first = None
    eos_step = 0
    for step in range(max_steps):
        inputs: dict[int, list[TtsInput]] = {slot: []}
        if not stream_every:
            if step == 0:
                inputs[slot] = [TtsText(" ".join(queue)), TtsEos()]
        elif step % stream_every == 0:
            if queue:
                inputs[slot] = [TtsText(queue.pop(0))]
            elif not eos_step:
                inputs[slot] = [TtsEos()]
                eos_step = step
        for other in others:
            if step == other.start:
                resets[other.slot] = TtsParams(voice=stepper.load_voice("tiny-b"), seed=other.seed + step)
                inputs[other.slot] = [TtsText(" ".join(OTHER)), TtsEos()]
            elif other.start < step < other.stop:
                inputs[other.slot] = []
        out: TtsOutput = stepper.step(inputs, resets)[slot]
        resets = {}
        got += out.words
        if out.pcm is not None:
            assert out.pcm.dtype == np.float32
            assert out.pcm.shape == (FRAME_SIZE,)
            pcm.append(out.pcm)
            if first is None:
                first = step
        if out.done:
            return Result(np.concatenate(pcm), got, first, eos_step, step)
    raise AssertionError("the session did not finish")


def test_same_seed_same_bytes(tmp_path: Path, tts_dir: Path):
    again = tiny_tts.make(tmp_path / "again", seed=0)
    other = tiny_tts.make(tmp_path / "other", seed=1)
    files = sorted(p.relative_to(tts_dir) for p in tts_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    for rel in files:
        assert (tts_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert (tts_dir / tiny_tts.LM_NAME).read_bytes() != (other / tiny_tts.LM_NAME).read_bytes()
    voices = sorted(p.name for p in (tts_dir / "voices").iterdir())
    assert voices == sorted(name + tiny_tts.voice_suffix(0) for name in tiny_tts.VOICES)


def test_session_is_deterministic_and_speaks_its_words(stepper: TtsStepper):
    a = run(stepper)
    b = run(stepper)
    assert a.pcm.tobytes() == b.pcm.tobytes()
    assert a.words == b.words
    assert [w.text for w in a.words] == TEXT
    starts = [w.start_s for w in a.words]
    assert starts == sorted(starts)
    assert all(w.start_s < w.stop_s for w in a.words)
    assert float(np.abs(a.pcm).max()) > 1e-3  # not silence
    assert len(a.pcm) % FRAME_SIZE == 0


def test_output_does_not_depend_on_other_slots(stepper: TtsStepper):
    alone = run(stepper, slot=1)
    crowded = run(
        stepper,
        slot=1,
        others=[Other(0, 0, 30), Other(2, 5, 12), Other(0, 35, 70), Other(2, 14, 45)],
    )
    assert alone.pcm.tobytes() == crowded.pcm.tobytes()
    assert alone.words == crowded.words
    moved = run(stepper, slot=2, others=[Other(1, 3, 20), Other(0, 0, 50)])
    assert alone.pcm.tobytes() == moved.pcm.tobytes()


def test_streamed_words_give_the_same_speech_and_audio_starts_before_eos(stepper: TtsStepper):
    whole = run(stepper)
    streamed = run(stepper, stream_every=4)
    assert streamed.pcm.tobytes() == whole.pcm.tobytes()
    assert streamed.words == whole.words
    assert streamed.first_audio_step is not None
    assert streamed.first_audio_step < streamed.eos_step


def test_audio_starts_after_the_models_audio_delay(stepper: TtsStepper):
    result = run(stepper)
    assert result.first_audio_step == stepper.delay_steps + stepper.max_delay


def test_voice_seed_and_text_matter(stepper: TtsStepper):
    base = run(stepper)
    assert run(stepper, voice="tiny-b").pcm.tobytes() != base.pcm.tobytes()
    other_seed = run(stepper, seed=8)
    assert other_seed.pcm.tobytes() != base.pcm.tobytes()
    other_text = run(stepper, words=OTHER)
    assert other_text.pcm.tobytes() != base.pcm.tobytes()
    assert [w.text for w in other_text.words] == OTHER


def test_a_slot_waits_for_text_and_takes_no_step(stepper: TtsStepper):
    voice = stepper.load_voice("tiny-a")
    out = stepper.step({0: [TtsText("hello")]}, {0: TtsParams(voice=voice)})[0]
    assert out.waiting
    assert out.pcm is None
    for _ in range(5):
        out = stepper.step({0: []}, {})[0]
        assert out.waiting
    out = stepper.step({0: [TtsEos()]}, {})[0]
    assert not out.waiting


def test_eos_without_text_ends_at_once(stepper: TtsStepper):
    voice = stepper.load_voice("tiny-a")
    out = stepper.step({0: [TtsEos()]}, {0: TtsParams(voice=voice)})[0]
    assert out.done
    assert out.pcm is None


def test_step_limit_ends_the_session_with_a_reason(tts_dir: Path):
    small = _stepper(tts_dir, slots=1, max_steps=12)
    voice = small.load_voice("tiny-a")
    out = small.step({0: [TtsText(" ".join(TEXT * 3)), TtsEos()]}, {0: TtsParams(voice=voice)})[0]
    for _ in range(20):
        if out.done:
            break
        out = small.step({0: []}, {})[0]
    assert out.done
    assert out.error is not None
    assert "limit of 12 steps" in out.error


def test_voice_names_only(stepper: TtsStepper, tmp_path: Path, tts_dir: Path):
    assert stepper.load_voice("tiny-a").name == "tiny-a"
    assert stepper.load_voice("tiny-a.wav").path == stepper.load_voice("tiny-a").path
    assert stepper.voice_names() == list(tiny_tts.VOICES)
    for bad in ("../tiny-a.wav", "voices/tiny-a.wav", "a\\b", "", ".hidden", "x\x00y"):
        with pytest.raises(VoiceError, match="not a voice name"):
            stepper.load_voice(bad)
    with pytest.raises(VoiceError, match="unknown voice"):
        stepper.load_voice("nobody.wav")
    voices = tmp_path / "voices"
    shutil.copytree(tts_dir / "voices", voices)
    suffix = tiny_tts.voice_suffix(0)
    (voices / ("broken.wav" + suffix)).write_bytes(b"not a safetensors file")
    odd = _stepper(tts_dir, slots=1, voices=voices)
    with pytest.raises(VoiceError, match="cannot be loaded"):
        odd.load_voice("broken.wav")
    assert odd.default_voice is not None
    assert odd.default_voice.name == "tiny-a.wav"  # the first voice that loads


def test_cfg_must_be_a_trained_value(stepper: TtsStepper):
    voice = stepper.load_voice("tiny-a")
    stepper.check_params(TtsParams(voice=voice, cfg_coef=1.5))
    with pytest.raises(VoiceError, match=r"cfg 1\.7 is not one of"):
        stepper.check_params(TtsParams(voice=voice, cfg_coef=1.7))


def test_text_the_tokenizer_refuses_is_skipped_with_a_reason(stepper: TtsStepper):
    voice = stepper.load_voice("tiny-a")
    out = stepper.step({0: [TtsText("\ud800"), TtsText("hello there")]}, {0: TtsParams(voice=voice)})[0]
    assert len(out.rejected) == 1
    assert "cannot be tokenized" in out.rejected[0]
    out = stepper.step({0: [TtsEos()]}, {})[0]
    assert not out.done
    assert not out.rejected
