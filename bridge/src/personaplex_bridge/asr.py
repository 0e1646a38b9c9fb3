"""Client of Kyutai's streaming STT protocol (moshi-server's and our engine's ``/api/asr-streaming``).

Connect to ``BRIDGE_ASR_URL`` with the ``kyutai-api-key`` header. Every websocket message is a binary
MessagePack map with a ``type``:

* client to server: ``{"type":"Audio","pcm":[float32 at 24 kHz]}`` (the bridge sends 1920 samples,
  80 ms, per message) and ``{"type":"Marker","id":N}``;
* server to client: ``Ready`` first; ``Word {text, start_time}``; ``EndWord {stop_time}``;
  ``Step {step_idx, prs}`` (one per 80 ms of audio processed; ``prs`` are the pause predictions of the
  semantic VAD heads); ``Marker {id}`` once all audio sent before it has been processed;
  ``Error {message}`` (``"no free channels"`` as the first message when every slot is taken).

One :class:`AsrStream` per agent voice session; :class:`AsrClient` opens them and keeps the STT's state
for ``/status`` and ``ready``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack

from .aio import timeout, ws_close_timeout
from .audio import SAMPLE_RATE, Pcm
from .config import Settings
from .health import BackendHealth
from .protocol import TtsState as AsrState

log = logging.getLogger("personaplex_bridge.asr")

API_KEY_HEADER = "kyutai-api-key"

# Why an STT stream could not be opened; voice_unavailable.reason (busy, down) or a log line.
R_BUSY = "busy"
R_DOWN = "down"


class AsrUnavailable(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class AsrLost(Exception):
    """The STT stream failed mid-session (closed, an ``Error``, a bad message)."""


@dataclass(frozen=True)
class Word:
    text: str
    start_s: float


@dataclass(frozen=True)
class EndWord:
    stop_s: float


@dataclass(frozen=True)
class Step:
    step_idx: int
    prs: tuple[float, ...]


@dataclass(frozen=True)
class Marker:
    id: int


AsrEvent = Word | EndWord | Step | Marker


def _number(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{obj.get('type')}: {key!r} is not a number")
    return float(value)


def parse_event(data: bytes) -> AsrEvent | None:
    """One server message as an event; ``None`` for ``Ready`` and unknown types. Raises ValueError
    for a message that is not MessagePack or not well formed, and :class:`AsrLost` for ``Error``."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ValueError(f"not MessagePack ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ValueError("not a map with a string 'type'")
    kind = obj["type"]
    if kind == "Word":
        text = obj.get("text")
        if not isinstance(text, str):
            raise ValueError("Word: 'text' is not a string")
        return Word(text, _number(obj, "start_time"))
    if kind == "EndWord":
        return EndWord(_number(obj, "stop_time"))
    if kind == "Step":
        prs = obj.get("prs", [])
        if not isinstance(prs, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in prs
        ):
            raise ValueError("Step: 'prs' is not a list of numbers")
        return Step(int(_number(obj, "step_idx")), tuple(float(x) for x in prs))
    if kind == "Marker":
        return Marker(int(_number(obj, "id")))
    if kind == "Error":
        raise AsrLost(f"the STT reported an error: {str(obj.get('message', ''))[:200]}")
    return None  # Ready (repeated) or a type added later


def pack_audio(pcm: Pcm) -> bytes:
    out = msgpack.packb({"type": "Audio", "pcm": pcm.tolist()}, use_bin_type=True, use_single_float=True)
    assert isinstance(out, bytes)
    return out


