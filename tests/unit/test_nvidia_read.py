"""The nvidia_runtime role's module (library/nvidia_runtime_facts.py), run by ansible on a fake host: a sysfs
PCI tree, kernel files and nvidia-smi stand-ins that print captured outputs. It returns the facts directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from role_module import run_module

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"
QUERY = "name,compute_cap,memory.total,driver_version"


def fake_smi(path: Path, with_cc: str, without_cc: str = "", rc_with_cc: int = 0) -> str:
    """A nvidia-smi that answers the full query and the one without compute_cap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --query-gpu={QUERY}) cat {with_cc}; exit {rc_with_cc};; esac\n'
        f"cat {without_cc or '/dev/null'}\n"
    )
    path.chmod(0o755)
    return str(path)


def pci_tree(root: Path, device: str = "0x1b06") -> str:
    gpu = root / "0000:01:00.0"
    gpu.mkdir(parents=True)
    for attr, value in (("vendor", "0x10de"), ("class", "0x030000"), ("device", device)):
        (gpu / attr).write_text(value + "\n")
    return str(root)


def module(tmp_path: Path, **args: Any) -> dict[str, Any]:
    """The module's facts on this machine, with the paths pointed into tmp_path."""
    missing = str(tmp_path / "missing")
    params = {
        "osrelease_path": str(FIXTURES / "osrelease-h100.txt"),
        "proc_version_path": str(FIXTURES / "version-h200.txt"),
        "pci_devices_dir": missing,
        "nvidia_smi_path": missing,
        "wsl_libcuda_path": missing,
        "module_file": missing,
        "dxg_path": missing,
        "container_marks": [],
        **args,
    }
    result = run_module("nvidia_runtime", "nvidia_runtime_facts", params)
    assert result["changed"] is False
    facts: dict[str, Any] = result["ansible_facts"]
    return facts


def test_gtx_1080_ti_read_and_returned_as_facts(tmp_path):
    smi = fake_smi(tmp_path / "bin" / "nvidia-smi", str(FIXTURES / "gtx-1080-ti.csv"))
    facts = module(
        tmp_path,
        pci_devices_dir=pci_tree(tmp_path / "pci"),
        nvidia_smi_path=smi,
        module_file=smi,  # any file that exists: "the kernel module is loaded"
        distribution="Ubuntu",
        distribution_major_version="22",
    )
    assert facts["nvidia_runtime_gpu_name"] == "GeForce GTX 1080 Ti"
    assert facts["nvidia_runtime_gpu_compute_capability"] == "6.1"
    assert facts["nvidia_runtime_gpu_pci_ids"] == ["0x1b06"]
    assert facts["nvidia_runtime_driver_loaded"] is True
    assert facts["nvidia_runtime_is_wsl2"] is False
    assert facts["nvidia_runtime_problems"] == []
    plan = facts["nvidia_runtime_driver_plan"]
    assert (plan["generation"], plan["branch"], plan["open_modules"]) == ("pascal", "580", False)
    assert plan["packages"] == ["nvidia-headless-580", "nvidia-utils-580"]


def test_a_driver_without_compute_cap_is_asked_again(tmp_path):
    smi = fake_smi(
        tmp_path / "bin" / "nvidia-smi",
        str(FIXTURES / "old-driver-error.txt"),
        str(FIXTURES / "old-driver-nocc.csv"),
        rc_with_cc=2,
    )
    facts = module(tmp_path, nvidia_smi_path=smi)
    assert facts["nvidia_runtime_gpu_present"]
    assert facts["nvidia_runtime_gpu_compute_capability_source"] == "name table"
    assert any("compute_cap" in note for note in facts["nvidia_runtime_notes"])


def test_wsl2_without_libcuda_reports_the_windows_fix(tmp_path):
    facts = module(
        tmp_path,
        osrelease_path=str(FIXTURES / "osrelease-wsl2.txt"),
        gpu_present_override=True,
        compute_capability_override="12.0",
    )
    assert facts["nvidia_runtime_is_wsl2"] is True
    assert facts["nvidia_runtime_wsl_libcuda_present"] is False
    [problem] = facts["nvidia_runtime_problems"]
    assert problem.startswith(f"WSL2: {tmp_path / 'missing'} is missing") and "nvidia-smi.exe" in problem


def test_container_marks_name_the_container(tmp_path):
    systemd_mark = tmp_path / "run-systemd-container"
    systemd_mark.write_text("podman\n")
    docker_mark = tmp_path / "dockerenv"
    docker_mark.touch()
    missing = str(tmp_path / "missing")
    first = module(
        tmp_path, container_marks=[[missing, "x"], [str(systemd_mark), None], [str(docker_mark), "docker"]]
    )
    assert first["nvidia_runtime_container"] == "podman"  # the first mark found; its text when it has no name
    second = module(tmp_path, container_marks=[[missing, "x"], [str(docker_mark), "docker"]])
    assert second["nvidia_runtime_container"] == "docker"
    assert module(tmp_path, container_marks=[[missing, "x"]])["nvidia_runtime_in_container"] is False
