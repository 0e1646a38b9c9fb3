"""The voice_engine role's real env file, unit and JSON config, rendered for gpu01 and other hosts.

Rendered by ansible-core's own Templar with the role's defaults and vars and our filter plugins (as in
test_rendered_guard.py for Moshi): no file ever sets NO_CUDA_GRAPH; on Pascal (gpu01) and the CPU the
env file sets NO_TORCH_COMPILE=1; GPU device nodes stay reachable only in GPU mode; the config is what
the production inventory asks for.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_rendered_guard import env_assignments, unit_settings

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "voice_engine"
FILTERS = ROOT / "plugins" / "filter"
GPU01_MODULES = yaml.safe_load((ROOT / "inventory/production/host_vars/gpu01.yml").read_text())[
    "voice_engine_modules"
]
WSL2PC = yaml.safe_load((ROOT / "inventory/production/host_vars/wsl2pc.yml").read_text())
CPU_MODULES = {"asr": {"slots": 2}, "tts": {"slots": 1}}

# name: (modules, compute capability, GPU memory MiB)
HOSTS: dict[str, tuple[dict[str, Any], str | None, int | None]] = {
    "gpu01-gtx1080ti": (GPU01_MODULES, "6.1", 11264),
    "cpu-only": (CPU_MODULES, None, None),
    "wsl2pc-rtx5090-personaplex": (WSL2PC["voice_engine_modules"], "12.0", 32607),
    "rtx5090-bf16": (
        {
            "asr": {"precision": "bf16", "device": "cuda", "slots": 64},
            "tts": {"precision": "bf16", "device": "cuda"},
        },
        "12.0",
        32607,
    ),
}


@cache
def _base_vars() -> dict[str, Any]:
    from ansible.parsing.dataloader import DataLoader

    loader = DataLoader()
    variables: dict[str, Any] = {"role_path": str(ROLE)}
    for name in ("defaults/main.yml", "vars/main.yml"):
        variables.update(loader.load_from_file(str(ROLE / name), trusted_as_template=True))
    return variables


def render(modules: dict[str, Any], cc: str | None, memory_mib: int | None, **extra: Any) -> dict[str, Any]:
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import filter_loader
    from ansible.template import Templar, trust_as_template

    filter_loader.add_directory(str(FILTERS))
    variables = dict(_base_vars())
    variables.update(
        ansible_managed="Ansible managed",
        ansible_facts={"processor_nproc": 8},
        voice_engine_modules=modules,
        voice_engine_gpu_compute_capability=cc,
        voice_engine_gpu_memory_mib=memory_mib,
        voice_engine_api_keys=["k"],
        **extra,
    )
    templar = Templar(loader=DataLoader(), variables=variables)
    out: dict[str, Any] = {}
    for key, name in (
        ("env", "voice-engine.env.j2"),
        ("unit", "voice-engine.service.j2"),
        ("config", "voice-engine.json.j2"),
    ):
        source = trust_as_template((ROLE / "templates" / name).read_text(encoding="utf-8"))
        out[key] = templar.template(source, escape_backslashes=False, overrides={"trim_blocks": True})
    out["profile"] = templar.template(trust_as_template("{{ _voice_engine_profile }}"))
    return out


@pytest.fixture(scope="module", params=sorted(HOSTS))
def rendered(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"name": request.param, **render(*HOSTS[request.param])}


def test_every_host_is_deployable_and_never_disables_cuda_graphs(rendered: dict[str, Any]):
    assert rendered["profile"]["problems"] == []
    assert "NO_CUDA_GRAPH" not in env_assignments(rendered["env"])
    for key, value in unit_settings(rendered["unit"]):
        assert "NO_CUDA_GRAPH" not in f"{key}={value}", f"{rendered['name']}: {key}={value}"


def test_compile_is_off_on_pascal_and_cpu_and_devices_follow_the_mode(rendered: dict[str, Any]):
    modules, cc, _ = HOSTS[rendered["name"]]
    env = env_assignments(rendered["env"])
    settings = dict(unit_settings(rendered["unit"]))
    gpu = any(m.get("device") == "cuda" for m in modules.values())
    compile_off = cc is None or float(cc) < 7.0
    assert (env.get("NO_TORCH_COMPILE") == "1") is compile_off
    assert env["HF_HUB_OFFLINE"] == "1"
    assert settings["PrivateDevices"] == ("no" if gpu else "yes")
    assert settings["ProtectSystem"] == "strict"
    assert (
        settings["ExecStart"]
        == "/opt/voice-engine/venv/bin/voice-engine serve --config /etc/voice-engine/voice-engine.json"
    )


def test_gpu01_config_is_asr_and_tts_in_fp16_on_cuda():
    out = render(*HOSTS["gpu01-gtx1080ti"])
    config = json.loads(out["config"])
    assert config["port"] == 8080
    assert {name: (m["kind"], m["precision"], m["device"]) for name, m in config["modules"].items()} == {
        "asr": ("asr", "fp16", "cuda"),
        "tts": ("tts", "fp16", "cuda"),
    }
    assert out["profile"]["torch_index_url"].endswith("/cu126")
    assert env_assignments(out["env"])["NO_TORCH_COMPILE"] == "1"


def test_wsl2pc_serves_personaplex_in_bf16_with_natf2_and_its_voice_folder():
    out = render(*HOSTS["wsl2pc-rtx5090-personaplex"], voice_engine_models=WSL2PC["voice_engine_models"])
    config = json.loads(out["config"])
    chat = config["modules"]["chat"]
    assert (chat["kind"], chat["precision"], chat["device"]) == ("chat", "bf16", "cuda")
    assert chat["model_dir"] == "/opt/voice-engine/models/personaplex"
    assert chat["voices_dir"] == "/opt/voice-engine/models/personaplex_voices/voices"
    assert chat["options"] == {"flavor": "personaplex", "default_voice": "NATF2.pt"}
    assert out["profile"]["problems"] == []
    assert "chat cuda/bf16 x4" in out["profile"]["plan"]
    assert out["profile"]["torch_index_url"] == ""  # PyPI's default torch: CUDA 12.8, Blackwell kernels
    assert "NO_TORCH_COMPILE" not in env_assignments(out["env"])


def test_extra_env_cannot_smuggle_no_cuda_graph_past_the_guard():
    poisoned = render(*HOSTS["gpu01-gtx1080ti"], voice_engine_extra_env={"NO_CUDA_GRAPH": "1"})
    # The template renders what it is given; preflight refuses it (the forbidden list names it).
    assert "NO_CUDA_GRAPH" in env_assignments(poisoned["env"])
    assert "NO_CUDA_GRAPH" in _base_vars()["_voice_engine_forbidden_env"]