def pack_marker(marker_id: int) -> bytes:
    out = msgpack.packb({"type": "Marker", "id": marker_id}, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


class AsrStream:
    """One open STT session. ``send_*`` and ``receive`` may be used from different tasks."""

    def __init__(self, url: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.url = url
        self._ws = ws
        self.samples_sent = 0

    @property
    def audio_sent_s(self) -> float:
        return self.samples_sent / SAMPLE_RATE

    async def send_audio(self, pcm: Pcm) -> None:
        """Raises :class:`AsrLost` when the connection is gone."""
        try:
            await self._ws.send_bytes(pack_audio(pcm))
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise AsrLost(f"sending to the STT failed ({type(exc).__name__})") from None
        self.samples_sent += pcm.size

    async def send_marker(self, marker_id: int) -> None:
        try:
            await self._ws.send_bytes(pack_marker(marker_id))
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise AsrLost(f"sending to the STT failed ({type(exc).__name__})") from None

    async def receive(self) -> AsrEvent:
        """The next event. Raises :class:`AsrLost` when the stream ends or fails. Unbounded: the
        session's watchdog bounds it (the STT must answer audio with steps)."""
        while True:
            msg = await self._ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                try:
                    event = parse_event(msg.data)
                except ValueError as exc:
                    raise AsrLost(f"bad STT message: {exc}") from None
                if event is not None:
                    return event
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                raise AsrLost("the STT closed the connection")
            elif msg.type is aiohttp.WSMsgType.ERROR:
                raise AsrLost(f"the STT connection failed ({type(msg.data).__name__})")
            # text frames are not part of the protocol: ignored

    async def close(self) -> None:
        try:
            async with timeout(2.0):
                await self._ws.close()
        except (asyncio.TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
            pass


class AsrClient:
    def __init__(self, settings: Settings, http: aiohttp.ClientSession) -> None:
        self.url = settings.asr_url
        self._key = settings.asr_key
        self._timeout_s = settings.asr_timeout_s
        self._http = http
        self.health = BackendHealth("STT", self.url, settings.probe_timeout_s, "no session yet")

    @property
    def state(self) -> AsrState:
        return self.health.state

    @property
    def reason(self) -> str:
        return self.health.reason

    def _outcome(self, ok: bool, reason: str) -> None:
        self.health.outcome(ok, reason)

    def lost(self, reason: str) -> None:
        """A session's stream failed: the STT is down until a session opens again."""
        self._outcome(False, reason)

    async def open(self) -> AsrStream:
        """Connect and wait for ``Ready``, within ``BRIDGE_ASR_TIMEOUT_S``. Raises :class:`AsrUnavailable`."""
        if self.url is None:
            raise AsrUnavailable("no_backend", "no STT is configured (BRIDGE_ASR_URL)")
        try:
            stream = await self._open(self.url)
        except AsrUnavailable as exc:
            if exc.reason == R_BUSY:
                self._outcome(True, exc.message)  # full, not broken
            else:
                self._outcome(False, exc.message)
            raise
        self.health.reachable = True
        self._outcome(True, "last session opened")
        return stream

    async def _open(self, url: str) -> AsrStream:
        headers = {API_KEY_HEADER: self._key} if self._key else {}
        limit = self._timeout_s
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            async with timeout(limit):
                ws = await self._http.ws_connect(
                    url, headers=headers, autoping=True, max_msg_size=4 * 1024 * 1024, **ws_close_timeout(1.0)
                )
                first = await ws.receive()
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise AsrUnavailable(R_DOWN, "the STT refused the API key (HTTP 401)") from None
            raise AsrUnavailable(R_DOWN, f"the STT refused the connection (HTTP {exc.status})") from None
        except asyncio.TimeoutError:
            if ws is not None:
                await AsrStream(url, ws).close()
                raise AsrUnavailable(R_DOWN, f"the STT sent no Ready within {limit:g} s") from None
            raise AsrUnavailable(R_DOWN, f"the STT did not accept a connection within {limit:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            if ws is not None:
                await AsrStream(url, ws).close()
            raise AsrUnavailable(R_DOWN, f"cannot reach the STT ({type(exc).__name__})") from None
        except asyncio.CancelledError:
            if ws is not None:
                await AsrStream(url, ws).close()
            raise
        stream = AsrStream(url, ws)
        if first.type is not aiohttp.WSMsgType.BINARY:
            await stream.close()
            raise AsrUnavailable(R_DOWN, f"the STT closed the connection before Ready ({first.type.name})")
        try:
            event = msgpack.unpackb(first.data, raw=False, strict_map_key=False)
        except Exception:  # msgpack raises several unrelated exception types
            event = None
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "Ready":
            return stream
        await stream.close()
        if kind == "Error":
            detail = str(event.get("message", ""))[:200] if isinstance(event, dict) else ""
            if "no free channels" in detail:
                raise AsrUnavailable(R_BUSY, f"the STT is at capacity ({detail})")
            raise AsrUnavailable(R_DOWN, f"the STT reported an error: {detail}")
        raise AsrUnavailable(R_DOWN, f"the STT sent {kind!r} before Ready")

    async def probe(self) -> None:
        await self.health.probe()

    def snapshot(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "reason": self.reason}
