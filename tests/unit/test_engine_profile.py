"""The voice engine's side of the decision table (moshi_profile.engine_profile / engine_diagnose) and
the engine configuration built from the inventory (plugins/filter/engine_config.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from engine_config import FilterModule as EngineFilters
from engine_config import voice_engine_config, voice_engine_model_uses
from moshi_profile import (
    INDEX_CPU,
    INDEX_CU126,
    INDEX_PYPI,
    FilterModule,
    engine_diagnose,
    engine_profile,
    moshi_profile,
)

GTX_1080_TI = {"gpu_cc": "6.1", "gpu_memory_mib": 11264}
RTX_5090 = {"gpu_cc": "12.0", "gpu_memory_mib": 32607}
GPU01 = {
    "asr": {"kind": "asr", "slots": 8, "precision": "fp16", "device": "cuda"},
    "tts": {"kind": "tts", "slots": 4, "precision": "fp16", "device": "cuda"},
}


def test_gpu01_runs_asr_and_tts_in_fp16_with_graphs_and_without_compile():
    profile = engine_profile(GPU01, **GTX_1080_TI)
    assert profile["problems"] == []
    assert profile["device"] == "cuda"
    assert profile["family"] == "pascal"
    assert profile["env"] == {"NO_TORCH_COMPILE": "1"}
    # The same torch build as Moshi on the same GPU: one table.
    moshi = moshi_profile("gpu", "fp16", **GTX_1080_TI)
    assert (profile["torch_spec"], profile["torch_index_url"]) == (
        moshi["torch_spec"],
        moshi["torch_index_url"],
    )
    assert profile["torch_index_url"] == INDEX_CU126
    assert profile["gpu_memory_gib"] * 1024 < GTX_1080_TI["gpu_memory_mib"]
    assert "unmeasured" in profile["plan"]
    assert profile["measured"] is False  # the TTS overheads are estimates


def test_memory_comes_from_real_parameter_counts():
    asr = engine_profile({"asr": {"slots": 1, "precision": "fp16", "device": "cuda"}}, **RTX_5090)
    # 0.97 B params x 2 bytes = 1.81 GiB, plus the measured 0.59 GiB at one slot.
    assert asr["modules"]["asr"]["memory_gib"] == pytest.approx(2.4, abs=0.01)
    assert asr["modules"]["asr"]["params_billion"] == 0.97
    assert asr["modules"]["asr"]["measured"] is True
    tts = engine_profile({"tts": {"slots": 1, "precision": "bf16", "device": "cuda"}}, **RTX_5090)
    assert tts["modules"]["tts"]["params_billion"] == 1.84
    assert tts["modules"]["tts"]["memory_gib"] > 1.84e9 * 2 / 2**30
    assert "UNMEASURED" in tts["modules"]["tts"]["source"]
    fp32 = engine_profile({"asr": {"slots": 1, "precision": "fp32"}})
    assert fp32["modules"]["asr"]["memory_gib"] > 2 * 1.8


@pytest.mark.parametrize(
    ("modules", "gpu", "fragments"),
    [
        (
            {"asr": {"precision": "bf16", "device": "cuda"}},
            GTX_1080_TI,
            ["bf16 needs compute capability >= 8.0"],
        ),
        ({"asr": {"precision": "fp16", "device": "cpu"}}, {}, ["fp16 is for GPUs"]),
        ({"asr": {"precision": "fp16", "device": "cuda"}}, {}, ["no GPU is known on this host"]),
        ({"asr": {"device": "cuda", "precision": "fp16"}}, {"gpu_cc": "5.2"}, ["older than Pascal"]),
        ({"asr": {"kind": "vad"}}, {}, ["voice_engine_modules.asr.kind='vad' is unknown"]),
        ({"asr": {"slots": 0}}, {}, ["voice_engine_modules.asr.slots=0"]),
        ({"asr": {"slots": "8"}}, {}, ["must be a whole number"]),
        ({"tts": {"device": "tpu"}}, {}, ["device='tpu' is unknown"]),
        ({}, {}, ["at least one module"]),
        (
            {"asr": {"slots": 400, "precision": "fp16", "device": "cuda"}, **{"tts": GPU01["tts"]}},
            GTX_1080_TI,
            ["the GPU modules need about", "lower the slots"],
        ),
    ],
)
def test_impossible_settings_name_the_fix(modules, gpu, fragments):
    problems = engine_profile(modules, **gpu)["problems"]
    for fragment in fragments:
        assert any(fragment in p for p in problems), (fragment, problems)


def test_cpu_engine_gets_the_cpu_build_and_threads_never_cuda_graph_flags():
    profile = engine_profile({"asr": {"slots": 2}}, cpu_threads=3)
    assert profile["problems"] == []
    assert profile["torch_index_url"] == INDEX_CPU
    assert profile["env"] == {"NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "3"}
    volta = engine_profile({"asr": {"precision": "bf16", "device": "cuda"}}, **RTX_5090)
    assert volta["env"] == {}
    assert volta["torch_index_url"] == INDEX_PYPI
    for case in (profile, volta, engine_profile(GPU01, **GTX_1080_TI)):
        assert "NO_CUDA_GRAPH" not in case["env"]


def test_diagnose_says_what_each_gpu_can_run():
    gpu01 = engine_diagnose(**GTX_1080_TI)
    assert gpu01["precision"] == "fp16"
    assert gpu01["fits"] == {"asr": True, "tts": True, "asr+tts": True}
    assert gpu01["max_slots"]["asr"] > 8
    assert "unmeasured" in gpu01["line"]
    assert "0.97 B" in gpu01["line"] and "1.84 B" in gpu01["line"]
    assert engine_diagnose(**RTX_5090)["precision"] == "bf16"
    small = engine_diagnose("6.1", 4096)
    assert small["fits"]["asr+tts"] is False
    assert "do NOT fit" in small["line"]
    none = engine_diagnose(None, None)
    assert none["device"] == "cpu" and "CPU only" in none["line"]
    wsl = engine_diagnose("12.0", 32607, ["libcuda.so is missing"])
    assert wsl["device"] == "cpu" and wsl["blockers"] == ["libcuda.so is missing"]


def test_filters_are_registered():
    filters = FilterModule().filters()
    assert filters["engine_profile"] is engine_profile
    assert filters["engine_diagnose"] is engine_diagnose
    assert EngineFilters().filters()["voice_engine_config"] is voice_engine_config


def test_config_from_the_inventory_is_what_the_engine_accepts(tmp_path):
    for key in ("stt", "tts"):
        (tmp_path / key).mkdir()
        (tmp_path / key / "config.json").write_text("{}")
    (tmp_path / "voices").mkdir()
    modules = {"asr": {"slots": 3}, "speak": {"kind": "tts", "precision": "bf16", "options": {"temp": 0.5}}}
    cfg = voice_engine_config(modules, str(tmp_path), "0.0.0.0", "8080", ["k1", "k2"], "2")
    assert cfg["modules"]["asr"]["model_dir"] == f"{tmp_path}/stt"
    assert cfg["modules"]["speak"]["voices_dir"] == f"{tmp_path}/voices"
    assert cfg["modules"]["speak"]["options"] == {"temp": 0.5}
    assert (cfg["port"], cfg["cpu_threads"], cfg["api_keys"]) == (8080, 2, ["k1", "k2"])
    # The engine's own parser accepts it.
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(cfg))
    check = (
        "import sys; from pathlib import Path; from voice_engine.config import load; "
        "c = load(Path(sys.argv[1])); print(sorted(m.name for m in c.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['asr', 'speak']"


def test_model_uses_and_their_problems():
    models = {
        "stt": {"source": "local", "local_dir": "/m/stt"},
        "tts": {"source": "hf", "hf_repo": "kyutai/x"},
    }
    uses = voice_engine_model_uses({"asr": {}, "tts": {}}, models)
    assert uses["sets"]["stt"]["use"] == "model"
    assert "voices" not in uses["sets"]
    assert any("uses the voices set 'voices'" in p for p in uses["problems"])
    bad = voice_engine_model_uses({"asr": {}}, {"stt": {"source": "ftp"}})
    assert bad["problems"] == ["voice_engine_models.stt.source='ftp': set local or hf"]
    assert voice_engine_model_uses({"asr": {}}, {"stt": {"source": "local"}})["problems"][0].endswith(
        "source local needs local_dir (a controller directory)"
    )


def test_a_set_with_a_subdir_is_read_from_it():
    models = {"voices": {"source": "hf", "hf_repo": "kyutai/tts-voices", "subdir": "expresso"}}
    cfg = voice_engine_config({"tts": {}}, "/opt/voice-engine/models", models=models)
    assert cfg["modules"]["tts"]["voices_dir"] == "/opt/voice-engine/models/voices/expresso"
    assert cfg["modules"]["tts"]["model_dir"] == "/opt/voice-engine/models/tts"


WSL2PC_CHAT = {"chat": {"kind": "chat", "slots": 4, "precision": "bf16", "device": "cuda"}}


def test_wsl2pc_serves_personaplex_chat_in_bf16_within_the_5090s_memory():
    profile = engine_profile(WSL2PC_CHAT, **RTX_5090)
    assert profile["problems"] == []
    row = profile["modules"]["chat"]
    assert row["measured"] is True
    # 14.7 GiB of weights + 1.6 GiB at one conversation + 1.48 GiB per further one (H200 figures).
    assert row["memory_gib"] == pytest.approx(16.3 + 3 * 1.48, abs=0.05)
    assert "chat cuda/bf16 x4" in profile["plan"]


def test_chat_memory_refuses_what_the_gpu_cannot_hold():
    profile = engine_profile({"chat": {**WSL2PC_CHAT["chat"], "slots": 16}}, **RTX_5090)
    assert any("lower the slots" in p for p in profile["problems"])


def test_quantized_precisions_are_for_chat_only_and_nf4_is_labelled_experimental():
    profile = engine_profile({"asr": {"kind": "asr", "precision": "q8", "device": "cuda"}}, **RTX_5090)
    assert profile["problems"] == [
        "voice_engine_modules.asr: precision q8 is for the chat module only; set bf16, fp16 or fp32"
    ]
    nf4 = engine_profile({"chat": {"kind": "chat", "precision": "nf4", "device": "cuda"}}, **GTX_1080_TI)
    assert nf4["problems"] == []
    assert "nf4 EXPERIMENTAL" in nf4["plan"]
    # 7.89 B params at 0.6 bytes + 1.6 GiB: about 6 GiB, as measured (5.91 GiB peak on the H200).
    assert nf4["modules"]["chat"]["memory_gib"] == pytest.approx(6.0, abs=0.2)
    q8 = engine_profile({"chat": {"kind": "chat", "precision": "q8", "device": "cuda"}}, **GTX_1080_TI)
    assert any("q8 (bitsandbytes LLM.int8) needs compute capability" in p for p in q8["problems"])


def test_a_chat_module_gets_its_voice_folder_only_when_it_names_one():
    models = {
        "chat": {"source": "local", "local_dir": "/m"},
        "pp_voices": {"source": "local", "local_dir": "/v"},
    }
    moshi = voice_engine_config({"chat": {"kind": "chat"}}, "/opt/m", models=models)["modules"]["chat"]
    assert moshi["model_dir"] == "/opt/m/chat"
    assert "voices_dir" not in moshi
    models["pp_voices"]["subdir"] = "voices"
    pp = voice_engine_config({"chat": {"kind": "chat", "voices": "pp_voices"}}, "/opt/m", models=models)
    assert pp["modules"]["chat"]["voices_dir"] == "/opt/m/pp_voices/voices"
    uses = voice_engine_model_uses({"chat": {"kind": "chat", "voices": "pp_voices"}}, models)
    assert uses["problems"] == []
    assert uses["sets"]["pp_voices"]["use"] == "voices"
