"""NVIDIA runtime facts (roles/nvidia_runtime/module_utils/nvidia_facts.py) from recorded and written
nvidia-smi outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from nvidia_facts import (
    QUERY_FIELDS_NO_CC,
    nvidia_cc_fallback,
    nvidia_driver_plan,
    nvidia_driver_problems,
    nvidia_generation,
    nvidia_is_wsl2,
    nvidia_pci_fallback,
    nvidia_pci_gpus,
    nvidia_runtime_detect,
    nvidia_smi_field_unsupported,
    nvidia_smi_parse,
    nvidia_wsl_version,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"


def fixture(name: str) -> str:
    """A fixture's text without its '#' provenance lines."""
    lines = (FIXTURES / name).read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#"))


# --- nvidia-smi CSV ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gtx-1080-ti.csv", ("GeForce GTX 1080 Ti", "6.1", 11264, "535.183.01")),
        ("rtx-5090.csv", ("NVIDIA GeForce RTX 5090", "12.0", 32607, "580.95.05")),
        ("rtx-5090-laptop.csv", ("NVIDIA GeForce RTX 5090 Laptop GPU", "12.0", 24463, "580.95.05")),
        ("h100.csv", ("NVIDIA H100 80GB HBM3", "9.0", 81559, "580.159.04")),
        ("h200.csv", ("NVIDIA H200", "9.0", 143771, "580.159.04")),
        ("wsl2-rtx-5090.csv", ("NVIDIA GeForce RTX 5090", "12.0", 32607, "581.57")),
    ],
)
def test_parse_query_output(name, expected):
    [gpu] = nvidia_smi_parse(fixture(name))
    assert (gpu["name"], gpu["compute_capability"], gpu["memory_mib"], gpu["driver_version"]) == expected


def test_parse_query_without_compute_cap():
    [gpu] = nvidia_smi_parse(fixture("old-driver-nocc.csv"), QUERY_FIELDS_NO_CC)
    assert gpu == {
        "name": "GeForce GTX 1080 Ti",
        "compute_capability": None,
        "memory_mib": 11264,
        "driver_version": "470.256.02",
    }
    [h200] = nvidia_smi_parse(fixture("h200-nocc.csv"), QUERY_FIELDS_NO_CC)
    assert h200["memory_mib"] == 143771


def test_parse_tolerates_units_header_na_and_several_gpus():
    text = (
        "name, compute_cap, memory.total [MiB], driver_version\n"
        "NVIDIA H100, 9.0, 81559 MiB, 580.1\n"
        "X, [N/A], [N/A], 580.1\n"
    )
    first, second = nvidia_smi_parse(text)
    assert first["memory_mib"] == 81559
    assert second == {"name": "X", "compute_capability": None, "memory_mib": None, "driver_version": "580.1"}


@pytest.mark.parametrize("name", ["old-driver-error.txt", "driver-not-loaded.txt"])
def test_error_outputs_parse_to_no_gpu(name):
    assert nvidia_smi_parse(fixture(name)) == []


def test_old_driver_error_is_recognised():
    assert nvidia_smi_field_unsupported(fixture("old-driver-error.txt"))
    assert not nvidia_smi_field_unsupported(fixture("driver-not-loaded.txt"))
    assert not nvidia_smi_field_unsupported(fixture("h100.csv"))


# --- WSL -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("osrelease", "version", "expected"),
    [
        ("osrelease-wsl2.txt", "version-wsl2.txt", 2),
        ("osrelease-wsl2.txt", None, 2),
        (None, "version-wsl2.txt", 2),
        ("osrelease-wsl1.txt", "version-wsl1.txt", 1),
        ("osrelease-h100.txt", "version-h200.txt", 0),
        ("osrelease-controller.txt", None, 0),
    ],
)
def test_wsl_version_from_kernel_text(osrelease, version, expected):
    text = fixture(osrelease) if osrelease else ""
    proc_version = fixture(version) if version else ""
    assert nvidia_wsl_version(text, proc_version) == expected
    assert nvidia_is_wsl2(text, proc_version) is (expected == 2)


