"""nvidia_runtime and playbooks/diagnose.yml on a native host without a GPU and a simulated WSL2 host.

Tests with the ``host`` fixture look at each converged host; the others run ansible-playbook from the
controller against the scenario's inventory, the way an operator would.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from playbook_runner import PROJECT
from playbook_runner import run_playbook as playbook

testinfra_hosts = ["ansible://nvidia_hosts"]

DIAGNOSE = PROJECT / "playbooks" / "diagnose.yml"
CONVERGE = Path(__file__).resolve().parents[1] / "converge.yml"
MISSING_LIBCUDA = {"nvidia_runtime_wsl_libcuda_path": "/usr/lib/wsl/lib/missing/libcuda.so"}


def recap(result: subprocess.CompletedProcess, host: str) -> dict[str, int]:
    match = re.search(rf"^{re.escape(host)}\s*:\s*(.*)$", result.stdout, re.MULTILINE)
    assert match, result.stdout[-3000:]
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def row(result: subprocess.CompletedProcess, host: str) -> list[str]:
    """The diagnose table's row of a host, as its cells."""
    match = re.search(rf"^\W*\| {re.escape(host)} +\|(.*)\|", result.stdout, re.MULTILINE)
    assert match, result.stdout[-3000:]
    return [cell.strip() for cell in match.group(1).split("|")]


# Columns after "host": OS, kernel, GPU, CC, VRAM, driver, torch build, compile, bf16, q8, 7B fits,
# real-time factors, recommended, inventory, blocked by, runtime notes.


def test_no_linux_nvidia_driver_was_installed(host):
    assert not [
        name for name in host.check_output("dpkg-query -W -f '${Package}\\n'").split() if "nvidia" in name
    ]
    assert not host.file("/etc/modprobe.d/blacklist-nouveau.conf").exists


def test_diagnose_prints_one_row_per_host_and_passes():
    result = playbook(DIAGNOSE)
    assert result.returncode == 0, result.stdout[-3000:]
    for name in ("native-nogpu", "wsl2-sim"):
        assert recap(result, name)["changed"] == 0
    native = row(result, "native-nogpu")
    assert native[0].startswith("Debian 12")
    assert native[1:3] == ["native", "none"]
    assert native[6] == "torch==2.9.1 from cpu"
    assert native[11] == "cpu/bf16 11.88x"
    assert native[12] == "cpu/bf16 (NOT real time)"
    assert native[13] == "cpu/bf16"  # the base config's moshi_server_mode: cpu
    assert native[14] == "-"
    wsl = row(result, "wsl2-sim")
    assert wsl[1:6] == ["WSL2", "NVIDIA GeForce RTX 5090", "12.0", "32607 MiB", "581.57"]
    assert wsl[6] == "torch==2.9.1 from PyPI (cu128)"
    assert wsl[7:11] == ["yes", "yes", "yes", "bf16"]
    assert wsl[11].startswith("gpu/bf16 0.25x")
    assert wsl[12] == "gpu/bf16 (real time)"


def test_diagnose_fails_only_the_host_whose_setting_cannot_work():
    result = playbook(DIAGNOSE, extra_vars={"moshi_server_mode": "gpu", "moshi_server_precision": "bf16"})
    assert result.returncode == 2, result.stdout[-3000:]
    assert recap(result, "native-nogpu")["failed"] == 1
    assert recap(result, "wsl2-sim")["failed"] == 0
    assert "moshi_server_mode=gpu but no NVIDIA GPU was detected on this host" in result.stdout
    assert row(result, "wsl2-sim")[14] == "-"


def test_diagnose_names_the_windows_fix_when_libcuda_is_missing():
    result = playbook(
        DIAGNOSE, "--limit", "wsl2-sim", extra_vars={**MISSING_LIBCUDA, "moshi_server_mode": "gpu"}
    )
    assert result.returncode == 2, result.stdout[-3000:]
    blocked = row(result, "wsl2-sim")[14]
    assert "/usr/lib/wsl/lib/missing/libcuda.so is missing" in blocked
    assert "nvidia-smi.exe" in blocked


def test_diagnose_honours_the_wsl2_override():
    result = playbook(DIAGNOSE, "--limit", "wsl2-sim", extra_vars={"nvidia_runtime_wsl2_override": False})
    assert result.returncode == 0, result.stdout[-3000:]
    assert row(result, "wsl2-sim")[1:3] == ["native", "none"]  # /usr/lib/wsl/lib is not looked at natively


def test_role_without_gpu_says_so_in_one_line_and_changes_nothing():
    result = playbook(CONVERGE, "--limit", "native-nogpu")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "nvidia_runtime: no NVIDIA GPU on native-nogpu (native): nothing to do" in result.stdout
    assert recap(result, "native-nogpu")["changed"] == 0


def test_role_on_wsl2_without_libcuda_fails_with_the_windows_fix():
    result = playbook(CONVERGE, "--limit", "wsl2-sim", extra_vars=MISSING_LIBCUDA)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "/usr/lib/wsl/lib/missing/libcuda.so is missing" in result.stdout
    assert "install or update the NVIDIA driver" in result.stdout
    assert "`nvidia-smi.exe` lists the GPU" in result.stdout
    assert "Never install a Linux NVIDIA driver inside WSL2" in result.stdout


def test_native_gpu_without_driver_installs_and_stops_with_reboot_pending():
    # A GTX 1080 Ti on the (fake) PCI bus and no driver: the Pascal plan (R580, proprietary modules),
    # nouveau blacklisted, packages installed (a small stand-in package here), then "reboot pending".
    fake_gpu = {
        "nvidia_runtime_pci_devices_dir": "/srv/fake-pci",
        "nvidia_runtime_driver_packages": ["pciutils"],
        "nvidia_runtime_container_override": False,  # the test host is a container: treat it as a machine
    }
    result = playbook(CONVERGE, "--limit", "native-nogpu", extra_vars=fake_gpu)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "CC 6.1 (pci id table)" in result.stdout
    assert "R580 with the proprietary kernel modules (pciutils)" in result.stdout
    assert "is installed but not loaded: a reboot is pending" in result.stdout
    assert "nvidia_runtime_allow_reboot=true" in result.stdout
    # Check mode on the same host: nothing fails, the pending reboot is reported.
    checked = playbook(CONVERGE, "--limit", "native-nogpu", "--check", extra_vars=fake_gpu)
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert "a reboot would be pending" in checked.stdout
    assert recap(checked, "native-nogpu")["changed"] == 0


def test_a_container_that_sees_the_machines_gpu_installs_no_driver():
    # The same fake GTX 1080 Ti, now seen from what the test host really is: a docker container.
    in_container = {
        "nvidia_runtime_pci_devices_dir": "/srv/fake-pci",
        "nvidia_runtime_driver_packages": ["pciutils"],
    }
    result = playbook(CONVERGE, "--limit", "native-nogpu", extra_vars=in_container)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "in a docker container" in result.stdout
    assert "no driver is installed in a container" in result.stdout
    assert "reboot is pending" not in result.stdout
    assert recap(result, "native-nogpu")["changed"] == 0
