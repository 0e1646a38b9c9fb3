#!/usr/bin/python
"""Ansible module: read the host's kernel, PCI bus, nvidia-smi and driver files; return the NVIDIA facts.

Read-only (it runs in check mode too). What the readings mean is decided by module_utils/nvidia_facts.py
(``nvidia_runtime_detect``, ``nvidia_driver_plan``); this file only reads.
"""

from __future__ import annotations

import glob
import os
import subprocess
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.nvidia_facts import (
    QUERY_FIELDS,
    QUERY_FIELDS_NO_CC,
    nvidia_driver_plan,
    nvidia_is_wsl2,
    nvidia_runtime_detect,
)

DOCUMENTATION = r"""
module: nvidia_runtime_facts
short_description: Detect WSL2, the NVIDIA GPU, its driver and the driver to install; return them as facts
description:
  - Reads /proc/sys/kernel/osrelease and /proc/version (WSL2), the PCI devices in sysfs (a GPU before any
    driver), nvidia-smi (name, compute capability, memory, driver; asked again without compute_cap on
    drivers older than R510), the NVIDIA kernel module file, WSL2's libcuda.so and /dev/dxg, and the
    container marks. Changes nothing.
  - Returns the nvidia_runtime_* facts (docs/diagnose.md lists them), nvidia_runtime_driver_plan included.
options:
  osrelease_path: {type: path, default: /proc/sys/kernel/osrelease}
  proc_version_path: {type: path, default: /proc/version}
  pci_devices_dir: {type: path, default: /sys/bus/pci/devices}
  nvidia_smi_path:
    type: path
    description: Null runs /usr/lib/wsl/lib/nvidia-smi on WSL2 and /usr/bin/nvidia-smi otherwise.
  wsl_libcuda_path: {type: path, default: /usr/lib/wsl/lib/libcuda.so}
  module_file: {type: path, default: /proc/driver/nvidia/version}
  dxg_path: {type: path, default: /dev/dxg, description: The paravirtualised GPU device of WSL2.}
  container_marks:
    type: list
    elements: raw
    description: "[path, name or null] pairs; the first that exists names the container (null: its text)."
  wsl2_override: {type: bool}
  gpu_present_override: {type: bool}
  container_override: {type: bool}
  compute_capability_override: {type: raw}
  memory_mib_override: {type: raw}
  distribution: {type: str, default: ""}
  distribution_major_version: {type: str, default: ""}
  driver_branch: {type: raw}
  driver_open_modules: {type: bool}
  driver_packages: {type: list, elements: str, default: []}
"""

SMI_NATIVE = "/usr/bin/nvidia-smi"
SMI_WSL2 = "/usr/lib/wsl/lib/nvidia-smi"
# systemd writes the container's name to the first; docker and podman leave the others.
CONTAINER_MARKS = [
    ["/run/systemd/container", None],
    ["/.dockerenv", "docker"],
    ["/run/.containerenv", "podman"],
]
SMI_TIMEOUT_S = 60


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def pci_listing(pci_dir: str) -> str:
    """``DIR/ADDRESS/ATTR:VALUE`` lines for the vendor, class and device of every PCI device."""
    lines: list[str] = []
    for attr in ("vendor", "class", "device"):
        for path in sorted(glob.glob(os.path.join(glob.escape(pci_dir), "*", attr))):
            lines.extend(f"{path}:{line}" for line in read(path).splitlines() if line)
    return "\n".join(lines)


def container_name(marks: list[Any]) -> str:
    for path, name in marks:
        if os.path.exists(str(path)):
            return str(name or read(str(path)).strip() or "container")
    return ""


def smi(path: str, fields: tuple[str, ...]) -> tuple[int, str, str]:
    try:
        done = subprocess.run(
            [path, "--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return done.returncode, done.stdout, done.stderr


def detect(params: dict[str, Any]) -> dict[str, Any]:
    """The facts, with their nvidia_runtime_ prefix, from what this host shows."""
    osrelease = read(params["osrelease_path"])
    proc_version = read(params["proc_version_path"])
    wsl2 = params["wsl2_override"]
    is_wsl2 = wsl2 if wsl2 is not None else nvidia_is_wsl2(osrelease, proc_version)
    marks = params["container_marks"]
    smi_path = params["nvidia_smi_path"] or (SMI_WSL2 if is_wsl2 else SMI_NATIVE)
    inputs: dict[str, Any] = {
        "osrelease": osrelease,
        "proc_version": proc_version,
        "wsl2_override": wsl2,
        "pci": pci_listing(params["pci_devices_dir"]),
        "smi_found": os.path.isfile(smi_path),
        "module_loaded": os.path.exists(params["module_file"]),
        "libcuda_present": os.path.exists(params["wsl_libcuda_path"]),
        "libcuda_path": params["wsl_libcuda_path"],
        "dxg_present": os.path.exists(params["dxg_path"]),
        "gpu_present_override": params["gpu_present_override"],
        "container": container_name(CONTAINER_MARKS if marks is None else marks),
        "container_override": params["container_override"],
        "compute_capability_override": params["compute_capability_override"],
        "memory_mib_override": params["memory_mib_override"],
    }
    if inputs["smi_found"]:
        rc, stdout, stderr = smi(smi_path, QUERY_FIELDS)
        inputs.update(smi_rc=rc, smi_stdout=stdout, smi_stderr=stderr)
        if rc != 0:
            inputs["smi_nocc_stdout"] = smi(smi_path, QUERY_FIELDS_NO_CC)[1]
    facts = nvidia_runtime_detect(inputs)
    facts["driver_plan"] = nvidia_driver_plan(
        facts["gpu_generation"],
        params["distribution"],
        params["distribution_major_version"],
        params["driver_branch"],
        params["driver_open_modules"],
        params["driver_packages"],
    )
    return {f"nvidia_runtime_{key}": value for key, value in facts.items()}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "osrelease_path": {"type": "path", "default": "/proc/sys/kernel/osrelease"},
            "proc_version_path": {"type": "path", "default": "/proc/version"},
            "pci_devices_dir": {"type": "path", "default": "/sys/bus/pci/devices"},
            "nvidia_smi_path": {"type": "path"},
            "wsl_libcuda_path": {"type": "path", "default": "/usr/lib/wsl/lib/libcuda.so"},
            "module_file": {"type": "path", "default": "/proc/driver/nvidia/version"},
            "dxg_path": {"type": "path", "default": "/dev/dxg"},
            "container_marks": {"type": "list", "elements": "raw"},
            "wsl2_override": {"type": "bool"},
            "gpu_present_override": {"type": "bool"},
            "container_override": {"type": "bool"},
            "compute_capability_override": {"type": "raw"},
            "memory_mib_override": {"type": "raw"},
            "distribution": {"type": "str", "default": ""},
            "distribution_major_version": {"type": "str", "default": ""},
            "driver_branch": {"type": "raw"},
            "driver_open_modules": {"type": "bool"},
            "driver_packages": {"type": "list", "elements": "str", "default": []},
        },
        supports_check_mode=True,
    )
    module.exit_json(changed=False, ansible_facts=detect(module.params))


if __name__ == "__main__":
    main()
