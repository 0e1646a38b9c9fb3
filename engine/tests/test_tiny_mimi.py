"""The tiny Mimi, tokenizer and STT set: seeded codebooks that carry the audio, same seed same bytes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import sentencepiece
import torch
from moshi.models import loaders

from asr_helpers import stt_model_dir
from voice_engine.models import loading
from voice_engine.tiny import generate
from voice_engine.tiny import mimi as tiny_mimi
from voice_engine.tiny import stt as tiny_stt
from voice_engine.tiny import tokenizer as tiny_tokenizer

N = 1920 * 8


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def signals() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    t = torch.arange(N, dtype=torch.float32) / 24000
    return {
        "noise": 0.3 * torch.randn(N, generator=gen),
        "low": 0.5 * torch.sin(2 * math.pi * 300 * t),
        "high": 0.5 * torch.sin(2 * math.pi * 3000 * t),
        "quiet": 0.02 * torch.randn(N, generator=gen),
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tiny_mimi.MimiFiles:
    return tiny_mimi.write_mimi(tmp_path_factory.mktemp("mimi"), seed=0)


@pytest.fixture(scope="module")
def codec(written: tiny_mimi.MimiFiles):
    # Loaded back from the files through moshi's loader, as the engine does.
    return tiny_mimi.load_mimi(written, num_codebooks=tiny_mimi.DEFAULT_N_Q)


def test_a_fresh_mimi_really_has_zero_codebooks():
    # The reason for the seeding: without it every code is 0 whatever the audio.
    torch.manual_seed(0)
    fresh = loaders.get_mimi(None, tiny_mimi.mimi_config(), num_codebooks=4)
    with torch.no_grad():
        codes = [fresh.encode(x[None, None]) for x in signals().values()]
    assert all(int(c.abs().max()) == 0 for c in codes)


def test_codebooks_are_set_and_not_zero(codec):
    for name, buf in codec.state_dict().items():
        if name.endswith("embedding_sum"):
            assert float(buf.abs().max()) > 0, name
        if name.endswith("_initialized"):
            assert float(buf[0]) == 1.0, name


def test_different_audio_gives_different_codes(codec):
    with torch.no_grad():
        codes = {name: codec.encode(x[None, None]) for name, x in signals().items()}
    names = list(codes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.equal(codes[a], codes[b]), (a, b)
    # Within one signal of noise the codes vary too, and every codebook is used beyond one value.
    assert all(len(torch.unique(codes["noise"][0, k])) > 1 for k in range(codes["noise"].shape[1]))


def test_decoding_depends_on_the_codes(codec):
    with torch.no_grad():
        codes = codec.encode(signals()["noise"][None, None])
        audio = codec.decode(codes)
        other = codec.decode((codes + 7) % tiny_mimi.BINS)
        zeros = codec.decode(torch.zeros_like(codes))
    assert audio.shape == (1, 1, N)
    # The difference is of the order of the signal itself, not a rounding residue.
    assert float((audio - other).std()) > 0.3 * float(audio.std())
    assert float((audio - zeros).std()) > 0.3 * float(audio.std())
    # Changing one codebook (an acoustic one) also changes the audio.
    one = codes.clone()
    one[:, 2] = (one[:, 2] + 1) % tiny_mimi.BINS
    with torch.no_grad():
        assert not torch.equal(codec.decode(one), audio)


def test_streaming_encode_matches_codes_frame_by_frame(codec):
    x = signals()["noise"][None, None]
    with torch.no_grad():
        whole = codec.encode(x)
        with codec.streaming(1):
            frames = [codec.encode(x[..., i : i + 1920]) for i in range(0, N, 1920)]
    assert torch.equal(torch.cat(frames, dim=-1), whole)


def test_same_seed_same_bytes_other_seed_other_weights(written: tiny_mimi.MimiFiles, tmp_path: Path):
    again = tiny_mimi.write_mimi(tmp_path / "again", seed=0)
    assert again.weights.read_bytes() == written.weights.read_bytes()
    assert again.config.read_bytes() == written.config.read_bytes()
    other = tiny_mimi.write_mimi(tmp_path / "other", seed=1)
    assert other.weights.read_bytes() != written.weights.read_bytes()


def test_tokenizer_is_deterministic_and_has_kyutai_specials(tmp_path: Path):
    a = tiny_tokenizer.write_tokenizer(tmp_path / "a", seed=0)
    b = tiny_tokenizer.write_tokenizer(tmp_path / "b", seed=0)
    assert a.read_bytes() == b.read_bytes()
    sp = sentencepiece.SentencePieceProcessor(str(a))
    assert sp.vocab_size() == tiny_tokenizer.DEFAULT_VOCAB_SIZE
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.decode(sp.encode("hello tiny model")) == "hello tiny model"


@pytest.fixture(scope="module")
def stt_dir(models_root: Path) -> Path:
    return stt_model_dir(models_root)


def test_the_cli_generator_is_the_stt_set(stt_dir: Path, tmp_path: Path):
    # `voice-engine tiny-model --kind stt` goes through tiny.generate: same bytes as make().
    assert digests(generate("stt", tmp_path / "cli", 0)) == digests(stt_dir)


def test_stt_set_has_kyutai_layout_and_loads_offline(stt_dir: Path):
    config = json.loads((stt_dir / "config.json").read_text())
    assert config["dep_q"] == 0
    assert config["model_type"] == "stt"
    assert set(config["stt_config"]) == {"audio_delay_seconds", "audio_silence_prefix_seconds"}
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name"):
        assert (stt_dir / config[key]).is_file(), key
    model = loading.open_model_dir(stt_dir)
    lm = loading.load_lm(model, torch.device("cpu"), torch.float32)
    assert lm.dep_q == 0
    assert len(lm.extra_heads) == tiny_stt.EXTRA_HEADS
    assert loading.load_mimi(model, torch.device("cpu")).num_codebooks == tiny_stt.N_Q
    assert model.info.stt_config == tiny_stt.STT_CONFIG


def test_stt_set_other_seed_other_weights(stt_dir: Path, tmp_path: Path):
    other = digests(tiny_stt.make(tmp_path / "other", 1))
    assert other["model.safetensors"] != digests(stt_dir)["model.safetensors"]
    assert other["mimi.safetensors"] != digests(stt_dir)["mimi.safetensors"]


def test_model_dir_errors_are_clear(tmp_path: Path, stt_dir: Path):
    with pytest.raises(loading.ModelDirError, match=r"config\.json"):
        loading.open_model_dir(tmp_path)
    config = json.loads((stt_dir / "config.json").read_text())
    bad = tmp_path / "hub"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "moshi_name": "hf://kyutai/x/model.safetensors"}))
    with pytest.raises(loading.ModelDirError, match="local files only"):
        loading.open_model_dir(bad)
    (bad / "config.json").write_text(json.dumps({**config, "moshi_name": "missing.safetensors"}))
    with pytest.raises(loading.ModelDirError, match="not a file"):
        loading.open_model_dir(bad)
    with pytest.raises(loading.ModelDirError, match="precision"):
        loading.dtype_of("int4")
