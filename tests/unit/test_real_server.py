"""The real moshi.server, started through our launcher on the tiny models, spoken to over websockets."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import tools_env
from moshi_tools.probe import probe

SERVER_ENV = {"NO_TORCH_COMPILE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@contextmanager
def launched(model_dir: Path, moshi_copy: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moshi_tools.launch",
            "--model-dir",
            str(model_dir),
            "--device",
            "cpu",
            "--static",
            "none",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=tools_env(moshi_copy) | SERVER_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            if http_status(f"http://127.0.0.1:{port}/api/chat") == 400:
                break
            time.sleep(0.3)
        yield process, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("variant", ["bf16", "q8"])
def test_server_speaks_the_protocol_on_the_tiny_model(tiny_models, patched_moshi, variant):
    with launched(tiny_models[variant], patched_moshi) as (process, port):
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        result = asyncio.run(probe(f"ws://127.0.0.1:{port}/api/chat", frames=20, timeout=30))
    assert result.handshake
    assert result.audio_messages >= 15, result
    assert result.text_messages >= 1, result
    assert http_status(f"http://127.0.0.1:{port}/") is None  # stopped


def test_released_moshi_reproduces_the_q8_field_error(tiny_models, unpatched_moshi):
    with launched(tiny_models["q8"], unpatched_moshi) as (process, _port):
        process.wait(timeout=60)
        output = process.stdout.read() if process.stdout else ""
    assert process.returncode != 0
    assert "Expected `weight_scb` to have type float, but got bfloat16" in output


def test_launcher_without_model_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moshi_tools.launch",
            "--model-dir",
            str(tmp_path / "absent"),
            "--device",
            "cpu",
        ],
        env=tools_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"moshi-launch: model directory {tmp_path / 'absent'} does not exist"


@pytest.mark.parametrize(
    ("moshi_copy", "rc", "line"),
    [
        ("patched_moshi", 0, "q8 self-test passed: scales torch.float32; 3 steps on cpu in bf16"),
        ("unpatched_moshi", 1, "q8 self-test FAILED: RuntimeError: Expected `weight_scb` to have type float"),
    ],
)
def test_selftest_tells_patched_from_released_loader(request, moshi_copy, rc, line):
    result = subprocess.run(
        [sys.executable, "-m", "moshi_tools.selftest"],
        env=tools_env(request.getfixturevalue(moshi_copy)) | SERVER_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == rc
    assert line in result.stdout + result.stderr
