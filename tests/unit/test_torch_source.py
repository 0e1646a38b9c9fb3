"""Where the CPU torch comes from (plugins/filter/torch_source.py): wheelhouse, CPU index, or what to do.

The index is a real HTTP server on 127.0.0.1 standing in for PyTorch's CPU index (only whether it
answers is asked); the real index is not reachable from this machine.
"""

from __future__ import annotations

import http.server
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch_source

ROOT = Path(__file__).resolve().parents[2]
WHEEL_213 = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
WHEEL_291 = "torch-2.9.1+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_source, "_reachable", {})
    monkeypatch.delenv("TORCH_CPU_INDEX", raising=False)
    monkeypatch.delenv("TORCH_FROM_PYPI", raising=False)


class _Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/whl/cpu/torch/" else 404
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'<a href="torch-2.9.1%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl">torch</a>')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def index() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def dead_index() -> str:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"


def wheelhouse(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_the_wheelhouse_wins_and_is_named_as_the_host_sees_it(tmp_path: Path, dead_index: str):
    house = wheelhouse(tmp_path, WHEEL_291, WHEEL_213)
    source = torch_source.torch_source(house, "/opt/wheels", "3.11", "x86_64", dead_index)
    assert source["origin"] == "wheelhouse"
    assert source["spec"] == "torch==2.13.0+cpu"  # the pinned 2.13.0 before the index's 2.9.1
    assert source["index_url"] == ""
    assert source["pip_args"] == "--find-links /opt/wheels"
    assert WHEEL_213 in source["reason"]
    (tmp_path / "x").mkdir()
    only_291 = torch_source.torch_source(wheelhouse(tmp_path / "x", WHEEL_291), cpu_index=dead_index)
    assert only_291["spec"] == "torch==2.9.1+cpu"
    assert only_291["pip_args"] == f"--find-links {tmp_path / 'x'}"  # seen_as defaults to the wheelhouse


@pytest.mark.parametrize(
    ("name", "python", "machine"),
    [
        (WHEEL_213, "3.12", "x86_64"),  # another Python
        (WHEEL_213, "3.11", "aarch64"),  # another machine
        ("torch-2.9.1-cp311-cp311-manylinux_2_28_x86_64.whl", "3.11", "x86_64"),  # PyPI's CUDA build
        ("torch-2.5.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", "3.11", "x86_64"),  # not pinned
    ],
)
def test_a_wheel_that_does_not_fit_is_not_taken(
    tmp_path: Path, index: str, name: str, python: str, machine: str
):
    source = torch_source.torch_source(wheelhouse(tmp_path, name), None, python, machine, index)
    assert source["origin"] == "cpu-index"
    assert source["spec"] == "torch==2.9.1"  # inside moshi 0.2.13's pin, what moshi_profile gives CPU hosts
    assert source["index_url"] == index
    assert source["pip_args"] == ""


def test_no_wheelhouse_and_no_index_says_exactly_what_to_do(tmp_path: Path, dead_index: str):
    with pytest.raises(ValueError) as caught:
        torch_source.torch_source(tmp_path / "absent", None, "3.11", "x86_64", dead_index)
    text = str(caught.value)
    assert f"the wheelhouse {tmp_path / 'absent'} holds no torch 2.13.0+cpu or 2.9.1+cpu for cp311" in text
    assert f"{dead_index}/torch/ cannot be reached" in text
    assert (
        "pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 "
        f"--index-url {dead_index} torch==2.9.1 -d torch-wheels" in text
    )
    assert "TORCH_CPU_INDEX=URL" in text
    assert "TORCH_FROM_PYPI=1" in text and "CUDA build" in text


def test_an_index_that_answers_404_is_not_an_index(tmp_path: Path, index: str):
    with pytest.raises(ValueError, match=r"answered HTTP 404"):
        torch_source.torch_source(tmp_path, None, None, None, index + "/nothing")


def test_pypi_cuda_only_when_asked_and_only_as_the_last_resort(
    tmp_path: Path, index: str, dead_index: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TORCH_FROM_PYPI", "1")
    assert torch_source.torch_source(tmp_path, cpu_index=index)["origin"] == "cpu-index"
    source = torch_source.torch_source(tmp_path, cpu_index=dead_index)
    assert source == source | {"origin": "pypi-cuda", "spec": "torch==2.9.1", "index_url": "", "pip_args": ""}
    assert (
        torch_source.torch_source(wheelhouse(tmp_path, WHEEL_213), cpu_index=dead_index)["origin"]
        == "wheelhouse"
    )


def test_the_mirror_variable_replaces_the_index(tmp_path: Path, index: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_CPU_INDEX", index)
    assert torch_source.torch_source(tmp_path)["index_url"] == index


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "plugins" / "filter" / "torch_source.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_the_script_prints_shell_assignments_or_exits_3(tmp_path: Path, dead_index: str):
    house = wheelhouse(tmp_path, WHEEL_213)
    done = run_cli(
        "--wheelhouse", str(house), "--python-version", "3.11", "--machine", "x86_64", "--format", "shell"
    )
    assert done.returncode == 0, done.stderr
    values = dict(shlex.split(line)[0].split("=", 1) for line in done.stdout.splitlines())
    assert values["TORCH_SPEC"] == "torch==2.13.0+cpu"
    assert values["TORCH_PIP_ARGS"] == f"--find-links {house}"
    failed = run_cli("--wheelhouse", str(tmp_path / "none"), env={"TORCH_CPU_INDEX": dead_index, "PATH": ""})
    assert failed.returncode == 3
    assert failed.stdout == ""
    assert failed.stderr.startswith("[torch] No CPU torch can be installed")
