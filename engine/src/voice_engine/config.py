"""The engine's configuration: one JSON file (rendered by the ``voice_engine`` role), checked at start.

Example (every key but ``modules`` has a default)::

    {
      "host": "127.0.0.1", "port": 8080,
      "api_keys": ["public_token"],
      "cpu_threads": 0,
      "modules": {
        "asr": {"kind": "asr", "model_dir": "/opt/voice-engine/models/stt", "slots": 8,
                "precision": "fp16", "device": "cuda"},
        "tts": {"kind": "tts", "model_dir": "/opt/voice-engine/models/tts", "slots": 4,
                "precision": "fp16", "device": "cuda", "voices_dir": "/opt/voice-engine/voices/tts"}
      }
    }

A bad file is a :class:`ConfigError` whose message names the key and the fix; ``voice-engine`` prints it
on one line and exits 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("asr", "tts", "chat")
PRECISIONS = ("bf16", "fp16", "fp32", "q8", "nf4")
# q8 (moshi's int8) and nf4 (bitsandbytes 4-bit, experimental) quantise the chat module's LM only.
QUANTIZED_KINDS = ("chat",)
EXPERIMENTAL_PRECISIONS = ("nf4",)
DEVICES = ("cpu", "cuda")
DEFAULT_PORT = 8080


class ConfigError(ValueError):
    """A configuration that cannot work, with the reason."""


@dataclass(frozen=True)
class ModuleConfig:
    name: str
    kind: str
    model_dir: Path
    slots: int
    precision: str
    device: str
    voices_dir: Path | None = None
    # Free-form per-kind options (documented by each module), for example {"temp": 0.6}.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineConfig:
    modules: tuple[ModuleConfig, ...]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ("public_token",)
    cpu_threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    max_message_bytes: int = 4 * 1024 * 1024


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in obj:
        if default is ...:
            raise ConfigError(f"{where}: '{key}' is required")
        return default
    value = obj[key]
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: '{key}' must be {_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: '{key}' must be {_name(kind)}, got {type(value).__name__}")
    return value


def _name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _module(name: str, raw: Any) -> ModuleConfig:
    where = f"modules.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be an object")
    kind = _get(raw, "kind", str, where)
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: '{kind}' is not one of {', '.join(KINDS)}")
    precision = _get(raw, "precision", str, where, "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"{where}.precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision in ("q8", "nf4") and kind not in QUANTIZED_KINDS:
        raise ConfigError(
            f"{where}.precision: '{precision}' is for the chat module only; a {kind} module takes "
            "bf16, fp16 or fp32"
        )
    device = _get(raw, "device", str, where, "cpu")
    if device not in DEVICES:
        raise ConfigError(f"{where}.device: '{device}' is not one of {', '.join(DEVICES)}")
    if device == "cpu" and precision == "fp16":
        raise ConfigError(f"{where}: fp16 is for GPUs; on the CPU use fp32 (or bf16)")
    slots = _get(raw, "slots", int, where, 1)
    if not 1 <= slots <= 4096:
        raise ConfigError(f"{where}.slots: {slots} is outside 1..4096")
    model_dir = Path(_get(raw, "model_dir", str, where))
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{where}.model_dir: {model_dir}/config.json does not exist")
    voices = _get(raw, "voices_dir", str, where, "")
    voices_dir = Path(voices) if voices else None
    if voices_dir is not None and not voices_dir.is_dir():
        raise ConfigError(f"{where}.voices_dir: {voices_dir} is not a directory")
    options = _get(raw, "options", dict, where, {})
    return ModuleConfig(name, kind, model_dir, slots, precision, device, voices_dir, dict(options))


def parse(raw: Any) -> EngineConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a JSON object")
    unknown = set(raw) - {"host", "port", "api_keys", "cpu_threads", "max_message_bytes", "modules"}
    if unknown:
        raise ConfigError(f"unknown key(s): {', '.join(sorted(unknown))}")
    modules_raw = _get(raw, "modules", dict, "config")
    if not modules_raw:
        raise ConfigError("modules: at least one module is needed (asr, tts, chat)")
    modules = tuple(_module(name, value) for name, value in modules_raw.items())
    port = _get(raw, "port", int, "config", DEFAULT_PORT)
    if not 1 <= port <= 65535:
        raise ConfigError(f"port: {port} is outside 1..65535")
    keys = _get(raw, "api_keys", list, "config", ["public_token"])
    if not all(isinstance(k, str) and k for k in keys):
        raise ConfigError("api_keys: must be a list of non-empty strings")
    return EngineConfig(
        modules=modules,
        host=_get(raw, "host", str, "config", "127.0.0.1"),
        port=port,
        api_keys=tuple(keys),
        cpu_threads=_get(raw, "cpu_threads", int, "config", 0),
        max_message_bytes=_get(raw, "max_message_bytes", int, "config", 4 * 1024 * 1024),
    )


def load(path: Path) -> EngineConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    return parse(raw)
