"""Where a CPU torch comes from, for the controller's .venv and for the test and demo hosts.

One decision, used by ``scripts/bootstrap-controller.sh torch`` (run as a script) and by the
``torch_source`` filter in inventory/local and the Molecule base config (the hosts there are
containers on the controller, the wheelhouse bind-mounted at /opt/wheels):

1. the wheelhouse (the Makefile's ``WHEELHOUSE``, a local wheel directory) holds a CPU torch wheel
   of a pinned version for this Python and machine: install it with ``--find-links``;
2. else PyTorch's CPU index answers (``TORCH_CPU_INDEX`` to use a mirror of it): ``torch==2.9.1``
   from there, the newest release inside moshi 0.2.13's pin (the build moshi_profile gives CPU hosts);
3. else, only when ``TORCH_FROM_PYPI=1``: PyPI's ``torch==2.9.1``, the CUDA build (several GB with its
   nvidia-* wheels), which also runs on a CPU;
4. else a ``ValueError`` whose message says exactly what to do.

Production hosts do not use this: their torch comes from the profile table (moshi_profile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

try:
    from moshi_profile import INDEX_CPU, TORCH_SPEC
except ImportError:  # Ansible's plugin loader does not put this directory on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moshi_profile import INDEX_CPU, TORCH_SPEC

# CPU wheels a wheelhouse may hold, the preferred first: 2.13.0 is the one this project's machines
# carry (outside moshi's torch pin; moshi goes in with --no-deps), 2.9.1 what the CPU index serves.
WHEEL_VERSIONS = ("2.13.0+cpu", TORCH_SPEC.removeprefix("torch==") + "+cpu")
INDEX_TIMEOUT_S = 10.0
_reachable: dict[str, str | None] = {}


def _wheel_matches(wheel: Path, version: str, python_tag: str | None, machine: str | None) -> bool:
    parts = wheel.name.removesuffix(".whl").split("-")
    if len(parts) not in (5, 6) or parts[0] != "torch" or parts[1] != version:
        return False
    if python_tag is not None and python_tag not in parts[-3].split("."):
        return False
    return machine is None or any(tag.endswith("_" + machine) for tag in parts[-1].split("."))


def find_wheel(wheelhouse: Path, python_tag: str | None, machine: str | None) -> tuple[str, Path] | None:
    """The preferred pinned CPU torch wheel in ``wheelhouse`` for this Python and machine, if any."""
    if not wheelhouse.is_dir():
        return None
    wheels = sorted(wheelhouse.glob("torch-*.whl"))
    for version in WHEEL_VERSIONS:
        for wheel in wheels:
            if _wheel_matches(wheel, version, python_tag, machine):
                return version, wheel
    return None


def index_problem(index_url: str) -> str | None:
    """None when ``index_url`` lists torch, else why not (one request per process and URL)."""
    if index_url not in _reachable:
        url = index_url.rstrip("/") + "/torch/"
        try:
            with urllib.request.urlopen(url, timeout=INDEX_TIMEOUT_S) as reply:
                reply.read(1024)
            _reachable[index_url] = None
        except urllib.error.HTTPError as exc:
            _reachable[index_url] = f"{url} answered HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            _reachable[index_url] = f"{url} cannot be reached: {reason}"
    return _reachable[index_url]


def _python_tag(python_version: Any) -> str | None:
    if python_version in (None, ""):
        return None
    major, minor = str(python_version).split(".")[:2]
    return f"cp{major}{minor}"


def _fix(wheelhouse: Path, python_tag: str | None, machine: str | None, index_url: str) -> str:
    version = WHEEL_VERSIONS[-1].split("+")[0]
    py = python_tag.removeprefix("cp") if python_tag else "311"
    py_dotted = f"{py[0]}.{py[1:]}"
    arch = machine or "x86_64"
    return (
        "Do one of these, then run the same command again:\n"
        f"  1. on any machine that reaches {index_url}, download the CPU wheel:\n"
        f"       pip download --no-deps --only-binary=:all: --python-version {py_dotted} "
        f"--platform manylinux_2_28_{arch} --index-url {index_url} torch=={version} -d torch-wheels\n"
        f"     and copy torch-wheels/*.whl into {wheelhouse} (or set WHEELHOUSE=DIR, where it is);\n"
        "  2. set TORCH_CPU_INDEX=URL to a mirror of PyTorch's CPU index that this machine reaches;\n"
        f"  3. last resort: set TORCH_FROM_PYPI=1 to install PyPI's {TORCH_SPEC}, the CUDA build "
        "(several GB with its nvidia-* wheels; it runs on a CPU too)."
    )


def torch_source(
    wheelhouse: Any,
    seen_as: Any = None,
    python_version: Any = None,
    machine: Any = None,
    cpu_index: Any = None,
    allow_pypi: Any = None,
) -> dict[str, str]:
    """Decide where torch comes from. Keys: origin, spec, index_url ("" = PyPI), pip_args, reason.

    wheelhouse: the wheel directory on the controller; seen_as: the same directory as the installing
    machine sees it (a test host's bind mount), default wheelhouse; python_version ("3.11") and
    machine ("x86_64") of the installing Python, None to accept any; cpu_index: default
    TORCH_CPU_INDEX or PyTorch's; allow_pypi: default TORCH_FROM_PYPI == "1".
    """
    house = Path(str(wheelhouse or "/opt/wheels"))
    mount = str(seen_as) if seen_as not in (None, "") else str(house)
    tag = _python_tag(python_version)
    arch = str(machine) if machine not in (None, "") else None
    index = str(cpu_index or os.environ.get("TORCH_CPU_INDEX") or INDEX_CPU)
    pypi = allow_pypi if allow_pypi is not None else os.environ.get("TORCH_FROM_PYPI", "") == "1"
    wanted = f"torch {' or '.join(WHEEL_VERSIONS)} for {tag or 'any Python'} on {arch or 'any machine'}"

    found = find_wheel(house, tag, arch)
    if found is not None:
        version, wheel = found
        return {
            "origin": "wheelhouse",
            "spec": f"torch=={version}",
            "index_url": "",
            "pip_args": f"--find-links {mount}",
            "reason": f"{wheel.name} in the wheelhouse {house}",
        }
    missing = f"the wheelhouse {house} holds no {wanted}"
    problem = index_problem(index)
    if problem is None:
        return {
            "origin": "cpu-index",
            "spec": TORCH_SPEC,
            "index_url": index,
            "pip_args": "",
            "reason": f"{missing}; PyTorch's CPU index {index} answers",
        }
    if pypi in (True, "1", "true", "True", "yes"):
        return {
            "origin": "pypi-cuda",
            "spec": TORCH_SPEC,
            "index_url": "",
            "pip_args": "",
            "reason": f"{missing}; {problem}; TORCH_FROM_PYPI=1: PyPI's CUDA build (several GB)",
        }
    raise ValueError(
        f"No CPU torch can be installed: {missing}, and PyTorch's CPU index is out of reach ({problem}).\n"
        + _fix(house, tag, arch, index)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheelhouse", required=True, help="the local wheel directory")
    parser.add_argument("--python-version", default="{}.{}".format(*sys.version_info[:2]))
    parser.add_argument("--machine", default=platform.machine())
    parser.add_argument("--format", choices=("json", "shell"), default="json")
    args = parser.parse_args(argv)
    try:
        source = torch_source(args.wheelhouse, None, args.python_version, args.machine)
    except ValueError as exc:
        print(f"[torch] {exc}", file=sys.stderr)
        return 3
    if args.format == "json":
        print(json.dumps(source, indent=2))
    else:
        for key, value in source.items():
            print(f"TORCH_{key.upper()}={shlex.quote(value)}")
    return 0


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {"torch_source": torch_source}


if __name__ == "__main__":
    sys.exit(main())
