"""The voice engine's configuration from the inventory (roles/voice_engine): modules -> engine JSON.

- ``{{ voice_engine_modules | voice_engine_config(models_dir, host, port, api_keys, cpu_threads, models) }}``:
  the object ``voice-engine serve --config`` reads (engine/src/voice_engine/config.py), with each
  module's ``model_dir`` (and a tts module's ``voices_dir``) at ``models_dir/KEY``, or
  ``models_dir/KEY/SUBDIR`` when the set in ``models`` has a ``subdir`` (a repo whose files sit in a
  folder, e.g. Kyutai's voices under ``expresso/``);
- ``{{ voice_engine_modules | voice_engine_model_uses(models) }}``: which model sets the modules use,
  ``{key: {"use": "model"|"voices", **the set's settings}}``, and ``problems`` (unknown keys, bad sources),
  each naming the variable to fix.

A module's ``model`` defaults to ``stt`` for ``asr``, ``tts`` for ``tts`` and ``chat`` for ``chat``; a tts
module's ``voices`` defaults to ``voices``; a chat module has a voice folder only when it names one
(``voices``: PersonaPlex's voice prompts; Kyutai's Moshi takes none). Kinds, precisions, devices and
slots are judged by ``engine_profile`` (moshi_profile.py, the hardware decision), not here.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MODEL = {"asr": "stt", "tts": "tts", "chat": "chat"}
DEFAULT_VOICES = "voices"


def _modules(modules: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(modules, dict):
        return {}
    return {str(name): (spec if isinstance(spec, dict) else {}) for name, spec in modules.items()}


def _refs(name: str, spec: dict[str, Any]) -> dict[str, str]:
    kind = str(spec.get("kind", name))
    refs = {"model": str(spec.get("model", DEFAULT_MODEL.get(kind, kind)))}
    if kind == "tts":
        refs["voices"] = str(spec.get("voices", DEFAULT_VOICES))
    elif spec.get("voices"):
        refs["voices"] = str(spec["voices"])
    return refs


def _set_dir(models_dir: str, key: str, models: Any) -> str:
    settings = models.get(key) if isinstance(models, dict) else None
    subdir = str(settings.get("subdir") or "").strip("/") if isinstance(settings, dict) else ""
    return f"{models_dir}/{key}" + (f"/{subdir}" if subdir else "")


def voice_engine_config(
    modules: Any,
    models_dir: str,
    host: str = "127.0.0.1",
    port: Any = 8080,
    api_keys: Any = ("public_token",),
    cpu_threads: Any = 0,
    models: Any = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in _modules(modules).items():
        kind = str(spec.get("kind", name))
        refs = _refs(name, spec)
        entry: dict[str, Any] = {
            "kind": kind,
            "model_dir": _set_dir(models_dir, refs["model"], models),
            "slots": spec.get("slots", 1),
            "precision": spec.get("precision", "fp32"),
            "device": spec.get("device", "cpu"),
        }
        if "voices" in refs:
            entry["voices_dir"] = _set_dir(models_dir, refs["voices"], models)
        if spec.get("options"):
            entry["options"] = dict(spec["options"])
        out[name] = entry
    keys = [api_keys] if isinstance(api_keys, str) else list(api_keys or [])
    return {
        "host": host,
        "port": int(port),
        "api_keys": [str(k) for k in keys if str(k)],
        "cpu_threads": int(cpu_threads or 0),
        "modules": out,
    }


def voice_engine_model_uses(modules: Any, models: Any) -> dict[str, Any]:
    sets = models if isinstance(models, dict) else {}
    uses: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, spec in _modules(modules).items():
        for use, key in _refs(name, spec).items():
            if key not in sets or not isinstance(sets[key], dict):
                problems.append(
                    f"voice_engine_modules.{name} uses the {use} set '{key}', which voice_engine_models "
                    f"does not define: add voice_engine_models.{key} (source local or hf)"
                )
                continue
            settings = sets[key]
            source = settings.get("source")
            if source not in ("local", "hf"):
                problems.append(f"voice_engine_models.{key}.source={source!r}: set local or hf")
            elif source == "local" and not settings.get("local_dir"):
                problems.append(
                    f"voice_engine_models.{key}: source local needs local_dir (a controller directory)"
                )
            elif source == "hf" and not settings.get("hf_repo"):
                problems.append(f"voice_engine_models.{key}: source hf needs hf_repo")
            uses[key] = {**settings, "use": use}
    return {"sets": uses, "problems": problems}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "voice_engine_config": voice_engine_config,
            "voice_engine_model_uses": voice_engine_model_uses,
        }
