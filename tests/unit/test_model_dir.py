"""Resolving a local model directory into moshi.server's file arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moshi_tools.model_dir import ModelDirError, resolve, server_args


def test_tiny_model_set_resolves_to_absolute_local_files(tiny_models: dict[str, Path]):
    model_set = resolve(tiny_models["q8"])
    assert model_set.lm == tiny_models["q8"] / "lm.safetensors"
    assert model_set.quantized is True
    assert model_set.config is not None
    assert model_set.config["mimi_config_name"] == f"file://{tiny_models['q8'] / 'mimi.json'}"
    args = server_args(model_set)
    config_path = Path(args[args.index("--config-path") + 1])
    assert json.loads(config_path.read_text())["mimi_config_name"].startswith("file:///")
    config_path.unlink()


def test_legacy_repo_without_config_uses_kyutai_names(tmp_path: Path):
    for name in (
        "model.safetensors",
        "tokenizer-e351c8d8-checkpoint125.safetensors",
        "tokenizer_spm_32k_3.model",
    ):
        (tmp_path / name).write_bytes(b"x")
    model_set = resolve(tmp_path)
    assert model_set.config is None
    assert "--config-path" not in server_args(model_set)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{oops")), "is not valid JSON"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("[1]")), "must hold a JSON object"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "moshi_name:"),
        (
            lambda d: (
                d.mkdir(),
                (d / "config.json").write_text('{"moshi_name": "hf://kyutai/x/model.safetensors"}'),
            ),
            "a hub reference",
        ),
    ],
    ids=["missing-dir", "bad-json", "not-object", "missing-weights", "hub-reference"],
)
def test_incomplete_model_dir_names_what_is_missing(tmp_path: Path, setup, message):
    model_dir = tmp_path / "model"
    setup(model_dir)
    with pytest.raises(ModelDirError, match=message):
        resolve(model_dir)