def test_custom_wsl2_kernel_names_still_count():
    assert nvidia_is_wsl2("6.6.36.3-microsoft-standard-WSL2+")
    assert nvidia_is_wsl2("5.10.102.1-microsoft-custom")
    assert not nvidia_is_wsl2("6.8.0-49-generic", "Linux version 6.8.0-49-generic (buildd@lcy02-amd64-103)")


# --- PCI and the fallback tables -------------------------------------------------------------------


def test_pci_finds_the_gpu_but_not_its_audio_function():
    assert nvidia_pci_gpus(fixture("pci-gtx-1080-ti.txt")) == [
        {"address": "0000:01:00.0", "device_id": "0x1b06", "class": "0x030000"}
    ]
    assert nvidia_pci_gpus(fixture("pci-h200.txt")) == [
        {"address": "0000:00:06.0", "device_id": "0x2335", "class": "0x030200"}
    ]
    assert nvidia_pci_gpus(fixture("pci-no-gpu.txt")) == []
    assert nvidia_pci_gpus("") == []


@pytest.mark.parametrize(
    ("name", "cc"),
    [
        ("GeForce GTX 1080 Ti", "6.1"),
        ("NVIDIA GeForce GTX 1080 Ti", "6.1"),
        ("NVIDIA TITAN X (Pascal)", "6.1"),
        ("GeForce GTX TITAN X", "5.2"),
        ("Tesla P100-PCIE-16GB", "6.0"),
        ("Tesla P40", "6.1"),
        ("Tesla V100-SXM2-32GB", "7.0"),
        ("GeForce RTX 2080 Ti", "7.5"),
        ("Tesla T4", "7.5"),
        ("NVIDIA A100-SXM4-80GB", "8.0"),
        ("NVIDIA GeForce RTX 3090", "8.6"),
        ("NVIDIA RTX A6000", "8.6"),
        ("NVIDIA GeForce RTX 4090", "8.9"),
        ("NVIDIA L4", "8.9"),
        ("NVIDIA H100 80GB HBM3", "9.0"),
        ("NVIDIA H200", "9.0"),
        ("NVIDIA B200", "10.0"),
        ("NVIDIA GeForce RTX 5090", "12.0"),
        ("NVIDIA GeForce RTX 5090 Laptop GPU", "12.0"),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "12.0"),
        ("Tesla K80", "3.7"),
        ("Some Future GPU", None),
        (None, None),
    ],
)
def test_compute_capability_by_name(name, cc):
    assert nvidia_cc_fallback(name) == cc


@pytest.mark.parametrize(
    ("device_id", "cc", "generation"),
    [
        ("0x1b06", "6.1", "pascal"),  # GTX 1080 Ti
        ("0x15f8", "6.0", "pascal"),  # Tesla P100
        ("0x1db6", "7.0", "volta"),  # Tesla V100 32 GB
        ("0x1e07", "7.5", "turing"),  # RTX 2080 Ti
        ("0x2204", "8.6", "ampere"),  # RTX 3090
        ("0x20b2", "8.0", "ampere"),  # A100 80 GB
        ("0x2684", "8.9", "ada"),  # RTX 4090
        ("0x2330", "9.0", "hopper"),  # H100 SXM
        ("0x2335", "9.0", "hopper"),  # H200
        ("0x2b85", "12.0", "blackwell"),  # RTX 5090
        ("0x1004", "3.5", "kepler"),
        ("0x0001", None, None),
        ("garbage", None, None),
    ],
)
def test_compute_capability_by_pci_id(device_id, cc, generation):
    assert nvidia_pci_fallback(device_id) == cc
    assert nvidia_generation(cc) == generation


