"""Fixtures: a real Moshi server (tiny random model), the real voice engine (``asr`` + ``tts`` on tiny
random models), an HTTP MAS stand-in, a Kyutai-protocol TTS stand-in, the bridge itself, and websocket
clients. Nothing here mocks Moshi or the engine."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web

from personaplex_bridge.app import Bridge
from personaplex_bridge.config import Settings

REPO = Path(__file__).resolve().parents[2]
MOSHI_TOOLS = REPO / "roles" / "moshi_server" / "files"
if str(MOSHI_TOOLS) not in sys.path:
    sys.path.insert(0, str(MOSHI_TOOLS))

from moshi_tools.probe import opus_frames  # noqa: E402


def _engine_conftest() -> Any:
    """engine/tests/conftest.py, for its ``start_engine`` (imported by path: both files are "conftest")."""
    name = "engine_tests_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "engine" / "tests" / "conftest.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always reaps."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- Moshi ---


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-moshi")
    env = {**os.environ, "PYTHONPATH": str(MOSHI_TOOLS)}
    subprocess.run(
        [sys.executable, "-m", "moshi_tools.tiny_model", "--out", str(out)],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    return out


@dataclass
class MoshiServer:
    model_dir: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat"

    def start(self, timeout_s: float = 60.0) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(MOSHI_TOOLS),
            "NO_TORCH_COMPILE": "1",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "moshi_tools.launch", "--model-dir", str(self.model_dir)]
        cmd += ["--device", "cpu", "--static", "none", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moshi exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/chat", timeout=1)
            except urllib.error.HTTPError as exc:
                if exc.code == 400:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("moshi did not come up")

    def kill(self) -> None:
        """Die abruptly, as a crashed server would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=2.0)


