"""The ``/test-voice`` page in a real browser: Debian's chromium, headless, with a fake microphone fed
from a WAV file made here, driven over the DevTools protocol (aiohttp's websocket client), against a
real bridge process, the real engine (``asr`` + ``tts`` on tiny random models) and an HTTP MAS stand-in.

One session of the page, in order: a typed turn (its reply spoken: the page's Ogg demuxer and
WebCodecs decoder play it), then agent voice (the page's WebCodecs encoder and Ogg writer stream the
fake microphone: the STT's words come back as transcript events, the turn reaches the MAS stand-in,
its reply is played), then barge-in (the page unmutes while the reply plays: ``tts_interrupted``, the
playback stops at once). A screenshot is saved; any JavaScript error fails the test. Then: the page
asks for the token a bridge needs and shows every error event readably (``tts_skipped``, ``error``,
``degraded`` from a stand-in STT that hangs up, ``voice_unavailable``, a refused script); duplex voice
with the real Moshi (tiny model) in both directions; the route's content types.

Turn-taking is made deterministic with settings (see test_agent.py): ``BRIDGE_ASR_PAUSE_THRESHOLD=0``
and ``BRIDGE_ASR_BARGE_IN_THRESHOLD=1``. The page's "mute" box (silence instead of the microphone,
the stream stays continuous) ends the user's turn and starts the barge-in.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
from aiohttp import web

from conftest import REPO, MasStandIn, VoiceEngine, base_settings, free_port, stop_process

ENSURE_CHROMIUM = REPO / "scripts" / "ensure-chromium.sh"


# --- chromium ---


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium: installed by scripts/ensure-chromium.sh when missing; skipped only if that fails."""
    found = shutil.which("chromium")
    if found is None:
        result = subprocess.run(
            [str(ENSURE_CHROMIUM)], capture_output=True, text=True, timeout=600, check=False
        )
        found = shutil.which("chromium")
        if found is None:
            pytest.skip(
                f"chromium cannot be installed here: {(result.stdout + result.stderr).strip()[-300:]}"
            )
    return found


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seconds of a voice-like signal (looped by chromium): a gliding 110-180 Hz buzz with
    harmonics, in syllables of 240 ms. Made here, 48 kHz 16-bit mono."""
    rate = 48_000
    t = np.arange(2 * rate) / rate
    pitch = 145 + 35 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    buzz = sum(np.sin(k * phase) / k for k in range(1, 7))
    syllable = 0.25 + 0.75 * np.clip(np.sin(2 * np.pi * t / 0.24), 0, None) ** 0.5
    pcm = (0.22 * syllable * buzz / np.max(np.abs(buzz)) * 32767).astype("<i2")
    path = tmp_path_factory.mktemp("fake-mic") / "speech.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


class Page:
    """One chromium tab over the DevTools protocol; records every JavaScript error it reports."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http = http
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.js_errors: list[str] = []
        self.console: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                self.js_errors.append(f"exception: {text}")
            elif method == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
                self.console.append(f"{params['type']}: {args}")
                if params["type"] in ("error", "assert"):
                    self.js_errors.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded":
                entry = params["entry"]
                if entry["level"] == "error":
                    self.js_errors.append(
                        f"log ({entry.get('source')}): {entry['text']} {entry.get('url', '')}"
                    )

    async def call(self, method: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def js(self, expression: str, *, gesture: bool = False) -> Any:
        """The value of ``expression`` in the page (promises awaited); a user gesture if asked."""
        result = await self.call(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
            userGesture=gesture,
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float, what: str) -> Any:
        """Poll ``expression`` until it is truthy; fails with the page's counters and errors."""
        deadline = time.monotonic() + timeout
        guarded = (
            f"(() => {{ try {{ return ({expression}); }} catch {{ return false; }} }})()"  # mid-navigation
        )
        while True:
            value = await self.js(guarded)
            if value:
                return value
            if time.monotonic() > deadline:
                state = await self.js("JSON.stringify(window.voiceTest ?? null)")
                raise AssertionError(
                    f"{what}: not within {timeout} s; page: {state}; js errors: {self.js_errors}"
                )
            await asyncio.sleep(0.1)

    async def text(self, element_id: str) -> str:
        return str(await self.js(f"document.getElementById({element_id!r}).textContent"))

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def open_chromium(binary: str, wav: Path, log: Path) -> AsyncIterator[Page]:
    port = free_port()
    profile = log.parent / "chromium-profile"  # left to pytest's tmp cleanup (chromium's helpers write late)
    with log.open("ab") as log_file:
        cmd = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage",  # containers often have a small /dev/shm
            f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
            "--remote-debugging-address=127.0.0.1",
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
            "--window-size=1280,1500", "about:blank",
        ]  # fmt: skip
        # Its own process group, so that its helper processes (renderer, zygote) go with it.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        http = aiohttp.ClientSession()
        page: Page | None = None
        try:
            deadline = time.monotonic() + 30
            targets: list[dict[str, Any]] = []
            while not targets:
                if proc.poll() is not None:
                    raise RuntimeError(f"chromium exited with {proc.returncode}: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chromium's DevTools did not answer: {log.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(
                        f"http://127.0.0.1:{port}/json/list", timeout=aiohttp.ClientTimeout(2)
                    ) as r:
                        targets = [t for t in await r.json() if t.get("type") == "page"]
                if not targets:
                    await asyncio.sleep(0.2)
            ws = await http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
            page = Page(http, ws)
            for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                await page.call(domain)
            yield page
        finally:
            if page is not None:
                page._reader.cancel()
                await asyncio.gather(page._reader, return_exceptions=True)
            await http.close()
            stop_process(proc, grace_s=3.0)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


