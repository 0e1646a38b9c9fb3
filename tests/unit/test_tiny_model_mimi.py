"""The tiny Moshi set's Mimi carries audio: different audio, different codes; decoding uses the codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from moshi.models import loaders
from moshi_tools import tiny_model

N = 1920 * 8


@pytest.fixture(scope="module")
def mimi(tiny_models: dict[str, Path]):
    root = tiny_models["bf16"]
    config = json.loads((root / tiny_model.MIMI_CONFIG_NAME).read_text())
    # Loaded back through moshi's loader, as moshi.server loads it.
    return loaders.get_mimi(root / tiny_model.MIMI_NAME, config, num_codebooks=tiny_model.LM_CONFIG["n_q"])


def signals() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    t = torch.arange(N, dtype=torch.float32) / 24000
    return {
        "noise": 0.3 * torch.randn(1, 1, N, generator=gen),
        "tone": 0.5 * torch.sin(2 * math.pi * 440 * t)[None, None],
        "high": 0.5 * torch.sin(2 * math.pi * 3000 * t)[None, None],
    }


def test_a_fresh_mimi_would_give_only_zero_codes():
    fresh = loaders.get_mimi(None, tiny_model.MIMI_CONFIG, num_codebooks=4)
    with torch.no_grad():
        assert all(int(fresh.encode(x).abs().max()) == 0 for x in signals().values())


def test_different_audio_gives_different_codes(mimi):
    with torch.no_grad():
        codes = {name: mimi.encode(x) for name, x in signals().items()}
    assert not torch.equal(codes["noise"], codes["tone"])
    assert not torch.equal(codes["tone"], codes["high"])
    assert not torch.equal(codes["noise"], codes["high"])
    assert all(len(torch.unique(codes["noise"][0, k])) > 1 for k in range(4))


def test_decoding_depends_on_the_codes(mimi):
    with torch.no_grad():
        codes = mimi.encode(signals()["noise"])
        audio = mimi.decode(codes)
        shifted = mimi.decode((codes + 5) % tiny_model.MIMI_CONFIG["quantizer"]["bins"])
    assert float((audio - shifted).std()) > 0.3 * float(audio.std())
