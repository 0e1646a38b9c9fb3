"""Shared fixtures: tiny model sets (made once per test run) and real engine processes.

``engine_process(modules)`` starts ``python -m voice_engine serve`` on a free port with a configuration
made from ``modules`` (the ``modules`` object of the engine's JSON config) and waits for ``/healthz``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EngineProcess:
    proc: subprocess.Popen[str]
    port: int
    config_path: Path
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.http + "/status", timeout=5) as r:
            return json.loads(r.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_engine(
    tmp: Path, modules: dict[str, Any], extra: dict[str, Any] | None = None, ready_timeout_s: float = 120.0
) -> EngineProcess:
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "api_keys": ["public_token"],
        "cpu_threads": 1,
        "modules": modules,
        **(extra or {}),
    }
    tmp.mkdir(parents=True, exist_ok=True)
    config_path = tmp / f"engine-{port}.json"
    config_path.write_text(json.dumps(config))
    log_path = tmp / f"engine-{port}.log"
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voice_engine", "serve", "--config", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    engine = EngineProcess(proc, port, config_path, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited with {proc.returncode}:\n{engine.log()}")
        try:
            with urllib.request.urlopen(engine.http + "/healthz", timeout=2):
                return engine
        except OSError:
            time.sleep(0.2)
    engine.stop()
    raise RuntimeError(f"engine not healthy within {ready_timeout_s} s:\n{engine.log()}")


@pytest.fixture
def engine_process(tmp_path: Path) -> Iterator[Callable[..., EngineProcess]]:
    started: list[EngineProcess] = []

    def _start(modules: dict[str, Any], **kw: Any) -> EngineProcess:
        engine = start_engine(tmp_path, modules, **kw)
        started.append(engine)
        return engine

    yield _start
    for engine in started:
        engine.stop()


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")