# --- the driver plan -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "distro", "version", "branch", "open_modules", "packages", "problems"),
    [
        ("pascal", "Ubuntu", "24", "580", False, ["nvidia-headless-580", "nvidia-utils-580"], []),
        ("maxwell", "Ubuntu", "22", "580", False, ["nvidia-headless-580", "nvidia-utils-580"], []),
        ("turing", "Ubuntu", "24", "580", True, ["nvidia-headless-580-open", "nvidia-utils-580"], []),
        ("hopper", "Ubuntu", "22", "580", True, ["nvidia-headless-580-open", "nvidia-utils-580"], []),
        ("blackwell", "Ubuntu", "24", "580", True, ["nvidia-headless-580-open", "nvidia-utils-580"], []),
        ("kepler", "Ubuntu", "22", "470", False, ["nvidia-headless-470", "nvidia-utils-470"], []),
        ("pascal", "Debian", "12", "535", False, ["nvidia-driver", "firmware-misc-nonfree"], []),
        ("ada", "Debian", "13", "550", False, ["nvidia-driver", "firmware-misc-nonfree"], []),
        (
            "blackwell",
            "Debian",
            "12",
            "535",
            False,
            ["nvidia-driver", "firmware-misc-nonfree"],
            ["Blackwell GPUs need R570 or newer, not R535 (Debian 12 ships R535)"],
        ),
        (None, "Ubuntu", "24", "580", False, ["nvidia-headless-580", "nvidia-utils-580"], ["generation"]),
        ("pascal", "Fedora", "41", "580", False, [], ["knows Ubuntu and Debian only, not Fedora"]),
    ],
)
def test_driver_plan_by_generation(generation, distro, version, branch, open_modules, packages, problems):
    plan = nvidia_driver_plan(generation, distro, version)
    assert (plan["branch"], plan["open_modules"], plan["packages"]) == (branch, open_modules, packages)
    for fragment in problems:
        assert any(fragment in problem for problem in plan["problems"]), (fragment, plan["problems"])
    if not problems:
        assert plan["problems"] == []


@pytest.mark.parametrize(
    ("generation", "branch", "open_modules", "problem"),
    [
        ("pascal", "590", None, "Pascal GPUs are supported by R580 and older only, not R590"),
        ("pascal", None, True, "open kernel modules support Turing and newer only"),
        ("blackwell", "565", None, "Blackwell GPUs need R570 or newer, not R565"),
        ("blackwell", None, False, "Blackwell GPUs work with the open kernel modules only"),
        ("kepler", "535", None, "Kepler GPUs are supported by R470 and older only"),
        ("turing", "five-eighty", None, "is not a branch number"),
    ],
)
def test_driver_plan_refuses_branches_that_cannot_drive_the_gpu(generation, branch, open_modules, problem):
    plan = nvidia_driver_plan(generation, "Ubuntu", "24", branch, open_modules)
    assert any(problem in p for p in plan["problems"]), plan["problems"]


def test_driver_plan_takes_explicit_choices():
    plan = nvidia_driver_plan("turing", "Ubuntu", "24", "570", False, ["nvidia-driver-570-server"])
    assert plan == {
        "generation": "turing",
        "branch": "570",
        "open_modules": False,
        "packages": ["nvidia-driver-570-server"],
        "problems": [],
    }
    assert nvidia_driver_plan("blackwell", "Debian", "12", packages=["nvidia-open"])["problems"] == []


def test_installed_driver_too_old_for_blackwell():
    assert nvidia_driver_problems("blackwell", "566.36", is_wsl2=True)[0].startswith(
        "the Windows NVIDIA driver 566.36 is too old"
    )
    assert "R570" in nvidia_driver_problems("blackwell", "560.35.03")[0]
    assert nvidia_driver_problems("blackwell", "580.95.05") == []
    assert nvidia_driver_problems("pascal", "535.183.01") == []
    assert nvidia_driver_problems("pascal", None) == []


# --- the facts the role sets -----------------------------------------------------------------------------

NATIVE = {"osrelease": "6.8.0-49-generic\n", "proc_version": "Linux version 6.8.0-49-generic\n"}
WSL2 = {"osrelease": fixture("osrelease-wsl2.txt"), "proc_version": fixture("version-wsl2.txt")}
WSL2_SMI = "/usr/lib/wsl/lib/nvidia-smi"


def smi(name: str, rc: int = 0) -> dict:
    return {"smi_found": True, "smi_rc": rc, "smi_stdout": fixture(name), "smi_stderr": ""}


def test_no_gpu_native_host():
    facts = nvidia_runtime_detect({**NATIVE, "pci": fixture("pci-no-gpu.txt"), "smi_found": False})
    assert facts["gpu_present"] is False
    assert facts["is_wsl2"] is False
    assert facts["gpu_compute_capability"] is None
    assert facts["problems"] == []


