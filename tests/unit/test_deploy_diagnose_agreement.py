"""Deploy and diagnose decide the same (issue 16): the moshi_server role's profile is the decision that
playbooks/diagnose.yml judges, with the same runtime problems, so ``auto`` never picks a configuration that
diagnose refuses, whatever tags select.

The first tests compare the two over recorded hosts and every inventory setting; the last ones run
ansible-playbook against this machine posing (by the nvidia_runtime overrides) as a WSL2 host whose
Windows driver gives no libcuda.so. Those plays stop in preflight, before anything changes: the model
directory does not exist, which is checked after the decision.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from moshi_profile import moshi_diagnose, moshi_host_profile
from nvidia_facts import nvidia_runtime_detect

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"
WSL2 = "5.15.167.4-microsoft-standard-WSL2"


def smi_host(name: str, osrelease: str = "6.8.0-49-generic", **extra: Any) -> dict[str, Any]:
    lines = (FIXTURES / name).read_text(encoding="utf-8").splitlines(keepends=True)
    stdout = "".join(line for line in lines if not line.startswith("#"))
    return nvidia_runtime_detect(
        {
            "osrelease": osrelease,
            "smi_found": True,
            "smi_rc": 0,
            "smi_stdout": stdout,
            "module_loaded": True,
            **extra,
        }
    )


HOSTS = {
    "no-gpu": nvidia_runtime_detect({"osrelease": "6.8.0-49-generic", "smi_found": False}),
    "gtx-1080-ti": smi_host("gtx-1080-ti.csv"),
    "rtx-5090": smi_host("rtx-5090.csv"),
    "h100": smi_host("h100.csv"),
    "wsl2-rtx-5090": smi_host("wsl2-rtx-5090.csv", WSL2, libcuda_present=True),
    "wsl2-without-libcuda": nvidia_runtime_detect(
        {"osrelease": WSL2, "gpu_present_override": True, "compute_capability_override": "12.0",
         "memory_mib_override": 32607}
    ),
    "wsl2-old-windows-driver": smi_host("wsl2-old-windows-driver.csv", WSL2, libcuda_present=True),
    "nvidia-smi-broken": nvidia_runtime_detect(
        {"osrelease": "6.8.0-49-generic", "smi_found": True, "smi_rc": 9, "smi_stderr": "NVIDIA-SMI failed",
         "compute_capability_override": "8.9", "memory_mib_override": 24564, "gpu_present_override": True}
    ),
}  # fmt: skip
MODES = [None, "cpu", "gpu", "auto"]
PRECISIONS = [None, "bf16", "fp16", "q8"]


def role_profile(facts: dict[str, Any], mode: str | None, precision: str | None) -> dict[str, Any]:
    """What roles/moshi_server/vars/main.yml computes, with the role's defaults for what is unset."""
    return moshi_host_profile(
        mode or "cpu",
        precision or "bf16",
        facts["gpu_compute_capability"],  # moshi_server_gpu_* default to the detected facts
        facts["gpu_memory_mib"],
        7.69,
        16,
        "kyutai",
        {key: facts[key] for key in ("gpu_present", "gpu_compute_capability", "gpu_memory_mib", "problems")},
    )


def diagnose_verdict(facts: dict[str, Any], mode: str | None, precision: str | None) -> dict[str, Any]:
    """What playbooks/diagnose.yml computes for the same host and inventory."""
    return moshi_diagnose(
        facts["gpu_compute_capability"],
        facts["gpu_memory_mib"],
        mode,
        precision,
        7.69,
        facts["problems"],
        None,
        None,
        facts["gpu_present"],
    )


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_deploy_refuses_exactly_what_diagnose_refuses(host, mode, precision):
    if mode is None and precision is None:
        pytest.skip("diagnose judges no inventory setting when neither is set")
    facts = HOSTS[host]
    profile = role_profile(facts, mode, precision)
    verdict = diagnose_verdict(facts, mode, precision)
    assert verdict["inventory"] == f"{profile['mode']}/{profile['precision']}"
    assert bool(profile["problems"]) == bool(verdict["blockers"]), (profile["problems"], verdict["blockers"])
    if mode == "auto":
        assert profile["problems"] == [], "auto chose a configuration that cannot work"


def test_wsl2_without_libcuda_auto_is_cpu_and_gpu_is_refused_with_the_windows_fix():
    facts = HOSTS["wsl2-without-libcuda"]
    assert role_profile(facts, "auto", "bf16")["mode"] == "cpu"
    [problem] = role_profile(facts, "gpu", "bf16")["problems"]
    assert "libcuda.so is missing" in problem and "nvidia-smi.exe" in problem


