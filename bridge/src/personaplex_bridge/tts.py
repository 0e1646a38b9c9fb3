"""Client of Kyutai's streaming TTS protocol (moshi-server's ``/api/tts_streaming``).

Connect to ``BRIDGE_TTS_URL?format=OggOpusMessagePack&voice=VOICE`` with the ``kyutai-api-key``
header. Every websocket message is a binary MessagePack map with a ``type``:

* client to server: ``{"type":"Text","text":...}`` (any number), then ``{"type":"Eos"}``;
* server to client: ``Ready`` first, then ``OggOpus`` pages (the Ogg header first, then one page per
  80 ms frame) interleaved with ``Text`` words carrying ``start_s``/``stop_s``; ``Error`` on
  failure (``"no free channels"`` at capacity). The server closes the socket when it is done.

``data`` of an ``OggOpus`` message is accepted both as MessagePack bytes and as an array of integers
(Kyutai's Rust server serialises ``Vec<u8>`` with rmp-serde, which writes an array).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import msgpack

from .aio import timeout, ws_close_timeout
from .config import Settings
from .health import BackendHealth
from .protocol import TtsState

log = logging.getLogger("personaplex_bridge.tts")

API_KEY_HEADER = "kyutai-api-key"
FORMAT = "OggOpusMessagePack"

# Reasons a reply is not (fully) spoken; sent as tts_skipped.reason.
R_OFF = "off"
R_EMPTY = "empty"
R_VOICE_ACTIVE = "voice_active"
R_UNREACHABLE = "unreachable"
R_UNAUTHORIZED = "unauthorized"
R_AT_CAPACITY = "at_capacity"
R_ERROR = "error"
R_TIMEOUT = "timeout"
R_CLOSED = "closed"  # the client's session ended mid-reply


class TtsSkipped(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def stream_url(base: str, voice: str) -> str:
    """``base`` with ``format`` and (when set) ``voice`` appended to its query."""
    parts = urlsplit(base)
    query = {"format": FORMAT}
    if voice:
        query["voice"] = voice
    extra = urlencode(query)
    joined = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, ""))


def pack(message: dict[str, Any]) -> bytes:
    out = msgpack.packb(message, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def unpack(data: bytes) -> dict[str, Any]:
    """Decode one server message. Raises ValueError for anything but a map with a string ``type``."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ValueError(f"not MessagePack ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ValueError("not a map with a string 'type'")
    return obj