# --- the MAS stand-in and the bridge process ---


class PageMas(MasStandIn):
    """The conftest stand-in, with tool calls and memory, and a long reply for spoken turns (so that
    there is time to barge in)."""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        text = f"echo: {body['text']}"
        if body.get("source") == "voice":
            text += " " + " ".join(f"word{i}" for i in range(60))
        return web.json_response(
            {
                "response": text,
                "tool_calls": [{"name": "lookup", "args": {"q": body["text"][:40]}}],
                "agent_activity": [{"agent": "planner", "step": "answer", "source": body["source"]}],
                "memory": [{"kind": "note", "turn": len(self.requests), "source": body["source"]}],
                "model": "mas-test",
            }
        )


@pytest.fixture
async def page_mas() -> AsyncIterator[PageMas]:
    stand_in = PageMas()
    app = web.Application()
    app.router.add_post("/api/chat", stand_in.chat)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stand_in.port = runner.addresses[0][1]
    try:
        yield stand_in
    finally:
        await runner.cleanup()


def agent_env(mas: MasStandIn, engine: VoiceEngine) -> dict[str, str]:
    """Agent voice on the engine, turn-taking made deterministic (see the module docstring)."""
    return {
        "BRIDGE_MAS_URL": mas.url,
        "BRIDGE_ASR_URL": engine.asr_url,
        "BRIDGE_ASR_KEY": engine.key,
        "BRIDGE_TTS_URL": engine.tts_url,
        "BRIDGE_TTS_KEY": engine.key,
        "BRIDGE_TTS_VOICE": engine.voice,
        "BRIDGE_TTS_TIMEOUT_S": "10",
        "BRIDGE_ASR_TIMEOUT_S": "10",
        "BRIDGE_ASR_PAUSE_THRESHOLD": "0",
        "BRIDGE_ASR_BARGE_IN_THRESHOLD": "1",
        "BRIDGE_ASR_MIN_SILENCE_S": "0.3",
        "BRIDGE_ASR_FLUSH_S": "0.5",
    }


