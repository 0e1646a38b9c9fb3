"""Tiny Moshi-shaped and PersonaPlex-shaped model sets (the ``chat`` module's models), with voices.

The layout of Kyutai's ``kyutai/moshiko-pytorch-*`` repositories and of ``nvidia/personaplex-7b-v1``,
shrunk: ``n_q = 8`` audio channels (4 agent codebooks, then 4 user codebooks; the real ones have 8 + 8),
delays ``[0, 0, 1, 1, 1, 0, 1, 1, 1]`` (text, then per codebook: the semantic one undelayed, the
acoustic ones one step late, as the real 7B), a depformer with per-step weights, and the seeded tiny
Mimi of ``tiny/mimi.py`` (4 codebooks).

* ``flavor="moshi"``: ``dep_q = 4`` (the agent's codebooks), as Kyutai's configs;
* ``flavor="personaplex"``: ``dep_q = 8`` in ``config.json`` (the depformer also predicts the user's
  audio, as PersonaPlex's ``dep_q = 16``; the engine serves it with 4), a tokenizer with PersonaPlex's
  ``<system>`` piece, the Mimi codes of a silent and of a 440 Hz sine frame in ``config.json``
  (``personaplex.silence_tokens`` / ``sine_tokens``: the real model's are the fork's constants), and a
  ``voices/`` folder made here: ``TINYF0.wav`` and ``TINYM0.wav`` (synthetic voiced sounds at 16 kHz,
  so loading resamples them) and ``TINYF0.pt``, the embeddings and token cache that NVIDIA's fork
  would store for the ``TINYF0.wav`` prompt (computed by ``models/chat_prompt.py``).

Usage: ``voice-engine tiny-model --kind moshi|personaplex --out DIR [--seed N]``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.models import loaders
from safetensors.torch import save_file

from ..models import chat_prompt
from ..wav import write_wav
from . import mimi as tiny_mimi
from . import tokenizer as tiny_tokenizer
from .lm import tiny_lm_kwargs

CONFIG_NAME = "config.json"
LM_NAME = "model.safetensors"
VOICES_DIR_NAME = "voices"
AGENT_Q = tiny_mimi.DEFAULT_N_Q
N_Q = 2 * AGENT_Q
VOCAB_SIZE = tiny_tokenizer.DEFAULT_VOCAB_SIZE
FLAVORS = ("moshi", "personaplex")
VOICE_RATE = 16000
WAV_VOICES = {"TINYF0.wav": 220.0, "TINYM0.wav": 110.0}  # name -> fundamental (Hz)
PT_VOICES = {"TINYF0.pt": "TINYF0.wav"}

LM_KWARGS: dict[str, Any] = tiny_lm_kwargs(
    n_q=N_Q,
    dep_q=AGENT_Q,
    delays=[0] + ([0] + [1] * (AGENT_Q - 1)) * 2,
    context=200,
    depformer_dim_feedforward=64,
)
LM_GEN_CONFIG: dict[str, Any] = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}


def lm_kwargs(flavor: str) -> dict[str, Any]:
    if flavor not in FLAVORS:
        raise ValueError(f"flavor '{flavor}' is not one of {', '.join(FLAVORS)}")
    kwargs = copy.deepcopy(LM_KWARGS)
    if flavor == "personaplex":
        kwargs["dep_q"] = N_Q
    return kwargs


def voice_audio(fundamental: float, seed: int, seconds: float = 2.0) -> np.ndarray[Any, Any]:
    """A seeded voiced sound at :data:`VOICE_RATE`: harmonics with vibrato, syllable-like envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * VOICE_RATE)) / VOICE_RATE
    f0 = fundamental * (1 + 0.03 * np.sin(2 * math.pi * 5.0 * t))
    phase = 2 * math.pi * np.cumsum(f0) / VOICE_RATE
    signal = sum(np.sin(h * phase) / h for h in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * math.pi * 3.0 * t) ** 2
    noise = 0.02 * rng.standard_normal(t.shape[0])
    return np.asarray(0.3 * envelope * signal + noise, dtype=np.float64)


@torch.no_grad()
def frame_codes(mimi: Any, pcm: np.ndarray[Any, Any]) -> list[int]:
    """The Mimi codes of one 1920-sample frame, encoded from a fresh state."""
    with mimi.streaming(1):
        codes = mimi.encode(torch.from_numpy(pcm.astype(np.float32))[None, None])
    return [int(c) for c in codes[0, :, 0].tolist()]


def config(seed: int, flavor: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` content."""
    return {
        **lm_kwargs(flavor),
        "model_id": {"sig": f"tiny-{flavor}-seed{seed}", "epoch": 0},
        "lm_gen_config": LM_GEN_CONFIG,
        "model_type": "moshi",
        "moshi_name": LM_NAME,
        "mimi_name": tiny_mimi.MIMI_WEIGHTS_NAME,
        "mimi_config_name": tiny_mimi.MIMI_CONFIG_NAME,
        "tokenizer_name": tiny_tokenizer.TOKENIZER_NAME,
        **(extra or {}),
    }


def make(out: Path, seed: int = 0, flavor: str = "moshi") -> Path:
    """Write the tiny set of ``flavor`` into ``out`` (PersonaPlex: voices in ``out/voices``)."""
    kwargs = lm_kwargs(flavor)
    out.mkdir(parents=True, exist_ok=True)
    files = tiny_mimi.write_mimi(out, seed, AGENT_Q)
    symbols = (chat_prompt.SYSTEM_TAG,) if flavor == "personaplex" else ()
    tiny_tokenizer.write_tokenizer(out, seed, VOCAB_SIZE, symbols)
    torch.manual_seed(seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(kwargs), device="cpu", dtype=torch.float32)
    lm.eval()
    state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
    save_file(state, str(out / LM_NAME))
    extra: dict[str, Any] = {}
    if flavor == "personaplex":
        mimi = tiny_mimi.load_mimi(files, AGENT_Q)
        t = np.arange(tiny_mimi.FRAME_SIZE) / tiny_mimi.SAMPLE_RATE
        silence = frame_codes(mimi, np.zeros(tiny_mimi.FRAME_SIZE))
        sine = frame_codes(mimi, 0.5 * np.sin(2 * math.pi * 440.0 * t))
        extra["personaplex"] = {"silence_tokens": silence, "sine_tokens": sine}
        write_voices(out / VOICES_DIR_NAME, seed, lm, mimi, silence, sine)
    (out / CONFIG_NAME).write_text(json.dumps(config(seed, flavor, extra), indent=2) + "\n", encoding="utf-8")
    return out


def write_voices(voices: Path, seed: int, lm: Any, mimi: Any, silence: list[int], sine: list[int]) -> None:
    voices.mkdir(parents=True, exist_ok=True)
    for index, (name, f0) in enumerate(WAV_VOICES.items()):
        write_wav(voices / name, voice_audio(f0, seed * 100 + index), VOICE_RATE)
    layout = chat_prompt.Layout(
        delays=tuple(int(d) for d in lm.delays),
        dep_q=AGENT_Q,
        dim=int(lm.dim),
        silence=tuple(silence),
        sine=tuple(sine),
    )
    for name, source in PT_VOICES.items():
        pcm = chat_prompt.read_voice_audio(voices / source)
        codes = chat_prompt.encode_voice(mimi, pcm, torch.device("cpu"))
        torch.save(chat_prompt.voice_pt_from_codes(lm, layout, codes), str(voices / name))


def make_moshi(out: Path, seed: int = 0) -> Path:
    return make(out, seed, "moshi")


def make_personaplex(out: Path, seed: int = 0) -> Path:
    return make(out, seed, "personaplex")
