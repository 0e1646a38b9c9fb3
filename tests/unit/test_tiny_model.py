"""The tiny-model generator: deterministic, complete, and a real q8 checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from moshi_tools import tiny_model
from safetensors import safe_open


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_gives_identical_files(tiny_models: dict[str, Path], tmp_path: Path):
    again = tiny_model.write_model_set(tmp_path / "again", "q8", seed=0)
    assert digest(again) == digest(tiny_models["q8"])


def test_other_seed_gives_other_weights(tiny_models: dict[str, Path], tmp_path: Path):
    other = tiny_model.write_model_set(tmp_path / "other", "bf16", seed=1)
    assert digest(other)["lm.safetensors"] != digest(tiny_models["bf16"])["lm.safetensors"]


@pytest.mark.parametrize("variant", ["bf16", "q8"])
def test_model_set_is_complete(tiny_models: dict[str, Path], variant: str):
    names = {p.name for p in tiny_models[variant].iterdir()}
    assert names == {"config.json", "lm.safetensors", "mimi.safetensors", "mimi.json", "tokenizer.model"}
    config = json.loads((tiny_models[variant] / "config.json").read_text())
    assert config.get("quantize", False) is (variant == "q8")
    assert len(config["delays"]) == config["n_q"] + 1


def test_q8_checkpoint_has_int8_weights_and_float32_scales(tiny_models: dict[str, Path]):
    with safe_open(str(tiny_models["q8"] / "lm.safetensors"), "pt") as checkpoint:
        dtypes = {key: str(checkpoint.get_tensor(key).dtype) for key in checkpoint.keys()}  # noqa: SIM118
    scales = {k: v for k, v in dtypes.items() if k.endswith("_scb")}
    assert scales and set(scales.values()) == {"torch.float32"}
    for key in scales:
        assert dtypes[key.removesuffix("_scb")] == "torch.int8"


def test_unknown_variant_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown variant 'int4'"):
        tiny_model.write_model_set(tmp_path, "int4")