def test_a_gpu_setting_that_contradicts_the_detected_gpu_is_refused_by_both():
    facts = HOSTS["gtx-1080-ti"]
    runtime = {
        key: facts[key] for key in ("gpu_present", "gpu_compute_capability", "gpu_memory_mib", "problems")
    }
    profile = moshi_host_profile("auto", "bf16", "8.6", 24576, 7.69, 16, "kyutai", runtime)
    verdict = moshi_diagnose("6.1", 11264, "auto", "bf16", 7.69, [], "8.6", 24576, True)
    assert profile["problems"] == verdict["blockers"]
    assert any(
        "moshi_server_gpu_compute_capability=8.6 but the GPU reports 6.1" in p for p in profile["problems"]
    )


def test_a_gpu_only_the_inventory_knows_is_refused_when_detection_found_none():
    runtime = {"gpu_present": False, "gpu_compute_capability": None, "gpu_memory_mib": None, "problems": []}
    assert moshi_host_profile("auto", "bf16", "8.9", 24564, runtime=runtime)["mode"] == "cpu"
    problems = moshi_host_profile("gpu", "bf16", "8.9", 24564, runtime=runtime)["problems"]
    assert any("no NVIDIA GPU was detected" in problem for problem in problems)
    assert moshi_host_profile("gpu", "bf16", "8.9", 24564)["problems"] == []  # no detection ran: trusted


# --- the real playbooks ------------------------------------------------------------------------------


def play(tmp_path: Path, playbook: str, *args: str, **host_vars: Any) -> subprocess.CompletedProcess[str]:
    """ansible-playbook against this machine, posing as a WSL2 host without libcuda.so."""
    missing = tmp_path / "missing"
    host = {
        "ansible_connection": "local",
        "ansible_become": False,
        "ansible_python_interpreter": sys.executable,
        "nvidia_runtime_wsl2_override": True,
        "nvidia_runtime_gpu_present_override": True,
        "nvidia_runtime_gpu_compute_capability_override": "12.0",
        "nvidia_runtime_gpu_memory_mib_override": 32607,
        "nvidia_runtime_wsl_libcuda_path": str(missing / "libcuda.so"),
        "nvidia_runtime_nvidia_smi_path": str(missing / "nvidia-smi"),
        # Checked after the decision: the play stops there, before the host changes.
        "moshi_server_model_local_dir": str(missing / "model"),
        **host_vars,
    }
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        yaml.safe_dump({"all": {"children": {"moshi_servers": {"hosts": {"wsl2pc": host}}}}})
    )
    return subprocess.run(
        ["ansible-playbook", "-i", str(inventory), playbook, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=os.environ | {"ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"},
    )


@pytest.mark.parametrize(
    ("playbook", "tags"),
    [
        ("site.yml", "moshi"),
        ("playbooks/moshi.yml", "moshi"),
        ("playbooks/moshi.yml", "moshi_server_preflight"),
    ],
)
def test_wsl2_without_libcuda_gets_cpu_mode_through_tags(tmp_path, playbook, tags):
    result = play(tmp_path, playbook, "--tags", tags, moshi_server_mode="auto")
    assert "PLAN wsl2pc: GPU 12.0 (32607 MiB) -> mode cpu (auto)" in result.stdout, result.stdout
    assert "torch torch==2.9.1 from https://download.pytorch.org/whl/cpu" in result.stdout
    # The decision passed; the play stops at the (missing) model, after it, as arranged.
    assert result.returncode != 0
    assert "config.json is missing on the controller" in result.stdout + result.stderr
    assert "cannot work as configured" not in result.stdout + result.stderr


def test_wsl2_without_libcuda_in_gpu_mode_stops_in_preflight_as_diagnose_refuses(tmp_path):
    result = play(tmp_path, "site.yml", "--tags", "moshi", moshi_server_mode="gpu")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "moshi_server on wsl2pc cannot work as configured: WSL2:" in output
    assert "libcuda.so is missing" in output and "nvidia-smi.exe" in output
    diagnose = play(tmp_path, "playbooks/diagnose.yml", moshi_server_mode="gpu")
    assert diagnose.returncode != 0
    assert "the inventory asks for gpu/bf16, which cannot work: WSL2:" in diagnose.stdout + diagnose.stderr
    auto = play(tmp_path, "playbooks/diagnose.yml", moshi_server_mode="auto")
    assert auto.returncode == 0, auto.stdout
    assert "the inventory setting (cpu/bf16) can work" in auto.stdout


def test_the_role_decides_with_the_diagnosed_facts():
    """The role's profile is moshi_host_profile fed with nvidia_runtime's problems (diagnose.yml's input)."""
    text = (ROOT / "roles" / "moshi_server" / "vars" / "main.yml").read_text(encoding="utf-8")
    profile = yaml.safe_load(text)["_moshi_server_profile"]
    assert "moshi_host_profile" in profile and "nvidia_runtime_problems" in profile
    assert yaml.safe_load(text)["_moshi_server_mode"] == "{{ _moshi_server_profile['mode'] }}"
