"""The chat stepper in process (tiny PersonaPlex- and Moshi-shaped sets, CPU, fp32).

Slot independence, the prefill (WAV and ``.pt`` voices, text prompts), seeds, and the served depformer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chat_helpers import tiny_chat_dir, user_frames
from voice_engine.models import chat_prompt, loading
from voice_engine.models.chat import ChatOutput, ChatParams, ChatStepper
from voice_engine.models.sampling import SamplingParams
from voice_engine.tiny import chat as tiny_chat

SLOTS = 3


@pytest.fixture(scope="module")
def pp_dir(models_root: Path) -> Path:
    return tiny_chat_dir(models_root, "personaplex")


@pytest.fixture(scope="module")
def stepper(pp_dir: Path) -> ChatStepper:
    torch.set_num_threads(1)
    return ChatStepper.from_model_dir(pp_dir, SLOTS, "fp32", "cpu")


@pytest.fixture(scope="module")
def voices(stepper: ChatStepper, pp_dir: Path) -> dict[str, chat_prompt.Voice]:
    model = loading.open_model_dir(pp_dir)
    mimi = ChatStepper.load_mimi(model, stepper.device, stepper.dep_q)
    out: dict[str, chat_prompt.Voice] = {}
    for name in ("TINYF0.wav", "TINYM0.wav"):
        pcm = chat_prompt.read_voice_audio(pp_dir / "voices" / name)
        out[name] = chat_prompt.encode_voice(mimi, pcm, stepper.device)
    out["TINYF0.pt"] = chat_prompt.load_voice_pt(pp_dir / "voices" / "TINYF0.pt", stepper.layout)
    return out


def params(
    stepper: ChatStepper, voice: chat_prompt.Voice | None, text: str | None, seed: int = 7
) -> ChatParams:
    tokens = chat_prompt.text_prompt_tokens(stepper.tokenizer, text)
    sampling = SamplingParams(seed=seed, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    return ChatParams(sampling, chat_prompt.build_prefill(stepper.layout, voice, tokens))


def run_alone(stepper: ChatStepper, slot: int, p: ChatParams, frames: list[np.ndarray]) -> list[ChatOutput]:
    stepper.warmup(1)
    resets = {slot: p}
    while True:
        out = stepper.step({slot: []}, resets)
        resets = {}
        if slot in out and out[slot].ready:
            break
    return [stepper.step({slot: [f]}, {})[slot] for f in frames]


def same(a: list[ChatOutput], b: list[ChatOutput]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.text != y.text or (x.pcm is None) != (y.pcm is None):
            return False
        if x.pcm is not None and not np.array_equal(x.pcm, y.pcm):
            return False
    return True


def test_pt_voice_replays_exactly_what_its_wav_gives(stepper: ChatStepper, voices: dict) -> None:
    frames = user_frames(1, 8)
    wav = run_alone(stepper, 0, params(stepper, voices["TINYF0.wav"], "you are a tiny model"), frames)
    pt = run_alone(stepper, 0, params(stepper, voices["TINYF0.pt"], "you are a tiny model"), frames)
    assert all(o.pcm is not None and o.pcm.shape == (1920,) for o in wav)  # audio from the first frame
    assert same(wav, pt)
    other = run_alone(stepper, 0, params(stepper, voices["TINYM0.wav"], "you are a tiny model"), frames)
    assert not same(wav, other)  # the voice matters


def test_text_prompt_and_seed_matter_and_reproduce(stepper: ChatStepper, voices: dict) -> None:
    frames = user_frames(2, 8)
    voice = voices["TINYF0.pt"]
    a = run_alone(stepper, 1, params(stepper, voice, "listen to the music"), frames)
    again = run_alone(stepper, 2, params(stepper, voice, "listen to the music"), frames)
    assert same(a, again)  # same prompts and seed, another slot: the same conversation
    assert not same(a, run_alone(stepper, 1, params(stepper, voice, "the weather is nice"), frames))
    assert not same(a, run_alone(stepper, 1, params(stepper, voice, None), frames))
    assert not same(a, run_alone(stepper, 1, params(stepper, voice, "listen to the music", seed=8), frames))


def test_prefill_tables_follow_the_delays(stepper: ChatStepper, voices: dict) -> None:
    layout = stepper.layout
    tokens = chat_prompt.text_prompt_tokens(stepper.tokenizer, "hello")
    assert tokens[1] == stepper.tokenizer.piece_to_id("<system>") and tokens[-1] == tokens[1]
    codes = voices["TINYF0.wav"].codes
    plan = chat_prompt.build_prefill(layout, voices["TINYF0.wav"], tokens)
    m = codes.shape[0]
    assert plan.steps == m + 12 + len(tokens) and plan.replay_steps == 0
    assert (plan.user == torch.tensor(layout.sine)).all()  # sine on the user channel throughout
    # Step j forces the text at j + 1 (delay 0): the text prompt starts at frame m + 6.
    assert plan.forced[m + 5 : m + 5 + len(tokens), 0].tolist() == tokens
    assert plan.forced[m + 5 + len(tokens) :, 0].tolist() == [chat_prompt.PAD_ID] * 6 + [-1]  # last: sampled
    # Semantic codebook (delay 0) at j + 1, acoustic ones (delay 1) at j.
    assert plan.forced[0, 1] == codes[1, 0] and plan.forced[0, 2] == codes[0, 1]
    assert plan.forced[-1, 1] == -1  # the last step samples the undelayed agent codebook
    pt = chat_prompt.build_prefill(layout, voices["TINYF0.pt"], tokens)
    assert pt.replay_steps == m - 1 and pt.steps == plan.steps
    assert torch.equal(pt.forced, plan.forced[m - 1 :]) and torch.equal(pt.user, plan.user[m - 1 :])


def test_slot_is_bit_identical_alone_or_among_others(stepper: ChatStepper, voices: dict) -> None:
    """Slot 1's conversation, alone, then with slot 0 talking and leaving, slot 2 joining with a
    ``.pt`` prefill (its forced and replayed steps share slot 1's batches), then slot 0 rejoining with
    a WAV prefill."""
    frames = user_frames(3, 40)
    mine = params(stepper, voices["TINYF0.wav"], "you are a tiny model", seed=11)
    alone = run_alone(stepper, 1, mine, frames)
    stepper.warmup(1)
    noise = user_frames(4, 60)
    resets = {1: mine, 0: params(stepper, None, None, seed=3)}
    got: list[ChatOutput] = []
    ready = False
    for step in range(200):
        inputs: dict[int, list[np.ndarray]] = {1: [frames[len(got)]] if ready else []}
        if step < 30 or step > 70:
            inputs[0] = [] if stepper.prefilling(0) else [noise[step % 60]]
        if step == 8:
            resets[2] = params(stepper, voices["TINYF0.pt"], "the weather", seed=5)
        if step >= 8:
            inputs[2] = [] if stepper.prefilling(2) else [noise[(step * 7) % 60]]
        if step == 71:
            resets[0] = params(stepper, voices["TINYM0.wav"], "coffee", seed=9)
        out = stepper.step(inputs, resets)
        resets = {}
        if ready:
            got.append(out[1])
        elif 1 in out and out[1].ready:
            ready = True
        if len(got) == len(frames):
            break
    assert len(got) == len(frames)
    assert same(alone, got)


def test_moshi_flavor_without_prefill(models_root: Path) -> None:
    model_dir = tiny_chat_dir(models_root, "moshi")
    st = ChatStepper.from_model_dir(model_dir, 2, "fp32", "cpu")
    assert st.flavor == "moshi" and st.dep_q == 4
    p = ChatParams(SamplingParams(seed=1, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25))
    frames = user_frames(5, 4)
    first = st.step({0: [frames[0]]}, {0: p})[0]
    assert first.pcm is None and first.text is None  # no model audio at the first frame
    rest = [st.step({0: [f]}, {})[0] for f in frames[1:]]
    assert all(o.pcm is not None and float(np.abs(o.pcm).max()) > 0 for o in rest)


def test_personaplex_depformer_is_served_with_the_agent_codebooks(stepper: ChatStepper, pp_dir: Path) -> None:
    assert stepper.dep_q == 4 and stepper.flavor == "personaplex"
    weights = load_file(str(pp_dir / "model.safetensors"))
    assert "linears.7.weight" in weights and "linears.4.weight" in weights  # the file has 8 steps
    served = stepper.lm.state_dict()
    assert "linears.4.weight" not in served
    for key, value in served.items():
        assert torch.equal(value, weights[key]), key


def test_voice_audio_is_normalised_to_minus_24_lufs(pp_dir: Path) -> None:
    pcm = chat_prompt.read_voice_audio(pp_dir / "voices" / "TINYM0.wav")  # 16 kHz file: resampled
    assert pcm.dtype == np.float32 and 48000 <= pcm.shape[0] <= 48000 + 2048  # sphn pads its last chunk
    assert abs(chat_prompt.integrated_loudness(pcm, 24000) - chat_prompt.TARGET_LUFS) < 0.05
    # BS.1770's reference: a 997 Hz sine at 0 dBFS peak measures -3.01 LUFS (mono).
    t = np.arange(48000) / 48000
    assert abs(chat_prompt.integrated_loudness(np.sin(2 * np.pi * 997 * t), 48000) + 3.01) < 0.05
    silence = np.zeros(24000, dtype=np.float32)
    assert np.array_equal(chat_prompt.normalise_loudness(silence, 24000), silence)


def test_bad_pt_voice_files_are_refused(stepper: ChatStepper, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"embeddings": torch.zeros(3, 1, 1, 7), "cache": torch.zeros(1, 9, 4)}, bad)
    with pytest.raises(chat_prompt.PromptError, match="do not fit"):
        chat_prompt.load_voice_pt(bad, stepper.layout)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(chat_prompt.PromptError, match="not a voice embedding file"):
        chat_prompt.load_voice_pt(bad, stepper.layout)

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pickled code ran",))

    torch.save({"embeddings": Evil(), "cache": torch.zeros(1)}, bad)
    with pytest.raises(chat_prompt.PromptError, match="not a voice embedding file"):
        chat_prompt.load_voice_pt(bad, stepper.layout)  # weights_only: no pickled code


def test_tiny_set_same_seed_same_bytes(tmp_path: Path) -> None:
    def digest(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    a = digest(tiny_chat.make(tmp_path / "a", 3, "personaplex"))
    assert a == digest(tiny_chat.make(tmp_path / "b", 3, "personaplex"))
    assert {"voices/TINYF0.pt", "voices/TINYF0.wav", "voices/TINYM0.wav", "tokenizer.model"} <= set(a)


def test_bf16_on_the_cpu(pp_dir: Path) -> None:
    st = ChatStepper.from_model_dir(pp_dir, 2, "bf16", "cpu")
    voice = chat_prompt.load_voice_pt(pp_dir / "voices" / "TINYF0.pt", st.layout)
    out = run_alone(st, 1, params(st, voice, "you are a tiny model"), user_frames(11, 4))
    assert all(o.pcm is not None and np.isfinite(o.pcm).all() for o in out)
    assert float(np.abs(np.concatenate([o.pcm for o in out if o.pcm is not None])).max()) > 1e-3
