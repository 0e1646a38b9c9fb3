"""The README's set-up on a fresh Debian 12 machine, proved in a clean container (issue 15).

The container is made from the project's own base image (scripts/build-base-image.sh: Debian 12
minbase, python3 without python3-venv, no make) with this machine's CA certificates added, as
molecule/resources/prepare.yml does for test hosts. It reaches what this machine reaches (PyPI,
Debian's mirror); no wheelhouse and no pip cache is mounted where the set-up looks for them. The
wheelhouse check mounts this machine's wheelhouse at another path and points WHEELHOUSE at it.

What cannot be reached here is skipped with the reason: PyTorch's CPU index
(download.pytorch.org does not resolve from this machine), so the "torch from the CPU index" path
runs only where it answers, and the "nothing works, say what to do" path only where it does not.
Run alone with: pytest -q -s -m container tests/container (113-129 s measured on 2 cores; the
step times land in .cache/fresh-machine-timings.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("BASE_IMAGE", "voice-stack/debian-systemd:bookworm")
HOST_WHEELHOUSE = Path(os.environ.get("WHEELHOUSE") or "/opt/wheels")
CA_DIR = Path("/usr/local/share/ca-certificates")
REPO = "/root/voice-stack"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
FIX_LINES = (
    "No CPU torch can be installed: the wheelhouse /opt/wheels holds no torch 2.13.0+cpu or 2.9.1+cpu",
    f"{CPU_INDEX}/torch/ cannot be reached",
    "pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 "
    f"--index-url {CPU_INDEX} torch==2.9.1 -d torch-wheels",
    "set TORCH_CPU_INDEX=URL",
    "set TORCH_FROM_PYPI=1",
)


@dataclass
class Box:
    name: str
    timings: dict[str, float] = field(default_factory=dict)

    def sh(self, script: str, timeout: float = 300, label: str = "") -> subprocess.CompletedProcess[str]:
        """Run a bash script in the repository copy, as root; stdout and stderr together."""
        start = time.monotonic()
        done = subprocess.run(
            ["docker", "exec", "-w", REPO, self.name, "bash", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        if label:
            self.timings[label] = round(time.monotonic() - start, 1)
        return done


def _run(*args: str, timeout: float = 300, **kwargs: object) -> None:
    subprocess.run(list(args), check=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def _repo_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and (ROOT / name).is_file()})


def _has_wheelhouse() -> bool:
    return HOST_WHEELHOUSE.is_dir() and any(HOST_WHEELHOUSE.glob("torch-*+cpu-*.whl"))


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    # The project's own set-up of docker and the base image (both do nothing when already done).
    _run(str(ROOT / "scripts" / "ensure-docker.sh"), timeout=300)
    _run(str(ROOT / "scripts" / "build-base-image.sh"), IMAGE, timeout=600)
    name = f"voice-fresh-{os.getpid()}"
    mounts = ["-v", f"{HOST_WHEELHOUSE}:/mnt/wheelhouse:ro"] if _has_wheelhouse() else []
    _run("docker", "run", "-d", "--rm", "--name", name, *mounts, IMAGE, "sleep", "infinity", timeout=60)
    try:
        for crt in sorted(CA_DIR.glob("*.crt")):
            _run("docker", "cp", str(crt), f"{name}:{CA_DIR}/", timeout=60)
        _run("docker", "exec", name, "update-ca-certificates", timeout=120, stdout=subprocess.DEVNULL)
        _run("docker", "exec", name, "mkdir", "-p", REPO, timeout=30)
        with subprocess.Popen(
            ["tar", "-c", "--null", "-T", "-"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        ) as tar:
            assert tar.stdin is not None
            copy = subprocess.Popen(["docker", "exec", "-i", name, "tar", "-x", "-C", REPO], stdin=tar.stdout)
            tar.stdin.write("\0".join(_repo_files()).encode())
            tar.stdin.close()
            assert copy.wait(timeout=300) == 0
        made = Box(name)
        yield made
        # How long each step took, for the docs (and the CI log).
        (ROOT / ".cache").mkdir(exist_ok=True)
        (ROOT / ".cache" / "fresh-machine-timings.json").write_text(json.dumps(made.timings, indent=2) + "\n")
        print("\nfresh-machine timings (s):", made.timings)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60, check=False)


@dataclass
class Controller:
    half_made: subprocess.CompletedProcess[str]
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def controller(box: Box) -> Controller:
    """A failed python3 -m venv (no python3-venv yet), then the README's two lines: make, make controller."""
    half_made = box.sh("python3 -m venv .venv; echo rc=$?; ls .venv/bin; .venv/bin/python -m pip --version")
    first = box.sh(
        "apt-get update -qq && apt-get install -y -qq make >/dev/null && make controller",
        timeout=900,
        label="apt-get install make + make controller",
    )
    second = box.sh("make controller", timeout=120, label="make controller again")
    return Controller(half_made, first, second)


def index_answers(box: Box) -> tuple[bool, str]:
    probe = box.sh(
        f"python3 -c \"import urllib.request as u; u.urlopen('{CPU_INDEX}/torch/', timeout=10).read(64)\"",
        timeout=60,
    )
    return probe.returncode == 0, probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else ""


