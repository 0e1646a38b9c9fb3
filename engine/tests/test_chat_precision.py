"""The chat module's quantised precisions on the CPU: ``q8`` (moshi's int8 QLinear), ``nf4`` (experimental).

On the tiny PersonaPlex-shaped set: the linears really are quantised (their classes and weight dtypes), a
q8 checkpoint keeps its scales float32 (moshi's own loader casts them and then fails), the outputs stay
close to fp32 (q8 closer than nf4, neither identical), and both serve a real session through a real
engine process, with ``/status`` saying the precision.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from moshi.models import loaders
from moshi.utils.quantize import QLinear
from safetensors.torch import load_file, save_file

from chat_helpers import chat_module, talk, tiny_chat_dir, user_frames
from conftest import EngineProcess, start_engine
from voice_engine.config import ConfigError, parse
from voice_engine.models import chat, loading, quantize

PROMPT = {"voice_prompt": "TINYF0.pt", "text_prompt": "you are a tiny model", "seed": 42}
FIELD_ERROR = "Expected `weight_scb` to have type float"


@pytest.fixture(scope="module")
def tiny(models_root: Path) -> Path:
    return tiny_chat_dir(models_root, "personaplex")


def write_q8_set(src: Path, out: Path) -> Path:
    """``src`` with its LM as a q8 checkpoint (int8 ``weight``, float32 ``weight_scb``), as moshi makes it."""
    if (out / "config.json").is_file():
        return out
    shutil.copytree(src, out)
    model = loading.open_model_dir(src)
    lm = loaders.get_moshi_lm(
        str(model.info.moshi_weights), lm_kwargs=lm_kwargs(src), device="cpu", dtype=torch.float32
    )
    quantize.quantize_q8(lm, torch.device("cpu"))
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / "model.safetensors"))
    return out


def lm_kwargs(model_dir: Path) -> dict[str, Any]:
    model = loading.open_model_dir(model_dir)
    return {k: v for k, v in model.info.lm_config.items() if k != "personaplex"}


def load(model_dir: Path, precision: str) -> Any:
    lm, _ = chat.load_chat_lm(loading.open_model_dir(model_dir), torch.device("cpu"), precision)
    return lm


def text_logits(lm: Any) -> torch.Tensor:
    """The text logits of a fixed 12-step input sequence (all channels, in range)."""
    gen = torch.Generator().manual_seed(7)
    k = 1 + int(lm.n_q)
    seq = torch.randint(0, int(lm.card), (1, k, 12), generator=gen)
    seq[:, 0] = torch.randint(0, int(lm.text_card), (1, 12), generator=gen)
    with torch.no_grad():
        _, logits = lm.forward_text(seq)
    return logits.float().reshape(-1)


def test_q8_and_nf4_quantise_the_linears(tiny: Path) -> None:
    fp32, q8, nf4 = (load(tiny, p) for p in ("fp32", "q8", "nf4"))
    linears = quantize.describe(fp32)
    assert linears["q8"] == 0 and linears["nf4"] == 0 and linears["float"] > 20
    # q8: every linear of the LM is moshi's QLinear, int8 weights, float32 scales (moshi's q8 layout).
    assert quantize.describe(q8) == {"q8": linears["float"], "nf4": 0, "float": 0}
    for module in q8.modules():
        if isinstance(module, QLinear):
            assert module.weight.dtype == torch.int8 and module.weight_scb.dtype == torch.float32
    # nf4: every linear of both transformers is 4-bit (packed uint8); embeddings and heads stay float.
    counts = quantize.describe(nf4)
    assert counts["q8"] == 0 and counts["nf4"] > 0 and counts["nf4"] + counts["float"] == linears["float"]
    for part in (nf4.transformer, nf4.depformer):
        inner = [m for m in part.modules() if isinstance(m, quantize.NF4Linear)]
        assert inner and all(m.inner.weight.dtype == torch.uint8 for m in inner)
        assert not [m for m in part.modules() if type(m) is torch.nn.Linear]
    assert nf4.text_linear.weight.dtype == torch.float32
    weights = sum(p.numel() * p.element_size() for p in nf4.transformer.parameters())
    assert weights < sum(p.numel() * p.element_size() for p in fp32.transformer.parameters()) / 4


def test_outputs_are_close_to_fp32_and_not_identical(tiny: Path) -> None:
    ref = text_logits(load(tiny, "fp32"))
    errors = {}
    for precision in ("q8", "nf4"):
        out = text_logits(load(tiny, precision))
        errors[precision] = float((out - ref).norm() / ref.norm())
        assert torch.nn.functional.cosine_similarity(out, ref, dim=0) > 0.9, precision
    # Quantisation happened (not a silent fp32 model) and 8 bits are closer than 4.
    assert 1e-4 < errors["q8"] < 0.05, errors
    assert errors["q8"] < errors["nf4"] < 0.4, errors


def test_q8_checkpoint_keeps_its_scales_float32(tiny: Path, models_root: Path) -> None:
    q8_dir = write_q8_set(tiny, models_root / "chat-personaplex-q8")
    state = load_file(str(q8_dir / "model.safetensors"))
    scales = {k: v for k, v in state.items() if k.endswith("_scb")}
    assert scales and all(v.dtype == torch.float32 for v in scales.values())
    # Through the engine's loader in a bf16 LM (the dtype where moshi's own loader breaks q8):
    model = loading.open_model_dir(q8_dir)
    kept = {k: v for k, v in load_file(str(model.info.moshi_weights)).items() if chat._keep(k, 4)}
    kwargs = lm_kwargs(q8_dir) | {"dep_q": 4}
    lm = quantize.load_lm(kwargs, kept, "q8", torch.device("cpu"), source="q8 set", dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16
    loaded = dict(lm.named_parameters())
    for key, value in scales.items():
        if key in loaded:
            assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value), key
    text_logits(lm)  # QLinear runs: its scales are float32
    # The same checkpoint through moshi 0.2.13's own loader: the scales are cast, QLinear refuses them.
    theirs = loaders.get_moshi_lm(
        str(model.info.moshi_weights),
        lm_kwargs=lm_kwargs(q8_dir) | {"quantize": True},
        device="cpu",
        dtype=torch.bfloat16,
    )
    assert theirs.transformer.layers[0].gating.linear_in.weight_scb.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match=FIELD_ERROR):
        text_logits(theirs)
    # And the engine's q8 of the float set equals the q8 checkpoint, weight for weight.
    own = dict(load(tiny, "q8").named_parameters())
    quantised = [k for k, v in loaded.items() if v.dtype == torch.int8 or k.endswith("_scb")]
    assert len(quantised) == 2 * len([k for k in scales if k in loaded]) > 20
    for key in quantised:
        assert torch.equal(own[key], loaded[key]), key


def test_q8_checkpoint_needs_precision_q8(tiny: Path, models_root: Path) -> None:
    q8_dir = write_q8_set(tiny, models_root / "chat-personaplex-q8")
    with pytest.raises(loading.ModelDirError, match="serve it with precision q8"):
        load(q8_dir, "bf16")


def test_cast_state_keeps_scales_float32() -> None:
    state = {
        "a.weight": torch.ones(2, 2, dtype=torch.int8),
        "a.weight_scb": torch.tensor([1.2345678, 2.0]),
        "emb.weight": torch.ones(2, 2),
    }
    cast = quantize.cast_state(state, torch.bfloat16)
    assert cast["a.weight"].dtype == torch.int8 and cast["emb.weight"].dtype == torch.bfloat16
    assert cast["a.weight_scb"].dtype == torch.float32 and torch.equal(
        cast["a.weight_scb"], state["a.weight_scb"]
    )


def quantised_engine(tmp: Path, model_dir: Path, precision: str) -> EngineProcess:
    modules = chat_module(model_dir, 2, idle_timeout_s=5.0)
    modules["chat"]["precision"] = precision
    return start_engine(tmp, modules)


@pytest.mark.parametrize("precision", ["q8", "nf4"])
def test_a_quantised_engine_serves_a_session(tmp_path: Path, tiny: Path, precision: str) -> None:
    engine = quantised_engine(tmp_path, tiny, precision)
    try:
        frames = user_frames(1, 8)
        conv = talk(engine.ws, frames, **PROMPT)
        again = talk(engine.ws, frames, **PROMPT)
        status = engine.status()["modules"]["chat"]
    finally:
        engine.stop()
    assert conv.handshake_s is not None and len(conv.audio) == len(frames) and not conv.errors
    assert float(abs(conv.pcm()).max()) > 1e-3
    assert conv.settled == again.settled  # reproducible per seed, as in fp32
    assert status["precision"] == precision
    assert status["precision_experimental"] is (precision == "nf4")


def test_a_q8_checkpoint_is_served_and_refused_in_fp32(tmp_path: Path, tiny: Path, models_root: Path) -> None:
    q8_dir = write_q8_set(tiny, models_root / "chat-personaplex-q8")
    engine = quantised_engine(tmp_path, q8_dir, "q8")
    try:
        conv = talk(engine.ws, user_frames(2, 4), **PROMPT)
    finally:
        engine.stop()
    assert len(conv.audio) == 4 and not conv.errors
    config = {"modules": chat_module(q8_dir, 1)}
    path = tmp_path / "fp32.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "voice_engine", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "serve it with precision q8" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", ["asr", "tts"])
@pytest.mark.parametrize("precision", ["q8", "nf4"])
def test_only_the_chat_module_takes_a_quantised_precision(tiny: Path, kind: str, precision: str) -> None:
    module = {"kind": kind, "model_dir": str(tiny), "precision": precision}
    with pytest.raises(ConfigError, match=f"'{precision}' is for the chat module only; a {kind} module"):
        parse({"modules": {"m": module}})
    chat_cfg = parse({"modules": {"m": {**module, "kind": "chat"}}})
    assert chat_cfg.modules[0].precision == precision