def audio_bytes(data: Any) -> bytes:
    """The Ogg bytes of an ``OggOpus`` message's ``data`` (bytes, or an array of 0..255 integers)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, list):
        try:
            return bytes(data)
        except (TypeError, ValueError):
            raise ValueError("'data' is an array but not of 0..255 integers") from None
    raise ValueError(f"'data' is a {type(data).__name__}, not bytes")


class TtsClient:
    def __init__(self, settings: Settings, http: aiohttp.ClientSession) -> None:
        self.url = settings.tts_url
        self._voice = settings.tts_voice
        self._key = settings.tts_key
        self._step_s = settings.tts_timeout_s
        self._max_s = settings.tts_max_s
        self._http = http
        # A reachable host clears only a failure to reach it: a refused key or a bad reply stays "down"
        # until a reply is spoken again.
        self.health = BackendHealth(
            "TTS",
            self.url,
            settings.probe_timeout_s,
            "no reply spoken yet",
            recovers=lambda reason: reason.startswith("cannot reach"),
        )

    @property
    def state(self) -> TtsState:
        return self.health.state

    @property
    def reason(self) -> str:
        return self.health.reason

    def _outcome(self, ok: bool, reason: str) -> None:
        self.health.outcome(ok, reason)

    async def speak(self, text: str, on_audio: Callable[[bytes], Awaitable[None]]) -> int:
        """Speak ``text``; ``on_audio`` gets each Ogg page. Returns the number of pages.

        Raises :class:`TtsSkipped` with the reason when the reply cannot be (fully) spoken.
        """
        if self.url is None:
            raise TtsSkipped(R_OFF, "no TTS is configured")
        try:
            pages = await self._speak(self.url, text, on_audio)
        except TtsSkipped as exc:
            if exc.reason == R_AT_CAPACITY:
                self._outcome(True, exc.message)  # full, not broken
            elif exc.reason not in (R_VOICE_ACTIVE, R_CLOSED):  # those say nothing about the TTS
                self._outcome(False, exc.message)
                if exc.reason == R_UNREACHABLE:
                    self.health.reachable = False
            raise
        self.health.reachable = True
        self._outcome(True, "last reply spoken")
        return pages

    async def _speak(self, url: str, text: str, on_audio: Callable[[bytes], Awaitable[None]]) -> int:
        headers = {API_KEY_HEADER: self._key} if self._key else {}
        deadline = time.monotonic() + self._max_s
        try:
            async with timeout(self._step_s):
                ws = await self._http.ws_connect(
                    stream_url(url, self._voice),
                    headers=headers,
                    autoping=True,
                    max_msg_size=4 * 1024 * 1024,
                    **ws_close_timeout(0.5),
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise TtsSkipped(R_UNAUTHORIZED, "the TTS refused the API key (HTTP 401)") from None
            raise TtsSkipped(R_ERROR, f"the TTS refused the connection (HTTP {exc.status})") from None
        except asyncio.TimeoutError:
            raise TtsSkipped(
                R_TIMEOUT, f"the TTS did not accept a connection within {self._step_s} s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TtsSkipped(R_UNREACHABLE, f"cannot reach the TTS ({type(exc).__name__})") from None
        pages = 0
        try:
            first = await self._next(ws, deadline)
            if first is None:
                raise TtsSkipped(R_ERROR, "the TTS closed the connection before Ready")
            self._check_error(first)
            if first["type"] != "Ready":
                raise TtsSkipped(R_ERROR, f"the TTS sent {first['type']!r} before Ready")
            await ws.send_bytes(pack({"type": "Text", "text": text}))
            await ws.send_bytes(pack({"type": "Eos"}))
            while True:
                msg = await self._next(ws, deadline)
                if msg is None:
                    return pages
                self._check_error(msg)
                if msg["type"] == "OggOpus":
                    try:
                        data = audio_bytes(msg.get("data"))
                    except ValueError as exc:
                        raise TtsSkipped(R_ERROR, f"bad OggOpus message: {exc}") from None
                    await on_audio(data)
                    pages += 1
                # Text (word timings), Ready repeats and Audio (PCM formats) carry nothing to relay.
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise TtsSkipped(R_ERROR, f"the TTS connection failed ({type(exc).__name__})") from None
        finally:
            await self._close(ws)

    async def _next(self, ws: aiohttp.ClientWebSocketResponse, deadline: float) -> dict[str, Any] | None:
        """The next decoded message, or ``None`` once the server has closed the socket."""
        while True:
            wait = min(self._step_s, deadline - time.monotonic())
            if wait <= 0:
                raise TtsSkipped(R_TIMEOUT, f"the reply took longer than {self._max_s} s to speak")
            try:
                msg = await ws.receive(timeout=wait)
            except asyncio.TimeoutError:
                raise TtsSkipped(R_TIMEOUT, f"the TTS sent nothing for {wait:.1f} s") from None
            if msg.type == aiohttp.WSMsgType.BINARY:
                try:
                    return unpack(msg.data)
                except ValueError as exc:
                    raise TtsSkipped(R_ERROR, f"bad TTS message: {exc}") from None
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return None
            if msg.type == aiohttp.WSMsgType.ERROR:
                raise TtsSkipped(R_ERROR, f"the TTS connection failed ({type(msg.data).__name__})")
            # A text frame is not part of the protocol; ignore it like pings.

    @staticmethod
    def _check_error(msg: dict[str, Any]) -> None:
        if msg["type"] != "Error":
            return
        detail = str(msg.get("message", ""))[:200]
        if "no free channels" in detail:
            raise TtsSkipped(R_AT_CAPACITY, f"the TTS is at capacity ({detail})")
        raise TtsSkipped(R_ERROR, f"the TTS reported an error: {detail}")

    @staticmethod
    async def _close(ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async with timeout(2.0):
                await ws.close()
        except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError):
            pass

    async def probe(self) -> None:
        await self.health.probe()

    def snapshot(self) -> dict[str, Any]:
        return {"url": self.url, "voice": self._voice or None, "state": self.state, "reason": self.reason}
