"""The one read-only command of nvidia_runtime's detection (nvidia_facts.READ_SCRIPT), on a fake host:
a sysfs PCI tree, kernel files and nvidia-smi stand-ins that print captured outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nvidia_facts import READ_SCRIPT, nvidia_runtime_detect

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"
QUERY = "name,compute_cap,memory.total,driver_version"
QUERY_NO_CC = "name,memory.total,driver_version"


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


def read(tmp_path: Path, smi: list[str], files: list[str], marks: list | None = None) -> dict:
    pci = tmp_path / "pci"
    gpu = pci / "0000:01:00.0"
    gpu.mkdir(parents=True)
    for attr, value in (("vendor", "0x10de"), ("class", "0x030000"), ("device", "0x1b06")):
        (gpu / attr).write_text(value + "\n")
    args = {
        "osrelease": str(FIXTURES / "osrelease-h100.txt"),
        "proc_version": str(FIXTURES / "version-h200.txt"),
        "pci_dir": str(pci),
        "files": files,
        "smi": smi,
        "query": QUERY,
        "query_no_cc": QUERY_NO_CC,
        "container_marks": marks or [],
    }
    out = subprocess.run(
        [sys.executable, "-c", READ_SCRIPT, json.dumps(args)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def detect(raw: dict, smi: str) -> dict:
    """What detect.yml hands the filter."""
    result = raw["smi"][smi]
    return nvidia_runtime_detect({
        "osrelease": raw["osrelease"],
        "proc_version": raw["proc_version"],
        "pci": raw["pci"],
        "smi_found": result["found"],
        "smi_rc": result.get("rc"),
        "smi_stdout": result.get("stdout", ""),
        "smi_stderr": result.get("stderr", ""),
        "smi_nocc_stdout": result.get("nocc_stdout", ""),
        "module_loaded": True,
        "libcuda_present": False,
        "dxg_present": False,
    })  # fmt: skip


def test_gtx_1080_ti_read_in_one_command(tmp_path):
    smi = fake_smi(tmp_path / "bin" / "nvidia-smi", str(FIXTURES / "gtx-1080-ti.csv"))
    raw = read(tmp_path, [str(tmp_path / "wsl" / "nvidia-smi"), smi], [smi, str(tmp_path / "no-such-file")])
    assert raw["exists"] == {smi: True, str(tmp_path / "no-such-file"): False}
    assert raw["smi"][str(tmp_path / "wsl" / "nvidia-smi")] == {"found": False}
    assert "pci/0000:01:00.0/vendor:0x10de" in raw["pci"]
    facts = detect(raw, smi)
    assert facts["gpu_name"] == "GeForce GTX 1080 Ti"
    assert facts["gpu_compute_capability"] == "6.1"
    assert facts["gpu_pci_ids"] == ["0x1b06"]
    assert not facts["is_wsl2"]


def test_a_driver_without_compute_cap_is_asked_again(tmp_path):
    smi = fake_smi(
        tmp_path / "bin" / "nvidia-smi",
        str(FIXTURES / "old-driver-error.txt"),
        str(FIXTURES / "old-driver-nocc.csv"),
        rc_with_cc=2,
    )
    raw = read(tmp_path, [smi], [])
    assert raw["smi"][smi]["rc"] == 2
    assert raw["smi"][smi]["nocc_stdout"] == (FIXTURES / "old-driver-nocc.csv").read_text()
    facts = detect(raw, smi)
    assert facts["gpu_present"]
    assert any("compute_cap" in note for note in facts["notes"])


def test_container_marks_name_the_container(tmp_path):
    systemd_mark = tmp_path / "run-systemd-container"
    systemd_mark.write_text("podman\n")
    docker_mark = tmp_path / "dockerenv"
    docker_mark.touch()
    missing = str(tmp_path / "missing")
    raw = read(tmp_path, [], [], [[missing, "x"], [str(systemd_mark), None], [str(docker_mark), "docker"]])
    assert raw["container"] == "podman"  # the first mark found; its text when it has no name
    assert (
        read(tmp_path / "b", [], [], [[missing, "x"], [str(docker_mark), "docker"]])["container"] == "docker"
    )
    assert read(tmp_path / "c", [], [], [[missing, "x"]])["container"] == ""
