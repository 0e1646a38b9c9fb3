"""Resolve a local model directory into the file arguments ``moshi.server`` needs.

A model directory holds either our tiny model set or a snapshot of a Hugging Face model repo. If it
has a ``config.json``, the file names come from its ``moshi_name``, ``mimi_name``,
``tokenizer_name`` and ``mimi_config_name`` keys, relative to the directory. Without one (legacy
Kyutai repos), Kyutai's default 7B file names are used and no config is passed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Kyutai's defaults (moshi.models.loaders MOSHI_NAME, MIMI_NAME, TEXT_TOKENIZER_NAME), repeated
# here so that resolving needs no torch import.
DEFAULT_NAMES = {
    "moshi_name": "model.safetensors",
    "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "tokenizer_name": "tokenizer_spm_32k_3.model",
}


class ModelDirError(Exception):
    """The model directory is missing something; the message says what."""


@dataclass(frozen=True)
class ModelSet:
    lm: Path
    mimi: Path
    tokenizer: Path
    config: dict[str, Any] | None

    @property
    def quantized(self) -> bool:
        return bool(self.config and self.config.get("quantize"))


def _local(model_dir: Path, name: str, key: str) -> Path:
    if name.startswith("hf://"):
        raise ModelDirError(f"{key} is {name!r}: a hub reference; fetch the file into {model_dir} first")
    path = Path(name.removeprefix("file://"))
    path = path if path.is_absolute() else model_dir / path
    if not path.is_file():
        raise ModelDirError(f"{key}: {path} does not exist")
    return path


def resolve(model_dir: Path) -> ModelSet:
    """Return the model set stored in ``model_dir``, or raise :class:`ModelDirError`."""
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    config_file = model_dir / "config.json"
    config: dict[str, Any] | None = None
    names = dict(DEFAULT_NAMES)
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelDirError(f"{config_file} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ModelDirError(f"{config_file} must hold a JSON object")
        config = dict(config)
        for key in DEFAULT_NAMES:
            names[key] = str(config.get(key, names[key]))
        mimi_config = config.get("mimi_config_name")
        if mimi_config is not None:
            path = _local(model_dir, str(mimi_config), "mimi_config_name")
            config["mimi_config_name"] = f"file://{path}"
    return ModelSet(
        lm=_local(model_dir, names["moshi_name"], "moshi_name"),
        mimi=_local(model_dir, names["mimi_name"], "mimi_name"),
        tokenizer=_local(model_dir, names["tokenizer_name"], "tokenizer_name"),
        config=config,
    )


def server_args(model_set: ModelSet) -> list[str]:
    """Arguments for ``moshi.server`` that load ``model_set`` with no hub access."""
    args = [
        "--moshi-weight",
        str(model_set.lm),
        "--mimi-weight",
        str(model_set.mimi),
        "--tokenizer",
        str(model_set.tokenizer),
    ]
    if model_set.config is not None:
        # The resolved config (absolute file:// names) goes to a private temporary file.
        with tempfile.NamedTemporaryFile("w", suffix="-moshi-config.json", delete=False) as handle:
            json.dump(model_set.config, handle)
        args += ["--config-path", handle.name]
    return args
