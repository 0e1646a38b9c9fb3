"""The ``personaplex-bridge`` process: start-up with minimal config, bad config, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import Client, free_port, stop_process


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(extra)
    return env


def run_main(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "personaplex_bridge", *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({}, [], "BRIDGE_MAS_URL: is required"),
        ({"BRIDGE_MAS_URL": "mas:8001"}, [], "BRIDGE_MAS_URL: must be a http:// or https:// URL"),
        ({"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_PORT": "eighty"}, [], "BRIDGE_PORT: must be an integer"),
        (
            {"BRIDGE_MAS_URL": "http://m/c"},
            ["--port", "0"],
            "BRIDGE_PORT (--port): must be between 1 and 65535",
        ),
        (
            {"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_MOSHI_URLS": "http://x:8998"},
            [],
            "BRIDGE_MOSHI_URLS: must be",
        ),
        (
            {"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_MAS_TIMEOUT_S": "-1"},
            [],
            "BRIDGE_MAS_TIMEOUT_S: must be positive",
        ),
        (
            {"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_ALLOWED_ORIGINS": "evil"},
            [],
            "BRIDGE_ALLOWED_ORIGINS: each",
        ),
        ({"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_TOKEN": "a b"}, [], "BRIDGE_TOKEN: must not contain"),
        (
            {"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_LOG_LEVEL": "loud"},
            [],
            "BRIDGE_LOG_LEVEL: must be one of",
        ),
        (
            {"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_ASR_URL": "http://gpu01:8080/api/asr-streaming"},
            [],
            "BRIDGE_ASR_URL: must be a ws:// or wss:// URL",
        ),
        (
            {"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_ASR_PAUSE_THRESHOLD": "1.5"},
            [],
            "BRIDGE_ASR_PAUSE_THRESHOLD: must be between 0 and 1",
        ),
        (
            {"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_ASR_SILENCE_DBFS": "loud"},
            [],
            "BRIDGE_ASR_SILENCE_DBFS: must be a dBFS level",
        ),
        (
            {"BRIDGE_MAS_URL": "http://m/c", "BRIDGE_DUPLEX_MOSHI_TO_MAS": "maybe"},
            [],
            "BRIDGE_DUPLEX_MOSHI_TO_MAS: must be true or false",
        ),
        ({"BRIDGE_MAS_URL": "http://m/c"}, ["--nope"], "command line: unrecognized arguments: --nope"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(env, args, needle):
    result = run_main(clean_env(**env), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle.replace("must be positive", "must be a positive number") in lines[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_clear_line():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_main(
            clean_env(BRIDGE_MAS_URL="http://127.0.0.1:1/c", BRIDGE_HOST="127.0.0.1"), "--port", str(port)
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


class BridgeProcess:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "personaplex_bridge", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def wait_up(self, http: aiohttp.ClientSession, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                async with http.get(f"http://127.0.0.1:{self.port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("bridge did not come up")

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "bridge did not exit"
            await asyncio.sleep(0.05)
        return self.proc.returncode


@pytest.fixture
def bridge_process(tmp_path):
    started: list[BridgeProcess] = []

    def start(env: dict[str, str]) -> BridgeProcess:
        proc = BridgeProcess(env, free_port(), tmp_path / f"bridge{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_process(proc.proc)


async def test_minimal_config_serves_text_and_sigterm_drains_a_turn(mas, bridge_process):
    """Only BRIDGE_MAS_URL set: text works, Moshi is down, TTS off; SIGTERM lets the turn finish."""
    proc = bridge_process(clean_env(BRIDGE_MAS_URL=mas.url))
    async with aiohttp.ClientSession() as http:
        await proc.wait_up(http)
        client = Client(await http.ws_connect(f"ws://127.0.0.1:{proc.port}/ws"))
        ready = await client.expect("ready")
        assert (ready["moshi"], ready["mas"], ready["tts"]) == ("down", "unknown", "off")
        await client.send({"type": "text", "text": "quick one"})
        assert (await client.expect("mas_response"))["text"] == "echo: quick one"
        await client.expect("tts_skipped")

        mas.delay_s = 1.5
        await client.send({"type": "text", "text": "slow one"})
        await asyncio.sleep(0.3)  # the turn is at MAS now
        assert mas.in_flight == 1
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # New connections are refused while draining...
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(f"http://127.0.0.1:{proc.port}/healthz")
        # ...new turns on the open session are refused...
        await client.send({"type": "text", "text": "one more"})
        assert (await client.expect("error"))["code"] == "draining"
        # ...and the turn in flight still completes, then the session closes with 1001.
        reply = await client.expect("mas_response", timeout=5)
        assert reply["text"] == "echo: slow one"
        assert (await client.expect("tts_skipped"))["reason"] == "off"
        assert await client.next(timeout=5) is None
        assert client.ws.close_code == 1001
        assert await proc.wait_exit(10) == 0
    log = proc.log.read_text()
    assert "draining: 1 session(s)" in log
    assert "Traceback" not in log
    assert "quick one" not in log
    assert "slow one" not in log


async def test_drain_timeout_closes_busy_sessions_and_exits_0(mas, bridge_process):
    mas.delay_s = 30
    env = clean_env(BRIDGE_MAS_URL=mas.url, BRIDGE_DRAIN_TIMEOUT_S="2", BRIDGE_MAS_TIMEOUT_S="60")
    proc = bridge_process(env)
    async with aiohttp.ClientSession() as http:
        await proc.wait_up(http)
        busy = Client(await http.ws_connect(f"ws://127.0.0.1:{proc.port}/ws"))
        await busy.expect("ready")
        idle = Client(await http.ws_connect(f"ws://127.0.0.1:{proc.port}/ws"))
        await idle.expect("ready")
        await busy.send({"type": "text", "text": "never answered in time"})
        await asyncio.sleep(0.3)
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        # The idle session is closed at once; the busy one at the drain timeout.
        assert await idle.next(timeout=5) is None
        assert idle.ws.close_code == 1001
        assert time.monotonic() - started < 1.5
        assert await busy.next(timeout=5) is None
        assert busy.ws.close_code == 1001
        assert 1.9 < time.monotonic() - started < 5
        assert await proc.wait_exit(10) == 0


def test_benchmark_command_prints_its_table():
    """The benchmark is a command, not a test; this only checks it still runs and reports."""
    args = ["--sessions", "2", "--seconds", "0.5", "--warmup", "0.2", "--rounds", "1", "--idle-sessions", "5"]
    result = subprocess.run(
        [sys.executable, "-m", "personaplex_bridge.bench", *args],
        env=clean_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for row in (
        "round trip p50",
        "round trip p99",
        "bridge CPU per session-second",
        "bridge memory per idle session",
    ):
        assert f"| {row}" in out
    assert "target p99 added <= 1 ms" in out


def run_ready_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "personaplex_bridge.ready_check", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_ready_check_reads_the_token_from_the_env_file(mas, bridge_process, tmp_path):
    """The redeploy health gate's protocol check, against a real bridge that requires a token."""
    proc = bridge_process(clean_env(BRIDGE_MAS_URL=mas.url, BRIDGE_TOKEN="s3cret"))
    async with aiohttp.ClientSession() as http:
        await proc.wait_up(http)
    url = f"ws://127.0.0.1:{proc.port}/ws"
    good = tmp_path / "good.env"
    good.write_text("# the service's env file\nBRIDGE_MAS_URL=http://x/c\nBRIDGE_TOKEN=s3cret\n")
    wrong = tmp_path / "wrong.env"
    wrong.write_text("BRIDGE_TOKEN=nope\n")

    ok = await asyncio.to_thread(run_ready_check, str(good), url)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["type"] == "ready"
    assert "s3cret" not in ok.stdout + ok.stderr

    refused = await asyncio.to_thread(run_ready_check, str(wrong), url)
    assert refused.returncode == 1
    assert "no ready event" in refused.stderr
    assert "Traceback" not in refused.stderr

    down = await asyncio.to_thread(run_ready_check, str(good), f"ws://127.0.0.1:{free_port()}/ws")
    assert down.returncode == 1
    assert "no ready event" in down.stderr

    usage = await asyncio.to_thread(run_ready_check, str(good))
    assert usage.returncode == 2
    assert "usage:" in usage.stderr
