"""NVIDIA runtime knowledge: what the nvidia_runtime role reads on a host means, and what it decides.

Shared by the role's module (library/nvidia_runtime_facts.py, which reads the host and returns the
facts) as ``ansible.module_utils.nvidia_facts``; plain functions with table-driven tests
(tests/unit/test_nvidia_facts.py, fixtures in tests/fixtures/nvidia-smi/):

- :func:`nvidia_wsl_version` / :func:`nvidia_is_wsl2`: WSL2 from /proc/sys/kernel/osrelease or
  /proc/version text;
- :func:`nvidia_smi_parse`: ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` output;
- :func:`nvidia_smi_field_unsupported`: the error of drivers older than R510, which lack ``compute_cap``;
- :func:`nvidia_pci_gpus`: NVIDIA display controllers from sysfs (works before any driver exists);
- :func:`nvidia_cc_fallback` / :func:`nvidia_pci_fallback`: compute capability by GPU name or PCI id;
- :func:`nvidia_driver_plan`: the driver branch, kernel-module flavour and packages for a GPU generation;
- :func:`nvidia_runtime_detect`: all of the above, as the facts the role sets.

What Moshi can run on the GPU (precision, torch build, speed) is decided in plugins/filter/moshi_profile.py,
and the diagnose table is plugins/filter/diagnose_table.py. Driver branches: NVIDIA's driver support notes
(R580 is the last branch for Maxwell, Pascal and Volta; Blackwell needs R570 and the open kernel modules).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from typing import Any

NVIDIA_VENDOR = "0x10de"
DISPLAY_CLASS_PREFIX = "0x03"  # 0x0300xx VGA, 0x0302xx 3D controller (datacenter GPUs)
QUERY_FIELDS = ("name", "compute_cap", "memory.total", "driver_version")
QUERY_FIELDS_NO_CC = ("name", "memory.total", "driver_version")
WSL_LIBCUDA = "/usr/lib/wsl/lib/libcuda.so"

# Driver branches (NVIDIA's support matrix).
DEFAULT_BRANCH = 580
LAST_BRANCH_PRE_TURING = 580  # Maxwell, Pascal, Volta: R580 is their last branch
LAST_BRANCH_KEPLER = 470
BLACKWELL_MIN_BRANCH = 570
# Debian ships one branch per release (non-free `nvidia-driver`).
DEBIAN_BRANCH = {"11": 470, "12": 535, "13": 550}

GENERATIONS = (
    "kepler",
    "maxwell",
    "pascal",
    "volta",
    "turing",
    "ampere",
    "ada",
    "hopper",
    "blackwell",
)
OPEN_MODULES_FROM = "turing"  # the open kernel modules support Turing and newer only

# Compute capability by GPU name, for drivers whose nvidia-smi lacks compute_cap (older than R510).
# Names are matched lower-case, without a leading "NVIDIA "; the first match wins, so specific
# names come before general ones ("titan x (pascal)" before the Maxwell "titan x").
CC_BY_NAME: tuple[tuple[str, str], ...] = (
    (r"rtx pro \d+ blackwell|rtx 50\d0", "12.0"),
    (r"\bgb10\b", "12.1"),
    (r"\bb[12]00\b|\bgb200\b", "10.0"),
    (r"\bh100\b|\bh200\b|\bgh200\b|\bh800\b|\bh20\b", "9.0"),
    (r"rtx 40\d0|\bl4\b|\bl40s?\b|rtx \d+ ada", "8.9"),
    (r"\bjetson agx orin\b|\borin\b", "8.7"),
    (r"\ba100\b|\ba800\b|\ba30\b", "8.0"),
    (r"rtx 30\d0|\ba10g?\b|\ba16\b|\ba2\b|\ba40\b|rtx a\d000", "8.6"),
    (r"rtx 20\d0|gtx 16\d0|titan rtx|\bt4\b|quadro rtx|\bt[46]00\b|\bt1000\b|\bmx450\b", "7.5"),
    (r"\bv100s?\b|titan v\b|quadro gv100", "7.0"),
    (r"\bp100\b|quadro gp100", "6.0"),
    (r"gtx 10[5-8]0|\bgt 1030\b|titan xp|titan x \(pascal\)|\bp40\b|\bp[46]\b|quadro p\d+", "6.1"),
    (r"\bmx[123]50\b", "6.1"),
    (r"gtx 9[5-8]0|titan x\b|\bm40\b|\bm60\b|\bm6000\b", "5.2"),
    (r"gtx 750|\bm10\b|gtx 9[45]0m", "5.0"),
    (r"\bk80\b", "3.7"),
    (r"\bk40\b|\bk20x?\b|gtx 780|titan black|gtx titan", "3.5"),
    (r"gtx 6[5-9]0|gtx 7[67]0|\bk10\b", "3.0"),
)

# Compute capability by PCI device id ranges, for hosts where no driver (so no nvidia-smi) exists
# yet: enough to pick the driver branch. (low, high, cc), from the pci.ids chip families.
CC_BY_PCI_ID: tuple[tuple[int, int, str], ...] = (
    (0x0FC0, 0x12FF, "3.5"),  # Kepler GK10x/GK11x/GK20x (3.0 .. 3.7)
    (0x1340, 0x13BF, "5.0"),  # Maxwell GM107/GM108
    (0x13C0, 0x14FF, "5.2"),  # Maxwell GM204/GM206
    (0x1500, 0x15FF, "6.0"),  # Pascal GP100 (Tesla P100)
    (0x1700, 0x17FF, "5.2"),  # Maxwell GM200
    (0x1B00, 0x1D7F, "6.1"),  # Pascal GP102/GP104/GP106/GP107/GP108 (GTX 1080 Ti is 0x1b06)
    (0x1D80, 0x1DFF, "7.0"),  # Volta GV100 (Tesla V100, TITAN V)
    (0x1E00, 0x1FFF, "7.5"),  # Turing TU10x/TU117
    (0x2000, 0x20FF, "8.0"),  # Ampere GA100 (A100)
    (0x2100, 0x21FF, "7.5"),  # Turing TU116
    (0x2200, 0x22FF, "8.6"),  # Ampere GA102
    (0x2300, 0x23FF, "9.0"),  # Hopper GH100 (H100 0x2330, H200 0x2335)
    (0x2400, 0x25FF, "8.6"),  # Ampere GA104/GA106/GA107
    (0x2600, 0x28FF, "8.9"),  # Ada AD10x
    (0x2900, 0x29FF, "10.0"),  # Blackwell GB100/GB200 (B200)
    (0x2B00, 0x2FFF, "12.0"),  # Blackwell GB20x (RTX 50 series; RTX 5090 is 0x2b85)
)


# --- text parsing -----------------------------------------------------------------------------------


def nvidia_wsl_version(osrelease: Any = "", proc_version: Any = "") -> int:
    """0 on native Linux, 1 on WSL1, 2 on WSL2, from /proc/sys/kernel/osrelease or /proc/version.

    WSL2 kernels say ``5.15.167.4-microsoft-standard-WSL2`` (lower-case "microsoft"); WSL1 reports
    ``4.4.0-19041-Microsoft`` (capitalised), and has no GPU support at all.
    """
    text = f"{osrelease or ''}\n{proc_version or ''}"
    lower = text.lower()
    if "microsoft" not in lower:
        return 0
    if "wsl2" in lower or "microsoft-standard" in lower or re.search(r"-microsoft\b", text):
        return 2
    return 1


def nvidia_is_wsl2(osrelease: Any = "", proc_version: Any = "") -> bool:
    return nvidia_wsl_version(osrelease, proc_version) == 2


def _none_if_na(value: str) -> str | None:
    value = value.strip()
    if not value or value.startswith("[") or value.upper() in ("N/A", "NONE"):
        return None  # "[N/A]", "[Not Supported]", "[Unknown Error]"
    return value


def normalize_cc(value: Any) -> str | None:
    """Compute capability as "major.minor": "6.1", 6.1, "12" -> "6.1", "6.1", "12.0"; else None."""
    if value is None or value == "":
        return None
    match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*", str(value))
    if not match:
        return None
    return f"{int(match.group(1))}.{int(match.group(2) or 0)}"


def _memory_mib(value: str | None) -> int | None:
    if value is None:
        return None
    match = re.match(r"\s*(\d+(?:\.\d+)?)", value)
    return int(float(match.group(1))) if match else None


def nvidia_smi_parse(stdout: Any, fields: Iterable[str] = QUERY_FIELDS) -> list[dict[str, Any]]:
    """Parse ``nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits`` into one dict per GPU.

    Keys: name, compute_capability (str like "6.1" or None), memory_mib (int or None),
    driver_version (str or None). Lines that do not have the asked-for number of fields (error
    messages, a header line) are ignored.
    """
    names = list(fields)
    gpus: list[dict[str, Any]] = []
    for row in csv.reader(str(stdout or "").splitlines(), skipinitialspace=True):
        if len(row) != len(names) or row[0].strip().lower() == "name":
            continue
        values = dict(zip(names, (_none_if_na(cell) for cell in row), strict=True))
        gpus.append(
            {
                "name": values.get("name"),
                "compute_capability": normalize_cc(values.get("compute_cap")),
                "memory_mib": _memory_mib(values.get("memory.total")),
                "driver_version": values.get("driver_version"),
            }
        )
    return gpus


def nvidia_smi_field_unsupported(output: Any) -> bool:
    """True for the error of drivers older than R510: ``Field "compute_cap" is not a valid field ...``."""
    return bool(re.search(r"is not a valid field to query", str(output or "")))


def nvidia_pci_gpus(grep_output: Any) -> list[dict[str, str]]:
    """NVIDIA display controllers from ``grep -sH . DIR/*/vendor DIR/*/class DIR/*/device``.

    Each line is ``DIR/0000:01:00.0/vendor:0x10de``. Returns [{address, device_id, class}] for
    vendor 0x10de and class 0x03xxxx (the GPU itself, not its HDMI audio function).
    """
    devices: dict[str, dict[str, str]] = {}
    for line in str(grep_output or "").splitlines():
        path, sep, value = line.rpartition(":")
        if not sep:
            continue
        address, _, attribute = path.rpartition("/")
        address = address.rpartition("/")[2]
        if attribute in ("vendor", "class", "device"):
            devices.setdefault(address, {})[attribute] = value.strip().lower()
    return [
        {"address": address, "device_id": attrs.get("device", ""), "class": attrs.get("class", "")}
        for address, attrs in sorted(devices.items())
        if attrs.get("vendor") == NVIDIA_VENDOR and attrs.get("class", "").startswith(DISPLAY_CLASS_PREFIX)
    ]


# --- knowledge tables ---------------------------------------------------------------------------------


def nvidia_cc_fallback(name: Any) -> str | None:
    """Compute capability of a GPU by its nvidia-smi name, or None if the table does not know it."""
    if not name:
        return None
    key = re.sub(r"^nvidia\s+", "", str(name).strip().lower())
    return next((cc for pattern, cc in CC_BY_NAME if re.search(pattern, key)), None)


def nvidia_pci_fallback(device_id: Any) -> str | None:
    """Compute capability (of the chip family) by PCI device id, e.g. "0x1b06" -> "6.1"."""
    try:
        number = int(str(device_id), 16)
    except ValueError:
        return None
    return next((cc for low, high, cc in CC_BY_PCI_ID if low <= number <= high), None)


def nvidia_generation(cc: Any) -> str | None:
    """The architecture generation of a compute capability: "6.1" -> "pascal", "12.0" -> "blackwell"."""
    normalized = normalize_cc(cc)
    if normalized is None:
        return None
    major, minor = (int(part) for part in normalized.split("."))
    if major >= 10:
        return "blackwell"
    table = {3: "kepler", 5: "maxwell", 6: "pascal", 8: "ada" if minor >= 9 else "ampere", 9: "hopper"}
    if major == 7:
        return "turing" if minor >= 5 else "volta"
    return table.get(major)


def _generation_index(generation: str | None) -> int:
    return GENERATIONS.index(generation) if generation in GENERATIONS else -1


def nvidia_driver_plan(
    generation: Any,
    distribution: Any = "Ubuntu",
    distribution_major_version: Any = "",
    branch: Any = None,
    open_modules: Any = None,
    packages: Any = None,
) -> dict[str, Any]:
    """The driver to install on a native host: branch, kernel-module flavour, packages, problems.

    Pascal (and Maxwell, Volta) need R580 or older with the proprietary modules; Turing and newer
    take the open modules; Blackwell needs R570 or newer and the open modules (they are the only
    ones that support it). Ubuntu: ``nvidia-headless-<branch>[-open]`` and ``nvidia-utils-<branch>``.
    Debian: its own non-free ``nvidia-driver`` (one branch per release, proprietary modules).
    """
    problems: list[str] = []
    gen = str(generation) if generation else None
    index = _generation_index(gen)
    turing_or_newer = index >= GENERATIONS.index(OPEN_MODULES_FROM)
    distro = str(distribution or "")
    explicit_packages = [str(p) for p in packages or []]

    if gen is None or index < 0:
        problems.append(
            "cannot tell the GPU generation (no driver, and the PCI id is not in the table): set "
            "nvidia_runtime_gpu_compute_capability_override (e.g. '6.1')"
        )
    default_branch = LAST_BRANCH_KEPLER if gen == "kepler" else DEFAULT_BRANCH
    if distro == "Debian" and not explicit_packages:
        default_branch = DEBIAN_BRANCH.get(str(distribution_major_version), default_branch)
    try:
        chosen = int(str(branch)) if branch not in (None, "") else default_branch
    except ValueError:
        problems.append(f"nvidia_runtime_driver_branch={branch!r} is not a branch number such as '580'")
        chosen = default_branch
    use_open = bool(open_modules) if open_modules is not None else turing_or_newer

    if gen == "kepler" and chosen > LAST_BRANCH_KEPLER:
        problems.append(
            f"Kepler GPUs are supported by R{LAST_BRANCH_KEPLER} and older only, not R{chosen}: "
            f"set nvidia_runtime_driver_branch={LAST_BRANCH_KEPLER}"
        )
    if gen in ("maxwell", "pascal", "volta") and chosen > LAST_BRANCH_PRE_TURING:
        problems.append(
            f"{gen.capitalize()} GPUs are supported by R{LAST_BRANCH_PRE_TURING} and older only, not "
            f"R{chosen}: set nvidia_runtime_driver_branch={LAST_BRANCH_PRE_TURING}"
        )
    if use_open and gen is not None and index >= 0 and not turing_or_newer:
        problems.append(
            f"the open kernel modules support Turing and newer only, this GPU is {gen.capitalize()}: "
            "set nvidia_runtime_driver_open_modules=false"
        )
    if gen == "blackwell":
        if chosen < BLACKWELL_MIN_BRANCH:
            where = f" (Debian {distribution_major_version} ships R{chosen})" if distro == "Debian" else ""
            problems.append(
                f"Blackwell GPUs need R{BLACKWELL_MIN_BRANCH} or newer, not R{chosen}{where}: set "
                f"nvidia_runtime_driver_branch to {DEFAULT_BRANCH}, or on Debian add NVIDIA's CUDA apt "
                "repository and set nvidia_runtime_driver_packages (e.g. ['nvidia-open'])"
            )
        if open_modules is not None and not use_open:
            problems.append(
                "Blackwell GPUs work with the open kernel modules only: set "
                "nvidia_runtime_driver_open_modules=true (or leave it unset)"
            )

    if explicit_packages:
        chosen_packages = explicit_packages
    elif distro == "Ubuntu":
        suffix = "-open" if use_open else ""
        chosen_packages = [f"nvidia-headless-{chosen}{suffix}", f"nvidia-utils-{chosen}"]
    elif distro == "Debian":
        if open_modules:
            problems.append(
                "Debian's own packages here use the proprietary modules: leave "
                "nvidia_runtime_driver_open_modules unset, or set nvidia_runtime_driver_packages"
            )
        use_open = False
        chosen_packages = ["nvidia-driver", "firmware-misc-nonfree"]
    else:
        chosen_packages = []
        problems.append(
            f"the driver install knows Ubuntu and Debian only, not {distro or 'this OS'}: install the "
            "driver yourself, set nvidia_runtime_driver_packages, or set nvidia_runtime_driver_install=false"
        )
    return {
        "generation": gen,
        "branch": str(chosen),
        "open_modules": use_open,
        "packages": chosen_packages,
        "problems": problems,
    }


def nvidia_driver_problems(generation: Any, driver_version: Any, is_wsl2: Any = False) -> list[str]:
    """Problems of an installed driver for this GPU generation (an old driver on a Blackwell card)."""
    match = re.match(r"\s*(\d+)", str(driver_version or ""))
    if not match:
        return []
    branch = int(match.group(1))
    if generation != "blackwell" or branch >= BLACKWELL_MIN_BRANCH:
        return []
    if is_wsl2:
        return [
            f"the Windows NVIDIA driver {driver_version} is too old for a Blackwell GPU: install "
            f"R{BLACKWELL_MIN_BRANCH} or newer on Windows, then run `wsl --shutdown`"
        ]
    return [
        f"the NVIDIA driver {driver_version} is too old for a Blackwell GPU: install R{BLACKWELL_MIN_BRANCH} "
        "or newer (nvidia_runtime_driver_branch)"
    ]


def wsl_libcuda_problem(libcuda_path: str = WSL_LIBCUDA) -> str:
    return (
        f"WSL2: {libcuda_path} is missing, so CUDA cannot reach the GPU. Fix it on Windows: install or "
        "update the NVIDIA driver for the GPU (an RTX 50 series card needs R570 or newer), check that "
        "`nvidia-smi.exe` lists the GPU in a Windows terminal, then run `wsl --shutdown` and reconnect. "
        "Never install a Linux NVIDIA driver inside WSL2."
    )


# --- the facts ------------------------------------------------------------------------------------------


def _get(inputs: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = inputs.get(key, default)
    return default if value is None else value


def nvidia_runtime_detect(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The role's facts (without their ``nvidia_runtime_`` prefix) from what detect.yml read.

    inputs: osrelease, proc_version (text), wsl2_override (bool or None), pci (grep output),
    smi_found (bool), smi_rc, smi_stdout, smi_stderr (the full query), smi_nocc_stdout (the query
    without compute_cap, run only on old drivers), libcuda_present, dxg_present, module_loaded
    (/proc/driver/nvidia/version exists), libcuda_path, gpu_present_override,
    compute_capability_override, memory_mib_override, container (the container's name, "" on a
    machine), container_override (bool or None).

    In a container, sysfs shows the machine's GPUs, but a driver belongs to the machine's kernel: the
    facts say so (``in_container``) and the role installs none there.
    """
    container_override = inputs.get("container_override")
    container = str(_get(inputs, "container", "")).strip()
    if container_override is not None:
        container = (container or "container") if container_override else ""
    override = inputs.get("wsl2_override")
    wsl = (
        (2 if override else 0)
        if override is not None
        else nvidia_wsl_version(inputs.get("osrelease"), inputs.get("proc_version"))
    )
    is_wsl2 = wsl == 2
    if is_wsl2 and container_override is None:
        container = ""  # systemd counts WSL itself as a container ("wsl"); WSL2 has its own path
    pci = nvidia_pci_gpus(inputs.get("pci"))
    problems: list[str] = []
    notes: list[str] = []

    smi_found = bool(inputs.get("smi_found"))
    smi_rc = int(_get(inputs, "smi_rc", -1))
    smi_output = f"{_get(inputs, 'smi_stdout', '')}\n{_get(inputs, 'smi_stderr', '')}"
    gpus: list[dict[str, Any]] = []
    cc_source: str | None = None
    if smi_found and smi_rc == 0:
        gpus = nvidia_smi_parse(_get(inputs, "smi_stdout", ""))
        cc_source = "nvidia-smi"
    elif smi_found and nvidia_smi_field_unsupported(smi_output):
        gpus = nvidia_smi_parse(_get(inputs, "smi_nocc_stdout", ""), QUERY_FIELDS_NO_CC)
        notes.append("the driver's nvidia-smi has no compute_cap field (older than R510)")
    elif smi_found:
        first = next((line.strip() for line in smi_output.splitlines() if line.strip()), "no output")
        problems.append(
            f"nvidia-smi fails ({first}): the driver is not working; after a driver or kernel update, reboot"
        )

    gpu = gpus[0] if gpus else {}
    name = gpu.get("name")
    cc = gpu.get("compute_capability")
    if cc is None and name:
        cc = nvidia_cc_fallback(name)
        cc_source = "name table" if cc else None
    if cc is None and pci:
        cc = nvidia_pci_fallback(pci[0]["device_id"])
        cc_source = "pci id table" if cc else None
    cc_override = normalize_cc(inputs.get("compute_capability_override"))
    if cc_override is not None:
        cc, cc_source = cc_override, "inventory"
    memory = gpu.get("memory_mib")
    if inputs.get("memory_mib_override") not in (None, ""):
        memory = int(inputs["memory_mib_override"])

    libcuda = bool(inputs.get("libcuda_present"))
    detected = bool(gpus or pci or (is_wsl2 and (libcuda or inputs.get("dxg_present"))))
    present_override = inputs.get("gpu_present_override")
    present = bool(present_override) if present_override is not None else detected
    if not present:
        return {
            "is_wsl2": is_wsl2,
            "wsl_version": wsl,
            "gpu_present": False,
            "gpu_count": 0,
            "gpu_name": None,
            "gpu_compute_capability": None,
            "gpu_compute_capability_source": None,
            "gpu_memory_mib": None,
            "gpu_generation": None,
            "gpu_pci_ids": [],
            "driver_version": None,
            "driver_loaded": False,
            "wsl_libcuda_present": libcuda,
            "in_container": bool(container),
            "container": container or None,
            "problems": [],
            "notes": [],
        }

    generation = nvidia_generation(cc)
    driver_version = gpu.get("driver_version")
    if wsl == 1:
        problems.append(
            "WSL1 has no GPU support: convert the distribution with `wsl --set-version <distro> 2`"
        )
    if is_wsl2 and not libcuda:
        problems.append(wsl_libcuda_problem(str(_get(inputs, "libcuda_path", WSL_LIBCUDA))))
    if cc is None:
        problems.append(
            "the GPU's compute capability is unknown (no compute_cap from the driver and the GPU is not in "
            "the fallback table): set nvidia_runtime_gpu_compute_capability_override (e.g. '6.1')"
        )
    problems.extend(nvidia_driver_problems(generation, driver_version, is_wsl2))
    # WSL2 has no NVIDIA kernel module: the Windows driver reaches Linux through libcuda.
    loaded = libcuda if is_wsl2 else bool(inputs.get("module_loaded")) or bool(gpus)
    if not is_wsl2 and not loaded and container:
        notes.append(
            f"inside a {container} container: the GPU belongs to the machine, whose driver must reach it "
            "(NVIDIA Container Toolkit, `--gpus`); no driver is installed in a container"
        )
    elif not is_wsl2 and not loaded:
        notes.append("no NVIDIA driver is loaded yet: the nvidia_runtime role installs one")
    return {
        "is_wsl2": is_wsl2,
        "wsl_version": wsl,
        "gpu_present": True,
        "gpu_count": max(len(gpus), len(pci), 1),
        "gpu_name": name,
        "gpu_compute_capability": cc,
        "gpu_compute_capability_source": cc_source,
        "gpu_memory_mib": memory,
        "gpu_generation": generation,
        "gpu_pci_ids": [device["device_id"] for device in pci],
        "driver_version": driver_version,
        "driver_loaded": loaded,
        "wsl_libcuda_present": libcuda,
        "in_container": bool(container),
        "container": container or None,
        "problems": problems,
        "notes": notes,
    }