def test_gpu01_with_its_driver():
    facts = nvidia_runtime_detect(
        {**NATIVE, "pci": fixture("pci-gtx-1080-ti.txt"), "module_loaded": True, **smi("gtx-1080-ti.csv")}
    )
    assert facts["gpu_present"] is True
    assert facts["gpu_name"] == "GeForce GTX 1080 Ti"
    assert facts["gpu_compute_capability"] == "6.1"
    assert facts["gpu_compute_capability_source"] == "nvidia-smi"
    assert facts["gpu_memory_mib"] == 11264
    assert facts["gpu_generation"] == "pascal"
    assert facts["driver_version"] == "535.183.01"
    assert facts["driver_loaded"] is True
    assert facts["gpu_pci_ids"] == ["0x1b06"]
    assert facts["problems"] == []


def test_gpu01_on_an_old_driver_without_compute_cap():
    facts = nvidia_runtime_detect(
        {
            **NATIVE,
            "pci": fixture("pci-gtx-1080-ti.txt"),
            "module_loaded": True,
            **smi("old-driver-error.txt", rc=2),
            "smi_nocc_stdout": fixture("old-driver-nocc.csv"),
        }
    )
    assert facts["gpu_compute_capability"] == "6.1"
    assert facts["gpu_compute_capability_source"] == "name table"
    assert facts["gpu_memory_mib"] == 11264
    assert facts["driver_version"] == "470.256.02"
    assert facts["problems"] == []
    assert any("older than R510" in note for note in facts["notes"])


def test_old_driver_and_unknown_gpu_needs_the_inventory_override():
    inputs = {
        **NATIVE,
        "module_loaded": True,
        **smi("old-driver-error.txt", rc=2),
        "smi_nocc_stdout": "Mystery Accelerator 9000, 16384, 470.256.02\n",
    }
    facts = nvidia_runtime_detect(inputs)
    assert facts["gpu_compute_capability"] is None
    assert any("nvidia_runtime_gpu_compute_capability_override" in p for p in facts["problems"])
    facts = nvidia_runtime_detect({**inputs, "compute_capability_override": 7.5})
    assert (facts["gpu_compute_capability"], facts["gpu_compute_capability_source"]) == ("7.5", "inventory")
    assert facts["problems"] == []


def test_gpu01_before_any_driver_is_found_on_the_pci_bus():
    facts = nvidia_runtime_detect({**NATIVE, "pci": fixture("pci-gtx-1080-ti.txt"), "smi_found": False})
    assert facts["gpu_present"] is True
    assert facts["gpu_name"] is None
    assert facts["gpu_compute_capability"] == "6.1"
    assert facts["gpu_compute_capability_source"] == "pci id table"
    assert facts["gpu_generation"] == "pascal"
    assert facts["driver_loaded"] is False
    assert facts["problems"] == []
    assert any("installs one" in note for note in facts["notes"])


def test_installed_but_not_loaded_driver_is_a_problem():
    facts = nvidia_runtime_detect(
        {**NATIVE, "pci": fixture("pci-gtx-1080-ti.txt"), **smi("driver-not-loaded.txt", rc=9)}
    )
    assert facts["gpu_present"] is True
    assert facts["driver_loaded"] is False
    assert any("couldn't communicate with the NVIDIA driver" in p for p in facts["problems"])


@pytest.mark.parametrize(
    ("name", "cc", "memory"),
    [("h100.csv", "9.0", 81559), ("h200.csv", "9.0", 143771), ("rtx-5090.csv", "12.0", 32607)],
)
def test_datacenter_and_desktop_gpus(name, cc, memory):
    facts = nvidia_runtime_detect(
        {**NATIVE, "pci": fixture("pci-h200.txt"), "module_loaded": True, **smi(name)}
    )
    assert (facts["gpu_compute_capability"], facts["gpu_memory_mib"]) == (cc, memory)
    assert facts["driver_loaded"] is True
    assert facts["problems"] == []


