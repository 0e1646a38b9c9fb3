"""Load a local model directory (the layout of Kyutai's Hugging Face repositories), offline.

Everything goes through moshi's own ``loaders.CheckpointInfo``, given local paths for every file it
would otherwise fetch from the hub, so a real ``kyutai/stt-*`` or ``kyutai/tts-*`` snapshot and a tiny
model set load through the same code, and nothing ever calls the hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders

PRECISIONS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Any string works as the repository name: with every file given as a local Path, moshi never
# resolves it. It only shows up in moshi's own messages.
_LOCAL_REPO = "local/model-dir"


class ModelDirError(ValueError):
    """A model directory that cannot be loaded, with the reason."""


@dataclass(frozen=True)
class LocalModel:
    model_dir: Path
    info: Any  # moshi.models.loaders.CheckpointInfo
    config: dict[str, Any]  # the raw config.json


# Quantised precisions (the chat module's LM only: models/quantize.py); their LM dtype depends on the device.
QUANTIZED_PRECISIONS = ("q8", "nf4")


def dtype_of(precision: str, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype of ``precision``. For ``q8``/``nf4``, the dtype of the LM's unquantised parts
    (embeddings, norms, heads): bf16 on a GPU that has it, fp16 on an older GPU, fp32 on the CPU."""
    if precision in QUANTIZED_PRECISIONS:
        kind = torch.device(device).type if device is not None else "cuda"
        if kind != "cuda":
            return torch.float32
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    try:
        return PRECISIONS[precision]
    except KeyError:
        known = ", ".join((*PRECISIONS, *QUANTIZED_PRECISIONS))
        raise ModelDirError(f"precision '{precision}' is not one of {known}") from None


def precision_of(dtype: torch.dtype) -> str:
    """The precision name of a float dtype (the inverse of :func:`dtype_of` for bf16, fp16, fp32)."""
    for name, value in PRECISIONS.items():
        if value == dtype:
            return name
    raise ModelDirError(f"dtype {dtype} is not one of {', '.join(PRECISIONS)}")


def _local_file(model_dir: Path, config: dict[str, Any], key: str, default: str | None) -> Path | None:
    name = config.get(key, default)
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise ModelDirError(f"{model_dir}/config.json: '{key}' must be a file name")
    if name.startswith("hf://"):
        raise ModelDirError(
            f"{model_dir}/config.json: '{key}' is {name}, a hub address; the engine loads local files "
            "only: download it into the directory and name the file"
        )
    path = Path(name.removeprefix("file://"))
    if not path.is_absolute():
        path = model_dir / path
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: {key} '{name}' is not a file in the model directory")
    return path


def open_model_dir(model_dir: Path) -> LocalModel:
    """Read ``config.json`` and resolve every file it names to a local path (no hub access)."""
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelDirError(f"{config_path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(config, dict):
        raise ModelDirError(f"{config_path}: must be a JSON object")
    moshi = _local_file(model_dir, config, "moshi_name", loaders.MOSHI_NAME)
    mimi = _local_file(model_dir, config, "mimi_name", loaders.MIMI_NAME)
    tokenizer = _local_file(model_dir, config, "tokenizer_name", loaders.TEXT_TOKENIZER_NAME)
    mimi_config = _local_file(model_dir, config, "mimi_config_name", None)
    lora = _local_file(model_dir, config, "lora_name", None)
    info = loaders.CheckpointInfo.from_hf_repo(
        _LOCAL_REPO,
        moshi_weights=moshi,
        mimi_weights=mimi,
        tokenizer=tokenizer,
        config_path=config_path,
        mimi_config_path=mimi_config,
        lora_weights=lora,
    )
    return LocalModel(model_dir, info, config)


def device_of(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelDirError("device 'cuda' was configured, but torch sees no CUDA device")
    return torch.device(name)


def load_lm(model: LocalModel, device: torch.device, dtype: torch.dtype) -> Any:
    """The LM (moshi ``LMModel``) in ``dtype`` on ``device``, in eval mode."""
    lm = model.info.get_moshi(device=device, dtype=dtype)
    lm.eval()
    return lm


def load_mimi(model: LocalModel, device: torch.device) -> Any:
    """Mimi (moshi ``MimiModel``, fp32 as Kyutai's servers run it) with the LM's codebook count."""
    mimi = model.info.get_mimi(device=device)
    mimi.eval()
    return mimi


def load_tokenizer(model: LocalModel) -> Any:
    return model.info.get_text_tokenizer()
