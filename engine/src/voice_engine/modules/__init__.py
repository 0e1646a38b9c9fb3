"""The engine's modules, one per kind: the websocket protocol of each, on top of its model stepper.

``MODULE_KINDS`` maps a configuration ``kind`` to ``"module:Class"``; the class is imported only when
the kind is configured, so that a host serving one kind never imports the others' code.
"""

from __future__ import annotations

import importlib

from ..config import ModuleConfig
from .base import EngineModule

MODULE_KINDS: dict[str, str] = {
    "asr": "voice_engine.modules.asr:AsrModule",
    "tts": "voice_engine.modules.tts:TtsModule",
    "chat": "voice_engine.modules.chat:ChatModule",
}


def module_class(kind: str) -> type[EngineModule]:
    target = MODULE_KINDS[kind]
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    assert isinstance(cls, type)
    assert issubclass(cls, EngineModule)
    return cls


def build(cfg: ModuleConfig) -> EngineModule:
    return module_class(cfg.kind)(cfg)
