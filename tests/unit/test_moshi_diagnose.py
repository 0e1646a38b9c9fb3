"""The diagnose verdict (moshi_profile.moshi_diagnose) for the GPUs of the recorded nvidia-smi outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from moshi_profile import DIAGNOSE_SOURCE, FilterModule, moshi_diagnose
from nvidia_facts import nvidia_runtime_detect, wsl_libcuda_problem  # roles/nvidia_runtime/module_utils

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"


def facts(name: str, **extra: object) -> dict:
    """Runtime facts for a recorded nvidia-smi output, as the role would set them."""
    lines = (FIXTURES / name).read_text(encoding="utf-8").splitlines(keepends=True)
    stdout = "".join(line for line in lines if not line.startswith("#"))
    return nvidia_runtime_detect(
        {"osrelease": "6.8.0-49-generic", "smi_found": True, "smi_rc": 0, "smi_stdout": stdout, **extra}
    )


def diagnose(runtime: dict, *args: object, **kwargs: object) -> dict:
    return moshi_diagnose(runtime["gpu_compute_capability"], runtime["gpu_memory_mib"], *args, **kwargs)


def test_gpu01_gtx_1080_ti_runs_only_on_cpu_not_in_real_time():
    verdict = diagnose(facts("gtx-1080-ti.csv"))
    assert verdict["q8_ok"] is False  # CC 6.1 < 7.5
    assert verdict["bf16_ok"] is False  # CC 6.1 < 8.0
    assert verdict["compile_ok"] is False  # CC 6.1 < 7.0: no Triton
    assert verdict["fits"] == {"bf16": False, "fp16": False, "q8": True}  # 7B fp16 needs 16.3 GiB > 11 GiB
    assert verdict["largest_precision"] is None
    assert verdict["recommended_mode"] == "cpu"
    assert verdict["recommended_realtime"] is False
    assert verdict["realtime_factors"] == {"cpu/bf16": 11.88}  # ~950 ms per 80 ms frame (docs/benchmarks.md)
    assert verdict["torch_build"] == "torch==2.9.1 from cpu"
    assert verdict["gpu_torch_build"] == "torch==2.9.1 from cu126"  # what the GPU would need (Pascal)
    assert verdict["blockers"] == []
    assert verdict["inventory"] is None


def test_gpu01_on_an_old_driver_gets_the_same_verdict():
    runtime = facts(
        "old-driver-error.txt",
        smi_rc=2,
        smi_nocc_stdout=(FIXTURES / "old-driver-nocc.csv").read_text(encoding="utf-8"),
    )
    assert diagnose(runtime) == diagnose(facts("gtx-1080-ti.csv"))


@pytest.mark.parametrize(
    ("precision", "blocker"),
    [
        ("bf16", "bf16 needs compute capability >= 8.0, this GPU has 6.1"),
        ("fp16", "the model needs about 16.3 GiB at peak in fp16, the GPU has 11.0 GiB"),
        ("q8", "q8 (bitsandbytes LLM.int8) needs compute capability >= 7.5, this GPU has 6.1"),
    ],
)
def test_gpu01_inventory_gpu_settings_are_blocked(precision, blocker):
    verdict = diagnose(facts("gtx-1080-ti.csv"), "gpu", precision)
    assert verdict["inventory"] == f"gpu/{precision}"
    assert any(blocker in b for b in verdict["blockers"]), verdict["blockers"]


def test_gpu01_cpu_inventory_works():
    verdict = diagnose(facts("gtx-1080-ti.csv"), "cpu", "q8")
    assert verdict["blockers"] == []
    assert verdict["inventory_realtime_factor"] == 11.88


@pytest.mark.parametrize("name", ["rtx-5090.csv", "rtx-5090-laptop.csv", "wsl2-rtx-5090.csv"])
def test_rtx_5090_runs_bf16_on_the_gpu_in_real_time(name):
    verdict = diagnose(facts(name))
    assert verdict["bf16_ok"] is True
    assert verdict["q8_ok"] is True
    assert verdict["compile_ok"] is True
    assert verdict["fits"] == {"bf16": True, "fp16": True, "q8": True}  # 16.3 GiB fits in 24 and 32 GB
    assert verdict["largest_precision"] == "bf16"
    assert (verdict["recommended_mode"], verdict["recommended_precision"]) == ("gpu", "bf16")
    assert verdict["recommended_realtime"] is True
    assert verdict["realtime_factors"]["gpu/bf16"] == pytest.approx(20.3 / 80, abs=0.01)
    assert verdict["realtime_factors"]["gpu/q8"] == pytest.approx(25.9 / 80, abs=0.01)
    assert verdict["torch_build"] == "torch==2.9.1 from PyPI (cu128)"  # cu128 has sm_120
    assert diagnose(facts(name), "gpu", "bf16")["blockers"] == []


@pytest.mark.parametrize("name", ["h100.csv", "h200.csv"])
def test_hopper_runs_bf16_in_real_time(name):
    verdict = diagnose(facts(name))
    assert (verdict["recommended_mode"], verdict["recommended_precision"]) == ("gpu", "bf16")
    assert verdict["recommended_realtime"] is True
    assert set(verdict["realtime_factors"]) == {"gpu/bf16", "gpu/fp16", "gpu/q8", "cpu/bf16"}
    assert diagnose(facts(name), "gpu", "q8")["blockers"] == []


def test_no_gpu_host():
    runtime = nvidia_runtime_detect({"osrelease": "6.8.0-49-generic", "pci": "", "smi_found": False})
    verdict = diagnose(runtime)
    assert verdict["gpu"] is False
    assert (verdict["compile_ok"], verdict["bf16_ok"], verdict["q8_ok"], verdict["fits"]) == (
        None,
        None,
        None,
        None,
    )
    assert verdict["recommended_mode"] == "cpu"
    assert verdict["recommended_realtime"] is False
    assert diagnose(runtime, "cpu", "bf16")["blockers"] == []
    [blocker] = diagnose(runtime, "gpu", "bf16")["blockers"]
    assert blocker.startswith("moshi_server_mode=gpu but no NVIDIA GPU was detected")


def test_wsl2_without_libcuda_blocks_gpu_modes_with_the_windows_fix():
    runtime = nvidia_runtime_detect(
        {
            "osrelease": "5.15.167.4-microsoft-standard-WSL2",
            "libcuda_present": False,
            "compute_capability_override": "12.0",
            "memory_mib_override": 32607,
            "gpu_present_override": True,
        }
    )
    assert runtime["problems"] == [wsl_libcuda_problem()]
    verdict = diagnose(runtime, "gpu", "bf16", gpu_problems=runtime["problems"])
    assert verdict["recommended_mode"] == "gpu"  # the hardware could, once the Windows driver is fixed
    assert any("nvidia-smi.exe" in blocker for blocker in verdict["blockers"])
    assert diagnose(runtime, "cpu", "bf16", gpu_problems=runtime["problems"])["blockers"] == []


def test_wsl2_with_libcuda_has_no_blocker():
    runtime = nvidia_runtime_detect(
        {
            "osrelease": "5.15.167.4-microsoft-standard-WSL2",
            "libcuda_present": True,
            "smi_found": True,
            "smi_rc": 0,
            "smi_stdout": "NVIDIA GeForce RTX 5090, 12.0, 32607, 581.57\n",
        }
    )
    assert diagnose(runtime, "gpu", "bf16", gpu_problems=runtime["problems"])["blockers"] == []


def test_inventory_defaults_follow_the_role_and_use_the_hosts_model_size():
    gpu01 = facts("gtx-1080-ti.csv")
    assert diagnose(gpu01, None, "fp16")["inventory"] == "cpu/fp16"  # moshi_server_mode defaults to cpu
    assert diagnose(gpu01, "gpu", None)["inventory"] == "gpu/bf16"
    tiny = diagnose(gpu01, "gpu", "fp16", 0.001)  # the tiny test model fits anywhere
    assert tiny["blockers"] == []
    assert tiny["largest_precision"] is None  # the capability columns stay about Moshi 7B


def test_inventory_gpu_facts_that_contradict_the_hardware_are_blockers():
    gpu01 = facts("gtx-1080-ti.csv")
    verdict = diagnose(gpu01, "cpu", "bf16", inventory_gpu_cc="8.6", inventory_gpu_memory_mib=24576)
    assert any(
        "moshi_server_gpu_compute_capability=8.6 but the GPU reports 6.1" in b for b in verdict["blockers"]
    )
    assert any(
        "moshi_server_gpu_memory_mib=24576 but the GPU has 11264 MiB" in b for b in verdict["blockers"]
    )
    assert (
        diagnose(gpu01, "cpu", "bf16", inventory_gpu_cc=6.1, inventory_gpu_memory_mib=11264)["blockers"] == []
    )


def test_unknown_inventory_values_are_blockers():
    verdict = diagnose(facts("h100.csv"), "tpu", "int4")
    assert any("moshi_server_mode='tpu' is unknown" in b for b in verdict["blockers"])
    assert any("moshi_server_precision='int4' is unknown" in b for b in verdict["blockers"])


def test_source_of_the_speeds_is_named():
    assert "docs/benchmarks.md" in moshi_diagnose()["source"] == DIAGNOSE_SOURCE


def test_filter_is_registered_for_ansible():
    filters = FilterModule().filters()
    assert filters["moshi_diagnose"] is moshi_diagnose
    assert {"moshi_profile", "moshi_recommend"} <= set(filters)