@pytest.fixture(scope="module")
def moshi(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MoshiServer]:
    """A Moshi server shared by a test module."""
    server = MoshiServer(model_dir, tmp_path_factory.mktemp("moshi-log") / "moshi.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def moshi_own(model_dir: Path, tmp_path: Path) -> Iterator[MoshiServer]:
    """A Moshi server for one test (which may kill it)."""
    server = MoshiServer(model_dir, tmp_path / "moshi.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def frames() -> list[bytes]:
    """80 ms Ogg/Opus chunks, each already prefixed with the 0x01 kind byte."""
    return [b"\x01" + chunk for chunk in opus_frames(40) if chunk]


# --- the voice engine (asr + tts) ---

ENGINE_KEY = "public_token"
ASR_SLOTS = 2


@pytest.fixture(scope="session")
def engine_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random STT and TTS model sets, made by the engine's own generator."""
    root = tmp_path_factory.mktemp("tiny-engine")
    out = {}
    for kind in ("stt", "tts"):
        subprocess.run(
            [sys.executable, "-m", "voice_engine", "tiny-model", "--kind", kind, "--out", str(root / kind)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        out[kind] = root / kind
    return out


@dataclass
class VoiceEngine:
    """A real ``voice-engine serve`` process with the modules ``asr`` and ``tts``."""

    process: Any  # engine/tests/conftest.py's EngineProcess
    key: str = ENGINE_KEY
    voice: str = "tiny-a.wav"
    asr_slots: int = ASR_SLOTS

    @property
    def asr_url(self) -> str:
        return f"{self.process.ws}/api/asr-streaming"

    @property
    def tts_url(self) -> str:
        return f"{self.process.ws}/api/tts_streaming"

    async def hold_asr_slot(self) -> Any:
        """Take one STT slot directly (as another client would); ``await held.close()`` gives it back."""
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(self.asr_url, headers={"kyutai-api-key": self.key})
        first = await ws.receive(timeout=10)
        assert msgpack.unpackb(first.data)["type"] == "Ready"

        class Held:
            async def close(self) -> None:
                await ws.close()
                await http.close()

        return Held()

    def kill(self) -> None:
        """Die abruptly, as a crashed engine would."""
        proc = self.process.proc
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        self.process.stop()


def _start_voice_engine(tmp: Path, models: dict[str, Path]) -> VoiceEngine:
    tts_dir = models["tts"]
    modules = {
        "asr": {"kind": "asr", "model_dir": str(models["stt"]), "slots": ASR_SLOTS, "precision": "fp32",
                "device": "cpu"},
        "tts": {"kind": "tts", "model_dir": str(tts_dir), "slots": 2, "precision": "fp32", "device": "cpu",
                "voices_dir": str(tts_dir / "voices")},
    }  # fmt: skip
    return VoiceEngine(_engine_conftest().start_engine(tmp, modules, extra={"api_keys": [ENGINE_KEY]}))


@pytest.fixture(scope="module")
def engine(engine_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VoiceEngine]:
    """A voice engine shared by a test module."""
    running = _start_voice_engine(tmp_path_factory.mktemp("engine"), engine_models)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def engine_own(engine_models: dict[str, Path], tmp_path: Path) -> Iterator[VoiceEngine]:
    """A voice engine for one test (which may kill it)."""
    running = _start_voice_engine(tmp_path, engine_models)
    try:
        yield running
    finally:
        running.stop()


# --- the voice engine with a chat module (PersonaPlex-shaped tiny set) besides asr and tts ---

CHAT_SLOTS = 2


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny PersonaPlex-shaped set (voices TINYF0/TINYM0 .wav and .pt), by the engine's generator."""
    out = tmp_path_factory.mktemp("tiny-chat") / "personaplex"
    subprocess.run(
        [sys.executable, "-m", "voice_engine", "tiny-model", "--kind", "personaplex", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@dataclass
class ChatEngine(VoiceEngine):
    """A real ``voice-engine serve`` with ``asr``, ``tts`` and ``chat`` (PersonaPlex flavor)."""

    chat_slots: int = CHAT_SLOTS

    @property
    def chat_url(self) -> str:
        return f"{self.process.ws}/api/chat?auth_id={self.key}"

    def chat_status(self) -> dict[str, Any]:
        return dict(self.process.status()["modules"]["chat"])

    async def hold_chat_slot(self) -> Any:
        """Take one chat slot directly (as another client would); ``await held.close()`` gives it back."""
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(self.chat_url)
        first = await ws.receive(timeout=30)
        assert first.data == b"\x00", first

        class Held:
            async def close(self) -> None:
                await ws.close()
                await http.close()

        return Held()


def _start_chat_engine(tmp: Path, models: dict[str, Path], chat_dir: Path, **chat_options: Any) -> ChatEngine:
    tts_dir = models["tts"]
    modules = {
        "asr": {"kind": "asr", "model_dir": str(models["stt"]), "slots": ASR_SLOTS, "precision": "fp32",
                "device": "cpu"},
        "tts": {"kind": "tts", "model_dir": str(tts_dir), "slots": 2, "precision": "fp32", "device": "cpu",
                "voices_dir": str(tts_dir / "voices")},
        "chat": {"kind": "chat", "model_dir": str(chat_dir), "slots": CHAT_SLOTS, "precision": "fp32",
                 "device": "cpu", "voices_dir": str(chat_dir / "voices"), "options": chat_options},
    }  # fmt: skip
    process = _engine_conftest().start_engine(tmp, modules, extra={"api_keys": [ENGINE_KEY]})
    return ChatEngine(process)


@pytest.fixture
def chat_only_engine(chat_model: Path, tmp_path: Path) -> Iterator[ChatEngine]:
    """An engine with only the chat module, for one test (which may kill it)."""
    chat = {"kind": "chat", "model_dir": str(chat_model), "slots": CHAT_SLOTS, "precision": "fp32",
            "device": "cpu", "voices_dir": str(chat_model / "voices")}  # fmt: skip
    process = _engine_conftest().start_engine(tmp_path, {"chat": chat}, extra={"api_keys": [ENGINE_KEY]})
    running = ChatEngine(process)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def chat_engine(
    engine_models: dict[str, Path], chat_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChatEngine]:
    """An engine with asr, tts and chat, shared by a test module."""
    running = _start_chat_engine(tmp_path_factory.mktemp("chat-engine"), engine_models, chat_model)
    try:
        yield running
    finally:
        running.stop()


# --- MAS stand-in ---


@dataclass
class MasStandIn:
    """A real HTTP server standing in for the MAS orchestrator. Tests set ``mode``."""

    mode: str = "ok"
    delay_s: float = 0.0
    health_status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/chat"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.mode == "500":
                return web.Response(status=500, text="internal error")
            if self.mode == "404":
                return web.Response(status=404, text="no such route")
            if self.mode == "garbage":
                return web.Response(text="<html>not json</html>", content_type="text/html")
            if self.mode == "list":
                return web.json_response(["response", "x"])
            if self.mode == "no_response":
                return web.json_response({"answer": "x"})
            if self.mode == "empty":
                return web.json_response({"response": ""})
            if self.mode == "long":
                words = " ".join(f"word{i}" for i in range(60))
                return web.json_response({"response": f"echo: {body['text']} {words}"})
            if self.mode == "minimal":
                return web.json_response({"response": f"echo: {body['text']}"})
            return web.json_response(
                {
                    "response": f"echo: {body['text']}",
                    "tool_calls": [{"name": "lookup", "args": {"q": body["text"]}}],
                    "agent_activity": [{"agent": "planner", "session": body["session_id"]}],
                    "memory": [{"kind": "note", "source": body["source"]}],
                    "model": "mas-test",
                    "latency_ms": 3,
                }
            )
        finally:
            self.in_flight -= 1

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status, text="health")


@pytest.fixture
async def mas() -> AsyncIterator[MasStandIn]:
    stand_in = MasStandIn()
    app = web.Application()
    app.router.add_post("/api/chat", stand_in.chat)
    app.router.add_get("/health", stand_in.health)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stand_in.port = runner.addresses[0][1]
    stand_in.runner = runner
    try:
        yield stand_in
    finally:
        await runner.cleanup()


# --- TTS stand-in (Kyutai's streaming TTS protocol) ---


@dataclass
class TtsStandIn:
    """Speaks moshi-server's /api/tts_streaming protocol. Tests set ``mode`` and ``data_as``."""

    key: str = "tts-secret"
    mode: str = "ok"
    data_as: str = "mixed"  # "bytes", "ints" or "mixed"
    pages: list[bytes] = field(default_factory=list)
    queries: list[dict[str, str]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/tts_streaming"

    def _audio(self, i: int, page: bytes) -> bytes:
        as_ints = self.data_as == "ints" or (self.data_as == "mixed" and i % 2 == 1)
        data: Any = list(page) if as_ints else page
        return msgpack.packb({"type": "OggOpus", "data": data}, use_bin_type=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("kyutai-api-key") != self.key:
            return web.Response(status=401, text="unauthorized")
        self.queries.append(dict(request.query))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        pack = msgpack.packb
        if self.mode == "capacity":
            await ws.send_bytes(pack({"type": "Error", "message": "no free channels"}))
            await ws.close()
            return ws
        await ws.send_bytes(pack({"type": "Ready"}))
        if self.mode == "slow":
            await asyncio.sleep(30)
            return ws
        while True:  # read Text messages until Eos
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                return ws
            obj = msgpack.unpackb(msg.data)
            self.received.append(obj)
            if obj["type"] == "Eos":
                break
        if self.mode == "flood":  # far more audio than a client socket buffers
            big = self._audio(0, b"\x00" * 60_000)
            for _ in range(400):
                await ws.send_bytes(big)
            await ws.close()
            return ws
        if self.mode == "garbage":
            await ws.send_bytes(b"\xc1 not msgpack")
            await asyncio.sleep(5)
            return ws
        for i, page in enumerate(self.pages):
            await ws.send_bytes(self._audio(i, page))
            if i == 1:
                word = {"type": "Text", "text": "echo", "start_s": 0.0, "stop_s": 0.16}
                await ws.send_bytes(pack(word))
            if self.mode == "error_midway" and i == 0:
                await ws.send_bytes(pack({"type": "Error", "message": "boom"}))
                await asyncio.sleep(5)
                return ws
        await ws.close()
        return ws


@pytest.fixture
async def tts() -> AsyncIterator[TtsStandIn]:
    chunks = [c for c in opus_frames(6) if c]
    stand_in = TtsStandIn(pages=chunks)
    app = web.Application()
    app.router.add_get("/api/tts_streaming", stand_in.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stand_in.port = runner.addresses[0][1]
    try:
        yield stand_in
    finally:
        await runner.cleanup()


# --- the bridge, in process ---


@dataclass
class RunningBridge:
    bridge: Bridge
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.bridge.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.bridge.port}/ws"

    async def connect(self, **kwargs: Any) -> Client:
        ws = await self.http.ws_connect(self.ws_url, **kwargs)
        client = Client(ws)
        client.ready = await client.expect("ready")
        return client

    async def status(self) -> dict[str, Any]:
        async with self.http.get(self.base + "/status") as resp:
            assert resp.status == 200
            return dict(await resp.json())

    async def metrics(self) -> str:
        async with self.http.get(self.base + "/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


def base_settings(mas_url: str, **overrides: Any) -> Settings:
    settings = Settings(
        mas_url=mas_url,
        host="127.0.0.1",
        port=0,
        mas_timeout_s=2.0,
        mas_backoff_s=0.3,
        mas_backoff_max_s=1.0,
        tts_timeout_s=1.0,
        probe_interval_s=0.3,
        probe_timeout_s=1.0,
        moshi_connect_timeout_s=5.0,
        drain_timeout_s=3.0,
    )
    return replace(settings, **overrides)


@pytest.fixture
async def start_bridge() -> AsyncIterator[Any]:
    """``await start_bridge(settings)`` starts a bridge in this event loop; all are closed at teardown."""
    running: list[RunningBridge] = []

    async def start(settings: Settings) -> RunningBridge:
        bridge = Bridge(settings)
        await bridge.start()
        rb = RunningBridge(bridge, aiohttp.ClientSession())
        running.append(rb)
        return rb

    try:
        yield start
    finally:
        for rb in running:
            await rb.http.close()
            await rb.bridge.drain()
            await rb.bridge.close()


# --- a websocket client of the bridge ---


class Client:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ready: dict[str, Any] = {}
        self.seen: list[dict[str, Any]] = []  # every JSON event, in order
        self.binary: list[bytes] = []  # every binary frame, in order

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(obj))

    async def next(self, timeout: float = 5.0) -> dict[str, Any] | bytes | None:
        """The next frame (dict for JSON, bytes for binary), or None once closed."""
        msg = await self.ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.TEXT:
            event = json.loads(msg.data)
            self.seen.append(event)
            return dict(event)
        if msg.type == aiohttp.WSMsgType.BINARY:
            self.binary.append(msg.data)
            return bytes(msg.data)
        return None

    async def expect(self, kind: str, timeout: float = 5.0, **where: Any) -> dict[str, Any]:
        """Read until a JSON event ``kind`` (with the fields in ``where``); fails on close or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {kind!r} event within {timeout} s; saw {[e['type'] for e in self.seen]}"
                )
            try:
                item = await self.next(left)
            except asyncio.TimeoutError:
                continue
            if item is None:
                raise AssertionError(
                    f"closed ({self.ws.close_code}) before a {kind!r} event; saw {self.seen}"
                )
            if (
                isinstance(item, dict)
                and item["type"] == kind
                and all(item.get(k) == v for k, v in where.items())
            ):
                return item

    async def drain_for(self, seconds: float) -> None:
        """Read whatever arrives during ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                if await self.next(left) is None:
                    return

    async def read_until(self, predicate: Any, timeout: float = 10.0) -> None:
        """Read frames until ``predicate()`` holds; fails on close or timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"condition not met within {timeout} s; saw {len(self.binary)} binary frames"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                if await self.next(left) is None:
                    raise AssertionError(f"closed ({self.ws.close_code}) before the condition held")

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["type"] == kind]

    async def close(self) -> None:
        await self.ws.close()