@pytest.fixture
def bridge_process(tmp_path: Path) -> Iterator[Any]:
    """``start(env)``: a real ``personaplex-bridge`` process; returns its base URL. Its own origin is
    allowed (the page is served by it). All are stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(extra: dict[str, str]) -> str:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(BRIDGE_HOST="127.0.0.1", BRIDGE_PORT=str(port), BRIDGE_ALLOWED_ORIGINS=base,
                   BRIDGE_PROBE_INTERVAL_S="1")  # fmt: skip
        env.update(extra)
        log = tmp_path / f"bridge{len(started)}.log"
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "personaplex_bridge"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the bridge exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return base
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the bridge did not listen: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    try:
        yield start
    finally:
        for proc in started:
            stop_process(proc)


async def save_screenshot(page: Page, png: Path) -> None:
    """The page as it is now, to ``png`` and, with ``VOICE_SCREENSHOT_DIR`` set, there too."""
    await page.screenshot(png)
    extra = os.environ.get("VOICE_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, Path(extra) / png.name)


# --- the test ---


async def test_page_streams_both_ways_and_stops_on_barge_in(
    chromium, speech_wav, bridge_process, page_mas, engine, tmp_path
):
    bridge_url = bridge_process(agent_env(page_mas, engine))
    async with open_chromium(chromium, speech_wav, tmp_path / "chromium.log") as page:
        await page.call("Page.navigate", url=f"{bridge_url}/test-voice")
        await page.until("window.voiceTest && window.voiceTest.connected", 15, "the page connects")
        await page.until("document.getElementById('st-asr').textContent === 'up'", 5, "STT shown up")
        assert await page.text("st-tts") == "up"
        assert await page.text("st-mas") in ("up", "unknown")  # no MAS call yet, no health URL
        await page.until(
            "document.getElementById('sessions').textContent.includes('open')", 5, "/status shown"
        )

        # 1. A typed turn: the reply text and panels, and its audio decoded and played.
        await page.js(
            "document.getElementById('text').value = 'hello from the page';"
            "document.getElementById('send').click()",
            gesture=True,
        )
        await page.until("voiceTest.masResponses >= 1", 10, "the typed turn's answer")
        assert page_mas.requests[0]["text"] == "hello from the page"
        assert page_mas.requests[0]["source"] == "text"
        assert "echo: hello from the page" in await page.text("replies")
        assert "lookup" in await page.text("tool-calls")
        await page.until("document.getElementById('st-mas').textContent === 'up'", 5, "MAS shown up")
        await page.until("voiceTest.events.includes('tts_done')", 30, "the typed reply is spoken")
        await page.until(
            "voiceTest.audioFramesDecoded > 0 && voiceTest.samplesPlayed > 0", 10, "reply played"
        )
        await page.until("!voiceTest.playing", 30, "the typed reply finishes playing")
        assert await page.js("voiceTest.lastDelayMs") is not None

        typed_underruns = await page.js("voiceTest.underruns")
        await page.js("voiceTest.lastDelayMs = null")

        # 2. Agent voice: the fake microphone, encoded by the page, reaches the STT.
        await page.js("document.getElementById('agent-start').click()", gesture=True)
        await page.until("voiceTest.voice === 'agent'", 10, "voice_ready")
        await page.until("voiceTest.transcriptEvents >= 2", 15, "the STT's words shown on the page")
        frames_at_words = await page.js("voiceTest.framesSent")
        assert frames_at_words > 2
        assert (await page.text("live")).strip() not in ("", "…")
        # The user stops talking (the page sends silence): the turn ends and reaches MAS.
        await page.js("voiceTest.setMuted(true)")
        await page.until(
            "voiceTest.events.filter((t) => t === 'mas_response').length >= 2", 15, "spoken turn answered"
        )
        played_before = await page.js("voiceTest.samplesPlayed")  # the typed reply is long over
        spoken = [r for r in page_mas.requests if r["source"] == "voice"]
        assert len(spoken) == 1, page_mas.requests
        assert spoken[0]["text"]
        assert spoken[0]["text"] in await page.text("turns")
        assert f'"q": "{spoken[0]["text"][:40]}"' in await page.text("tool-calls")
        memory = await page.text("memory")
        assert '"source": "voice"' in memory
        assert '"turn": 2' in memory
        assert '"source": "voice"' in await page.text("agent-activity")
        # The spoken reply plays (the stand-in's long answer: seconds of audio).
        await page.until(f"voiceTest.samplesPlayed > {played_before} + 4800", 30, "the spoken reply plays")
        delay_ms = await page.js("voiceTest.lastDelayMs")
        assert delay_ms is not None
        assert 0 < delay_ms < 20_000
        assert (await page.text("delay")).endswith(" ms")
        await page.until("voiceTest.playing", 5, "the spoken reply is still playing")

        # 3. Barge-in: the user speaks again while the reply plays; the playback stops at once.
        await page.js("voiceTest.setMuted(false)")
        await page.until("voiceTest.interrupted >= 1", 10, "tts_interrupted")
        assert not await page.js("voiceTest.playing")
        assert await page.js("voiceTest.stoppedSources") >= 1
        played_at_stop = await page.js("voiceTest.samplesPlayed")
        frames_at_stop = await page.js("voiceTest.replyFrames")
        await asyncio.sleep(0.6)
        assert await page.js("voiceTest.samplesPlayed") == played_at_stop, "audio played after the barge-in"
        assert await page.js("voiceTest.replyFrames") == frames_at_stop, "reply audio after tts_interrupted"
        assert "stopped (barge_in)" in await page.text("playback")

        await save_screenshot(page, tmp_path / "test-voice.png")
        print(f"delay {delay_ms} ms, underruns: typed reply {typed_underruns}, in all "
              f"{await page.js('voiceTest.underruns')}")  # fmt: skip

        await page.js("voiceTest.setMuted(true); document.getElementById('voice-stop').click()", gesture=True)
        await page.until("voiceTest.events.includes('voice_stopped')", 10, "voice_stopped")
        assert await page.js("voiceTest.framesSent") > frames_at_words

        errors = await page.js("voiceTest.errors")
        assert errors == [], errors
        assert await page.js("voiceTest.jsErrors") == 0
        assert page.js_errors == [], page.js_errors


class LosingStt:
    """Speaks just enough of Kyutai's STT protocol: ``Ready``, then it reads a little audio and hangs up
    (a lost STT mid-session, for the page's ``degraded`` error)."""

    def __init__(self) -> None:
        self.audio_messages = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/asr-streaming"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(msgpack.packb({"type": "Ready"}))
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY and msgpack.unpackb(msg.data).get("type") == "Audio":
                self.audio_messages += 1
                if self.audio_messages >= 5:
                    break
        await ws.close()
        return ws


@pytest.fixture
async def losing_stt() -> AsyncIterator[LosingStt]:
    stand_in = LosingStt()
    app = web.Application()
    app.router.add_get("/api/asr-streaming", stand_in.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stand_in.port = runner.addresses[0][1]
    try:
        yield stand_in
    finally:
        await runner.cleanup()


async def test_page_asks_for_the_token_and_shows_every_error(
    chromium, speech_wav, bridge_process, page_mas, losing_stt, tmp_path
):
    bridge_url = bridge_process(
        {
            "BRIDGE_MAS_URL": page_mas.url,
            "BRIDGE_TOKEN": "s3cret",
            "BRIDGE_ASR_URL": losing_stt.url,
            "BRIDGE_MAX_TEXT_CHARS": "30",
        }
    )
    async with open_chromium(chromium, speech_wav, tmp_path / "chromium.log") as page:
        await page.call("Page.navigate", url=f"{bridge_url}/test-voice")
        # The bridge needs a token: the page asks for it instead of connecting.
        await page.until("document.getElementById('connection').textContent.includes('token')", 10, "asked")
        assert not await page.js("document.getElementById('token-row').hidden")
        assert not await page.js("voiceTest.connected")
        await page.js(
            "document.getElementById('token').value = 's3cret'; document.getElementById('connect').click()",
            gesture=True,
        )
        await page.until("voiceTest.connected", 10, "the page connects with the token")
        assert await page.text("st-tts") == "off"

        async def shown(needle: str) -> None:
            await page.until(f"voiceTest.errors.some((e) => e.includes({needle!r}))", 10, f"error {needle!r}")
            assert needle in await page.text("errors")

        # tts_skipped: no TTS configured, the text comes anyway.
        await page.js("document.getElementById('text').value = 'hi'; document.getElementById('send').click()")
        await shown("reply not spoken (off)")
        assert "echo: hi" in await page.text("replies")
        # error: a turn over BRIDGE_MAX_TEXT_CHARS.
        await page.js(
            "document.getElementById('text').value = 'x'.repeat(40); document.getElementById('send').click()"
        )
        await shown("error bad_message")
        # degraded: the STT hangs up mid-session; the page ends its microphone stream.
        await page.js("document.getElementById('agent-start').click()", gesture=True)
        await shown("asr lost (backend_lost)")
        await page.until("voiceTest.voice === null", 5, "voice off after degraded")
        assert losing_stt.audio_messages >= 5, "the page's audio reached the stand-in STT"
        # voice_unavailable: no Moshi for duplex.
        await page.js("document.getElementById('duplex-start').click()", gesture=True)
        await shown("voice unavailable (no_backend)")

        await page.screenshot(tmp_path / "errors.png")
        assert await page.js("voiceTest.jsErrors") == 0
        assert page.js_errors == [], page.js_errors

        # A bridge that does not allow its own origin refuses the page's script: the page says why.
        refusing = bridge_process({"BRIDGE_MAS_URL": page_mas.url, "BRIDGE_ALLOWED_ORIGINS": ""})
        await page.call("Page.navigate", url=f"{refusing}/test-voice")
        await page.until("!document.getElementById('script-error').hidden", 10, "the script error shown")
        assert "BRIDGE_ALLOWED_ORIGINS" in await page.text("script-error")
        assert all("403" in e for e in page.js_errors), page.js_errors


async def test_page_and_scripts_are_served_with_their_types(start_bridge, mas):
    rb = await start_bridge(base_settings(mas.url))
    async with rb.http.get(rb.base + "/test-voice") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
    assert '<meta name="bridge-token-required" content="false">' in html
    assert '<script type="module" src="/test-voice/page.js"' in html
    for name in ("page.js", "mic.js", "player.js", "ogg.js", "capture-worklet.js"):
        async with rb.http.get(f"{rb.base}/test-voice/{name}") as resp:
            assert resp.status == 200, name
            assert resp.content_type == "text/javascript", name
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    for missing in ("nope.js", "test-voice.html", "..%2fapp.py", "%2e%2e%2f__init__.py"):
        async with rb.http.get(f"{rb.base}/test-voice/{missing}") as resp:
            assert resp.status == 404, missing
    # A foreign origin is refused here too (the Origin check covers every route).
    async with rb.http.get(
        rb.base + "/test-voice/page.js", headers={"Origin": "http://evil.example"}
    ) as resp:
        assert resp.status == 403
    rb = await start_bridge(base_settings(mas.url, token="s3cret"))
    async with rb.http.get(rb.base + "/test-voice") as resp:
        assert '<meta name="bridge-token-required" content="true">' in await resp.text()


async def test_page_duplex_voice_with_moshi(chromium, speech_wav, bridge_process, page_mas, moshi, tmp_path):
    bridge_url = bridge_process({"BRIDGE_MAS_URL": page_mas.url, "BRIDGE_MOSHI_URLS": moshi.url})
    async with open_chromium(chromium, speech_wav, tmp_path / "chromium.log") as page:
        await page.call("Page.navigate", url=f"{bridge_url}/test-voice")
        await page.until("voiceTest.connected", 15, "the page connects")
        await page.until("document.getElementById('st-moshi').textContent === 'up'", 10, "Moshi shown up")
        await page.js("document.getElementById('duplex-start').click()", gesture=True)
        await page.until("voiceTest.voice === 'duplex'", 15, "voice_ready (duplex)")
        # Moshi decodes the page's Ogg/Opus and answers with its own: decoded and played.
        answered = "voiceTest.audioFramesDecoded >= 5 && voiceTest.samplesPlayed > 0"
        await page.until(answered, 30, "Moshi answers")
        assert await page.js("voiceTest.framesSent") >= 5
        await page.js("document.getElementById('voice-stop').click()", gesture=True)
        await page.until("voiceTest.events.includes('voice_stopped')", 10, "voice_stopped")
        assert page_mas.requests == [], "duplex posts nothing to MAS"
        assert await page.js("voiceTest.errors") == []
        assert await page.js("voiceTest.jsErrors") == 0
        assert page.js_errors == [], page.js_errors