def test_make_controller_repairs_a_half_made_venv_and_installs_no_torch(box: Box, controller: Controller):
    half = controller.half_made.stdout
    assert "because ensurepip is not" in half and "rc=1" in half
    assert "python3" in half and "No module named pip" in half  # the broken .venv a failed run leaves

    out = controller.first.stdout
    assert controller.first.returncode == 0, out
    assert "apt-get install python3-venv openssh-client" in out
    assert "repairing .venv: it has no pip (python3 -m venv failed half-way); making it again" in out
    assert "controller tooling ready: ansible [core 2.19." in out

    tools = box.sh(
        "export PATH=$PWD/.venv/bin:$PATH && molecule --version && ansible-lint --version"
        " && yamllint --version && pytest --version && ruff --version && mypy --version"
        " && ansible-galaxy collection list community.docker"
    )
    assert tools.returncode == 0, tools.stdout
    assert "molecule 26.10.0" in tools.stdout and "community.docker" in tools.stdout
    packages = box.sh(".venv/bin/python -m pip list --format freeze").stdout.lower()
    for heavy in ("torch==", "moshi==", "bitsandbytes=="):
        assert heavy not in packages

    again = controller.second
    assert again.returncode == 0 and "Nothing to be done for 'controller'" in again.stdout, again.stdout


def test_a_python_older_than_3_11_gets_a_one_line_fix(box: Box, controller: Controller):
    # Debian 12 has no CPython older than 3.11; its PyPy 3 implements Python 3.9: a real old interpreter.
    installed = box.sh("apt-get install -y -qq pypy3 >/dev/null", timeout=300, label="apt-get install pypy3")
    assert installed.returncode == 0, installed.stdout
    done = box.sh("PYTHON=pypy3 ./scripts/bootstrap-controller.sh controller /tmp/old-venv", timeout=120)
    assert done.returncode == 1, done.stdout
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("[bootstrap] Python >= 3.11 is needed (ansible 12.x), found pypy3 3.9."), lines
    assert "Fix: install Python >= 3.11 and run again with PYTHON=/path/to/python3.X" in lines[0]
    assert box.sh("test -e /tmp/old-venv").returncode == 1


def test_no_wheelhouse_and_no_cpu_index_says_exactly_what_to_do(box: Box, controller: Controller):
    reachable, why = index_answers(box)
    if reachable:
        pytest.skip(f"{CPU_INDEX} answers from here, so the nothing-works path cannot be shown")
    assert "Name or service not known" in why or "urlopen error" in why, why
    # The controller's .venv (make venv) ...
    venv = box.sh("make venv", timeout=300, label="make venv (torch step fails)")
    assert venv.returncode != 0
    for line in FIX_LINES:
        assert line in venv.stdout, venv.stdout
    assert box.sh(".venv/bin/python -c 'import torch'").returncode == 1
    # ... and the demo host (inventory/local): the same decision, the same text, before any install.
    host = box.sh(
        ".venv/bin/ansible -i inventory/local voice-local -e ansible_connection=local"
        " -m ansible.builtin.debug -a var=moshi_server_torch_spec",
        timeout=120,
    )
    assert host.returncode != 0
    expected = "The filter plugin 'torch_source' failed: No CPU torch can be installed"
    assert expected in host.stdout, host.stdout


def test_torch_from_the_cpu_index(box: Box, controller: Controller):
    reachable, why = index_answers(box)
    if not reachable:
        pytest.skip(f"PyTorch's CPU index is out of reach from this machine ({CPU_INDEX}: {why})")
    done = box.sh("PIP_DRY_RUN=1 ./scripts/bootstrap-controller.sh torch .venv /opt/wheels", timeout=600)
    assert done.returncode == 0, done.stdout
    assert "torch: torch==2.9.1 from cpu-index" in done.stdout


@pytest.mark.skipif(not _has_wheelhouse(), reason=f"no CPU torch wheel in {HOST_WHEELHOUSE} on this machine")
def test_the_torch_step_takes_the_wheelhouse_when_there_is_one(box: Box, controller: Controller):
    done = box.sh(
        "./scripts/bootstrap-controller.sh torch .venv /mnt/wheelhouse"
        " && .venv/bin/python -c 'import torch; print(torch.__version__, torch.tensor([2.0]).sum().item())'",
        timeout=600,
        label="torch step from the wheelhouse",
    )
    assert done.returncode == 0, done.stdout
    assert "torch: torch==2.13.0+cpu from wheelhouse (torch-2.13.0+cpu-cp311-" in done.stdout
    assert "2.13.0+cpu 2.0" in done.stdout
    host = box.sh(
        "WHEELHOUSE=/mnt/wheelhouse .venv/bin/ansible -i inventory/local voice-local"
        " -e ansible_connection=local -m ansible.builtin.debug -a var=voice_torch_source",
        timeout=120,
    )
    assert host.returncode == 0, host.stdout
    assert '"spec": "torch==2.13.0+cpu"' in host.stdout
    assert '"pip_args": "--find-links /opt/wheels"' in host.stdout  # as the demo host sees its mount
