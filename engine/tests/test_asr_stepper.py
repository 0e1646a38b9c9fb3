"""The batched STT stepper: Kyutai's word logic, determinism, and slot independence (bit-identical)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from asr_helpers import frames, noise, stt_model_dir, tone
from voice_engine.models.asr import EPAD_ID, PAD_ID, AsrOutput, AsrStepper, AsrWord, asr_delay_for

SLOTS = 4


@pytest.fixture(scope="module")
def stepper(models_root: Path) -> AsrStepper:
    torch.set_num_threads(1)
    st = AsrStepper.from_model_dir(stt_model_dir(models_root), SLOTS, "fp32", "cpu")
    st.warmup()
    return st


def run_schedule(st: AsrStepper, schedule: dict[int, tuple[int, list[np.ndarray]]], steps: int):
    """``schedule``: session -> (first step, frames), each session on its own slot (session id)."""
    outputs: dict[int, list[AsrOutput]] = {s: [] for s in schedule}
    for t in range(steps):
        inputs, resets = {}, {}
        for session, (start, fr) in schedule.items():
            if t == start:
                resets[session] = None
            if start <= t < start + len(fr):
                inputs[session] = [fr[t - start]]
        for slot, out in st.step(inputs, resets).items():
            outputs[slot].append(out)
    return outputs


def test_delay_comes_from_the_stt_config_as_in_kyutai_configs():
    assert asr_delay_for({"audio_delay_seconds": 0.5}) == 6
    assert asr_delay_for({"audio_delay_seconds": 2.5}) == 32
    assert asr_delay_for({"audio_delay_seconds": 1.0}) == 12
    assert asr_delay_for({"asr_delay_in_tokens": 9, "audio_delay_seconds": 0.5}) == 9


def test_the_tiny_model_gives_words_word_ends_and_pause_predictions(stepper: AsrStepper):
    out = run_schedule(stepper, {0: (0, frames(noise(6.0, seed=1)))}, 75)[0]
    assert [o.step_idx for o in out] == list(range(1, 76))
    words = [o.word for o in out if o.word]
    ends = [o.end_word for o in out if o.end_word is not None]
    assert words
    assert ends
    assert all(w.text for w in words)
    # Nothing before the text delay; times are multiples of 80 ms counted from the delay.
    assert all(o.word is None and o.end_word is None for o in out[: stepper.asr_delay_in_tokens - 1])
    assert all(abs(e * 12.5 - round(e * 12.5)) < 1e-9 for e in ends)
    assert all(o.prs is not None and len(o.prs) == 4 and all(0 <= p <= 1 for p in o.prs) for o in out)


def test_silence_reads_as_a_pause_and_sound_does_not(stepper: AsrStepper):
    # The tiny set is shaped so that turn-taking on the pause prediction works on it.
    quiet = run_schedule(stepper, {0: (0, frames(np.zeros(3 * 24000, dtype=np.float32)))}, 37)[0]
    assert all(o.word is None for o in quiet)
    assert min(o.prs[2] for o in quiet[8:]) > 0.95
    loud = run_schedule(stepper, {0: (0, frames(noise(3.0, seed=6)))}, 37)[0]
    assert float(np.mean([o.prs[2] for o in loud[8:]])) < 0.6
    assert any(o.word for o in loud)


def test_same_audio_same_outputs_and_audio_matters(stepper: AsrStepper):
    audio = frames(noise(3.0, seed=2))
    a = run_schedule(stepper, {1: (0, audio)}, len(audio))[1]
    b = run_schedule(stepper, {1: (0, audio)}, len(audio))[1]
    assert a == b
    c = run_schedule(stepper, {1: (0, frames(tone(3.0)))}, len(audio))[1]
    assert [o.prs for o in c] != [o.prs for o in a]


def test_a_session_is_bit_identical_alone_or_among_others_joining_and_leaving(stepper: AsrStepper):
    mine = frames(noise(4.0, seed=3))
    alone = run_schedule(stepper, {2: (0, mine)}, len(mine))[2]
    # The same session starts at step 7 on slot 2 while others come and go on the other slots:
    # one already running when it joins, one joining mid-way and leaving before it ends, one
    # joining on the same step, one that reuses a slot freed by another session.
    crowd = {
        0: (0, frames(noise(2.0, seed=10))),
        1: (12, frames(tone(1.5, 300.0))),
        3: (7, frames(noise(1.0, seed=11, level=0.05))),
        2: (7, mine),
    }
    together = run_schedule(stepper, crowd, 7 + len(mine))
    assert together[2] == alone
    # Slot 3 is reused by a new session after the first left: still independent.
    later = run_schedule(stepper, {3: (0, mine), 0: (5, frames(noise(1.0, seed=12)))}, len(mine))
    assert later[3] == alone


def test_a_reset_slot_starts_fresh(stepper: AsrStepper):
    mine = frames(noise(2.0, seed=4))
    first = run_schedule(stepper, {0: (0, mine)}, len(mine))[0]
    # Leave slot 0 half-way through another stream, then start the same stream again on it.
    run_schedule(stepper, {0: (0, frames(tone(1.0, 1000.0)))}, 5)
    again = run_schedule(stepper, {0: (0, mine)}, len(mine))[0]
    assert again == first


def test_idle_slots_produce_nothing_and_keep_their_state(stepper: AsrStepper):
    mine = frames(noise(2.0, seed=5))
    straight = run_schedule(stepper, {1: (0, mine)}, len(mine))[1]
    # The same stream with pauses (steps where only another slot runs) gives the same outputs.
    outs: list[AsrOutput] = []
    other = frames(tone(2.0, 700.0))
    for t, frame in enumerate(mine):
        got = stepper.step({1: [frame]}, {1: None} if t == 0 else {})
        outs.append(got[1])
        if t % 3 == 0:
            assert 1 not in stepper.step({0: [other[t]]}, {0: None} if t == 0 else {})
    assert outs == straight
    assert stepper.step({}, {}) == {}


def test_word_logic_mirrors_kyutai(stepper: AsrStepper):
    # Drive the per-slot word state with a token sequence, as Kyutai's State::step_tokens does.
    delay = stepper.asr_delay_in_tokens
    w1, w2 = 20, 21
    seq = [w1] * (delay - 1) + [PAD_ID, EPAD_ID, w1, w2, PAD_ID, PAD_ID, EPAD_ID, w2, EPAD_ID]
    stepper._reset([3])
    outs = [stepper._advance(3, tok, None) for tok in seq]
    events = [(o.step_idx, o.word, o.end_word) for o in outs if o.word or o.end_word is not None]
    text = stepper.tokenizer.decode
    assert events == [
        # tokens before the delay are ignored; EPAD at step delay+1 sets the start time to 1/12.5
        (delay + 4, AsrWord(text([w1, w2]), 1 / 12.5), None),
        (delay + 6, None, 6 / 12.5),
        (delay + 8, AsrWord(text([w2]), 6 / 12.5), 8 / 12.5),
    ]
    assert all(o.prs is None for o in outs)


def test_a_frame_of_the_wrong_size_is_refused(stepper: AsrStepper):
    with pytest.raises(ValueError, match="1920 samples"):
        stepper.step({0: [np.zeros(100, dtype=np.float32)]}, {0: None})