def test_wsl2_with_libcuda():
    facts = nvidia_runtime_detect({**WSL2, "libcuda_present": True, **smi("wsl2-rtx-5090.csv")})
    assert facts["is_wsl2"] is True
    assert facts["gpu_present"] is True
    assert facts["gpu_compute_capability"] == "12.0"
    assert facts["gpu_generation"] == "blackwell"
    assert facts["driver_version"] == "581.57"
    assert facts["driver_loaded"] is True
    assert facts["problems"] == []
    assert facts["notes"] == []  # never "installs one" on WSL2


def test_wsl2_without_libcuda_names_the_windows_fix():
    facts = nvidia_runtime_detect({**WSL2, "libcuda_present": False, "dxg_present": True, "smi_found": False})
    assert facts["gpu_present"] is True
    assert facts["driver_loaded"] is False
    [problem, unknown_cc] = facts["problems"]
    assert "/usr/lib/wsl/lib/libcuda.so is missing" in problem
    assert "nvidia-smi.exe" in problem
    assert "Never install a Linux NVIDIA driver inside WSL2" in problem
    assert "compute capability is unknown" in unknown_cc


def test_wsl2_without_any_gpu_does_nothing():
    facts = nvidia_runtime_detect(
        {**WSL2, "libcuda_present": False, "dxg_present": False, "smi_found": False}
    )
    assert facts["gpu_present"] is False
    assert facts["problems"] == []


def test_wsl2_behind_an_old_windows_driver():
    facts = nvidia_runtime_detect({**WSL2, "libcuda_present": True, **smi("wsl2-old-windows-driver.csv")})
    assert any("Windows NVIDIA driver 566.36 is too old" in p for p in facts["problems"])


def test_wsl1_has_no_gpu_support():
    facts = nvidia_runtime_detect(
        {
            "osrelease": fixture("osrelease-wsl1.txt"),
            "proc_version": fixture("version-wsl1.txt"),
            "gpu_present_override": True,
        }
    )
    assert facts["wsl_version"] == 1
    assert any("wsl --set-version" in p for p in facts["problems"])


def test_overrides_win_over_the_host():
    facts = nvidia_runtime_detect({**NATIVE, "wsl2_override": True, "libcuda_present": True})
    assert facts["is_wsl2"] is True
    facts = nvidia_runtime_detect({**WSL2, "wsl2_override": False, "pci": "", "smi_found": False})
    assert facts["is_wsl2"] is False
    facts = nvidia_runtime_detect({**NATIVE, "gpu_present_override": False, "pci": fixture("pci-h200.txt")})
    assert facts["gpu_present"] is False
    facts = nvidia_runtime_detect(
        {
            **NATIVE,
            "gpu_present_override": True,
            "compute_capability_override": "8.6",
            "memory_mib_override": 24576,
        }
    )
    assert (facts["gpu_compute_capability"], facts["gpu_memory_mib"]) == ("8.6", 24576)


# --- the diagnose table ---------------------------------------------------------------------------------


def test_a_container_sees_the_machines_gpu_but_is_never_given_a_driver():
    seen = {**NATIVE, "pci": fixture("pci-gtx-1080-ti.txt"), "smi_found": False, "module_loaded": False}
    facts = nvidia_runtime_detect({**seen, "container": "docker"})
    assert facts["gpu_present"] is True
    assert facts["in_container"] is True
    assert facts["container"] == "docker"
    assert facts["driver_loaded"] is False
    assert any("inside a docker container" in note for note in facts["notes"])
    assert not any("installs one" in note for note in facts["notes"])
    # The override treats it as a machine (the Molecule test of the install path), or forces a container.
    machine = nvidia_runtime_detect({**seen, "container": "docker", "container_override": False})
    assert machine["in_container"] is False
    assert any("installs one" in note for note in machine["notes"])
    forced = nvidia_runtime_detect({**seen, "container_override": True})
    assert (forced["in_container"], forced["container"]) == (True, "container")
    # On a machine nothing is said about containers.
    assert nvidia_runtime_detect(seen)["in_container"] is False


def test_wsl2_is_not_a_container_even_when_systemd_says_wsl():
    facts = nvidia_runtime_detect(
        {**WSL2, "container": "wsl", "libcuda_present": True, **smi("wsl2-rtx-5090.csv")}
    )
    assert facts["is_wsl2"] is True
    assert facts["in_container"] is False
    assert facts["container"] is None
