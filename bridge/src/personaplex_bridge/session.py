"""One client's session: its state machine, its Moshi voice link, and its MAS turns.

Tasks of a session, all owned here and cancelled and awaited in :meth:`Session.run`'s ``finally``:

* the receive loop (the handler's own task): client frames, in order;
* the writer: the only task that writes to the client, from a bounded queue;
* the turn worker: MAS calls and spoken replies, one turn at a time, from a bounded queue;
* while voice is on, the Moshi relay: Moshi frames back to the client.

The hot path (a frame in, a frame out) arms no timer: waits that have no natural end are bounded by
:meth:`Session.watchdog`, which the app calls about once a second. It closes sessions idle past
``BRIDGE_IDLE_TIMEOUT_S``, aborts a write to a client stuck past ``BRIDGE_SEND_TIMEOUT_S``, and ends
a voice session whose Moshi answered nothing for ``BRIDGE_MOSHI_STALL_S`` (which also covers a send
to Moshi that cannot complete: the frame is counted as unanswered before it is sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from aiohttp import web

from . import protocol as p
from .aio import cancel_and_wait, timeout, ws_close_timeout
from .config import Settings
from .mas import MasBadReply, MasClient, MasUnavailable
from .metrics import Metrics
from .pool import MoshiBackend, MoshiPool
from .tts import R_CLOSED, R_EMPTY, R_VOICE_ACTIVE, TtsClient, TtsSkipped

log = logging.getLogger("personaplex_bridge.session")

_CLOSE: Final = object()  # writer sentinel: close the websocket after what is queued
_FRAME_S = 0.08  # one Moshi frame
_UTTERANCE_MAX_CHARS = 1000
_SENTENCE_END = (".", "!", "?", "…")
_CLOSED_TYPES = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


@dataclass
class Services:
    """What sessions share: settings, backends and the bridge-wide state."""

    settings: Settings
    http: aiohttp.ClientSession
    pool: MoshiPool
    mas: MasClient
    tts: TtsClient
    metrics: Metrics
    draining: bool = False
    idle_changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class _Turn:
    text: str
    source: p.Source


@dataclass(eq=False)
class _Voice:
    backend: MoshiBackend
    ws: aiohttp.ClientWebSocketResponse
    relay: asyncio.Task[None] | None = None
    ended: bool = False
    stalled: bool = False
    unanswered_since: float | None = None  # first client frame not yet followed by a Moshi frame


class _ConnectFailed(Exception):
    def __init__(self, busy: bool, reason: str) -> None:
        super().__init__(reason)
        self.busy = busy
        self.reason = reason


class Session:
    def __init__(self, session_id: str, ws: web.WebSocketResponse, services: Services) -> None:
        s = services.settings
        self.id = session_id
        self._ws = ws
        self._svc = services
        self._s = s
        self._metrics = services.metrics
        self._out: asyncio.Queue[object] = asyncio.Queue(s.out_queue_frames)
        self._turns: asyncio.Queue[_Turn] = asyncio.Queue(s.max_pending_turns)
        self._writer: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._voice: _Voice | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._turn_active = False
        self._closing = False
        self._close_queued = False
        self._close_code = (1000, "")
        self._ended = False
        self._last_activity = time.monotonic()
        self._write_started: float | None = None
        self._write_stalled = False
        # token bucket
        self._tokens = float(s.rate_burst)
        self._stamp = time.monotonic()
        self._rate_noticed = 0.0
        self._rate_dropped = 0
        # Moshi's words, gathered into utterances for MAS
        self._utterance: list[str] = []
        self._utterance_chars = 0
        self._frames_since_text = 0
        self._gap_frames = max(1, round(s.utterance_gap_s / _FRAME_S))

    # --- state seen by the app ---

    @property
    def voice_active(self) -> bool:
        return self._voice is not None

    @property
    def idle(self) -> bool:
        """Nothing in flight: no MAS turn, no spoken reply, no voice conversation."""
        return not self._turn_active and self._turns.empty() and self._voice is None

    def request_close(self, code: int, reason: str) -> None:
        """Close after what is already queued for the client has been written. Safe from any task."""
        if self._closing:
            return
        self._closing = True
        self._close_code = (code, reason)
        self._queue_close()

    def _queue_close(self) -> None:
        # A full queue means the writer is slow or stuck on the client: the watchdog retries, or its send
        # timeout ends the writer, which then closes.
        with contextlib.suppress(asyncio.QueueFull):
            self._out.put_nowait(_CLOSE)
            self._close_queued = True

    # --- main loop ---

    async def run(self) -> None:
        svc = self._svc
        self._writer = asyncio.create_task(self._write_loop(), name=f"writer-{self.id}")
        self._worker = asyncio.create_task(self._turn_loop(), name=f"turns-{self.id}")
        try:
            await self._emit(p.ready(self.id, svc.pool.summary(), svc.mas.state, svc.tts.state))
            await self._receive_loop()
        finally:
            await self._teardown()

    async def _receive_loop(self) -> None:
        ws = self._ws
        while True:
            msg = await ws.receive()  # bounded by the idle watchdog and the websocket heartbeat
            self._last_activity = time.monotonic()
            kind = msg.type
            if kind is aiohttp.WSMsgType.BINARY:
                await self._on_binary(msg.data)
            elif kind is aiohttp.WSMsgType.TEXT:
                await self._on_text(msg.data)
            else:
                if kind is aiohttp.WSMsgType.ERROR:
                    log.info("session %s: websocket error: %s", self.id, msg.data)
                return

    def watchdog(self, now: float) -> None:
        """Enforce the session's time limits; called by the app about once a second."""
        s = self._s
        if not self._closing and now - self._last_activity > s.idle_timeout_s:
            log.info("session %s: idle for %.0f s, closing", self.id, s.idle_timeout_s)
            self.request_close(1000, "idle timeout")
        if self._closing and not self._close_queued:
            self._queue_close()
        started = self._write_started
        if started is not None and now - started > s.send_timeout_s and not self._write_stalled:
            log.warning("session %s: a write took over %.0f s, closing", self.id, s.send_timeout_s)
            self._write_stalled = True
            if self._writer is not None:
                self._writer.cancel()
        voice = self._voice
        if voice is not None and not voice.stalled and voice.relay is not None:
            since = voice.unanswered_since
            if since is not None and now - since > s.moshi_stall_s:
                voice.stalled = True
                voice.relay.cancel()

    async def _teardown(self) -> None:
        self._ended = True
        voice = self._voice
        if voice is not None:
            await self._finish_voice(voice, lost=False, reason="client left")
        await cancel_and_wait([self._worker, *self._relays])
        self.request_close(*self._close_code)
        await self._wait_writer()
        await cancel_and_wait([self._writer])
        self._svc.idle_changed.set()

    async def _wait_writer(self) -> None:
        if self._writer is not None and not self._writer.done():
            await asyncio.wait([self._writer], timeout=self._s.send_timeout_s + 2.0)

    # --- towards the client ---

    async def _emit(self, item: str | bytes | dict[str, object]) -> None:
        """Queue ``item`` for the client (a dict is sent as a JSON event). Waits when the queue is full."""
        if self._closing or self._ended:
            return
        data: object = p.dumps(item) if isinstance(item, dict) else item
        try:
            self._out.put_nowait(data)
            return
        except asyncio.QueueFull:
            pass
        try:
            async with timeout(self._s.send_timeout_s):
                await self._out.put(data)
        except asyncio.TimeoutError:
            self._metrics.count("bridge_dropped_frames_total", "client_too_slow")
            log.warning("session %s: client is not reading, closing", self.id)
            self.request_close(1008, "client is not reading")

    async def _error(self, code: str, message: str, **extra: object) -> None:
        self._metrics.count("bridge_client_errors_total", code)
        await self._emit(p.error(code, message, **extra))

    async def _write_loop(self) -> None:
        ws = self._ws
        try:
            while True:
                item = await self._out.get()
                if item is _CLOSE:
                    break
                self._write_started = time.monotonic()
                if isinstance(item, bytes):
                    await ws.send_bytes(item)
                else:
                    assert isinstance(item, str)
                    await ws.send_str(item)
                self._write_started = None
        except asyncio.CancelledError:
            if not self._write_stalled:
                raise
            _uncancel()
            self._close_code = (1008, "client is not reading")
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return  # the client is gone
        code, reason = self._close_code
        try:
            async with timeout(2.0):
                await ws.close(code=code, message=reason.encode())
        except (asyncio.TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
            pass

    # --- from the client ---

    def _allow(self) -> bool:
        s = self._s
        now = time.monotonic()
        self._tokens = min(float(s.rate_burst), self._tokens + (now - self._stamp) * s.rate_per_s)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._rate_dropped += 1
        self._metrics.count("bridge_dropped_frames_total", "rate_limited")
        return False

    async def _rate_limited(self) -> None:
        now = time.monotonic()
        if now - self._rate_noticed < 1.0:
            return
        self._rate_noticed = now
        dropped, self._rate_dropped = self._rate_dropped, 0
        await self._error(
            p.E_RATE_LIMITED,
            f"more than {self._s.rate_per_s:g} frames per second (burst {self._s.rate_burst}); "
            f"{dropped} frame(s) dropped",
            dropped=dropped,
        )

    async def _on_binary(self, data: bytes) -> None:
        self._metrics.count("bridge_client_frames_total", "binary")
        if not self._allow():
            await self._rate_limited()
            return
        if len(data) > self._s.max_frame_bytes:
            await self._error(p.E_FRAME_TOO_LARGE, f"frames are limited to {self._s.max_frame_bytes} bytes")
            return
        voice = self._voice
        if voice is None:
            await self._error(p.E_BINARY_BEFORE_VOICE, "binary frames need a voice session: send voice_start")
            return
        if not data or data[0] != p.KIND_AUDIO:
            kind = f"0x{data[0]:02x}" if data else "empty"
            await self._error(p.E_UNKNOWN_KIND, f"binary frames must be 0x01 + Ogg/Opus, got kind {kind}")
            return
        if voice.unanswered_since is None:
            voice.unanswered_since = time.monotonic()
        try:
            await voice.ws.send_bytes(data)  # bounded by the stall watchdog
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            await self._finish_voice(
                voice, lost=True, reason=f"sending to Moshi failed ({type(exc).__name__})"
            )

    async def _on_text(self, data: str) -> None:
        self._metrics.count("bridge_client_frames_total", "text")
        if not self._allow():
            await self._rate_limited()
            return
        limit = self._s.max_frame_bytes
        if len(data) > limit or (4 * len(data) > limit and len(data.encode("utf-8")) > limit):
            await self._error(p.E_FRAME_TOO_LARGE, f"frames are limited to {limit} bytes")
            return
        try:
            message = p.parse_client_text(data, self._s.max_text_chars)
        except p.ProtocolError as exc:
            await self._error(exc.code, exc.message)
            return
        if isinstance(message, p.TextTurn):
            if self._svc.draining:
                await self._error(p.E_DRAINING, "the bridge is shutting down; no new turns")
                return
            await self._queue_turn(_Turn(message.text, "text"))
        elif isinstance(message, p.VoiceStart):
            await self._start_voice()
        else:
            await self._stop_voice()

    # --- MAS turns ---

    async def _queue_turn(self, turn: _Turn) -> None:
        try:
            self._turns.put_nowait(turn)
        except asyncio.QueueFull:
            if turn.source == "text":
                await self._error(p.E_BUSY, f"{self._s.max_pending_turns} turns are already waiting for MAS")
            else:
                self._metrics.count("bridge_dropped_frames_total", "utterance_queue_full")

    async def _turn_loop(self) -> None:
        while True:
            turn = await self._turns.get()
            self._turn_active = True
            try:
                await self._run_turn(turn)
            except Exception:
                log.exception("session %s: turn failed", self.id)
            finally:
                self._turn_active = False
                if self._svc.draining:
                    self._svc.idle_changed.set()

    async def _run_turn(self, turn: _Turn) -> None:
        log.debug("session %s: %s turn: %r", self.id, turn.source, turn.text)
        try:
            reply = await self._svc.mas.chat(self.id, turn.text, turn.source)
        except MasUnavailable as exc:
            await self._error(p.E_MAS_UNAVAILABLE, exc.message, retry_in_s=exc.retry_in_s, source=turn.source)
            return
        except MasBadReply as exc:
            await self._error(p.E_MAS_BAD_REPLY, exc.message, source=turn.source)
            return
        await self._emit(
            p.mas_response(
                reply.text, reply.tool_calls, reply.agent_activity, reply.memory, reply.extra, turn.source
            )
        )
        if turn.source == "text":
            await self._speak(reply.text)

    async def _speak(self, text: str) -> None:
        metrics = self._metrics
        try:
            if not text.strip():
                raise TtsSkipped(R_EMPTY, "the reply is empty")
            if self._voice is not None:
                raise TtsSkipped(R_VOICE_ACTIVE, "Moshi is speaking in this session")
            await self._svc.tts.speak(text, self._tts_audio)
        except TtsSkipped as exc:
            metrics.count("bridge_tts_turns_total", exc.reason)
            await self._emit(p.tts_skipped(exc.reason, exc.message))
            return
        metrics.count("bridge_tts_turns_total", "done")
        await self._emit(p.tts_done())

    async def _tts_audio(self, page: bytes) -> None:
        if self._closing or self._ended:
            raise TtsSkipped(R_CLOSED, "the session is closing")
        if self._voice is not None:
            raise TtsSkipped(R_VOICE_ACTIVE, "voice started while the reply was spoken")
        self._metrics.count("bridge_tts_frames_total")
        await self._emit(bytes((p.KIND_AUDIO,)) + page)

    # --- voice ---

    async def _start_voice(self) -> None:
        svc = self._svc
        if self._voice is not None:
            await self._error(p.E_BAD_STATE, "a voice session is already active")
            return
        if svc.draining:
            await self._voice_unavailable("draining", "the bridge is shutting down")
            return
        tried: set[str] = set()
        busy = False
        while (backend := svc.pool.acquire(frozenset(tried))) is not None:
            tried.add(backend.url)
            try:
                moshi_ws = await self._connect_moshi(backend)
            except BaseException as exc:  # on cancellation too, the backend must go back
                svc.pool.release(backend)
                if not isinstance(exc, _ConnectFailed):
                    raise
                busy = busy or exc.busy
                if not exc.busy:
                    svc.pool.mark_down(backend, exc.reason)
                log.info("session %s: moshi %s: %s", self.id, backend.url, exc.reason)
                continue
            voice = _Voice(backend, moshi_ws)
            self._voice = voice
            self._utterance.clear()
            self._utterance_chars = 0
            self._frames_since_text = 0
            voice.relay = asyncio.create_task(self._relay(voice), name=f"moshi-{self.id}")
            self._relays.add(voice.relay)
            voice.relay.add_done_callback(self._relays.discard)
            svc.metrics.count("bridge_voice_sessions_total", "ready")
            log.info("session %s: voice on %s", self.id, backend.url)
            await self._emit(p.voice_ready(backend.url))
            return
        if not svc.pool.backends:
            await self._voice_unavailable("no_backend", "no Moshi backend is configured")
        elif busy or svc.pool.summary() == "busy":
            await self._voice_unavailable("busy", "every Moshi backend is in a conversation")
        else:
            await self._voice_unavailable("down", "no Moshi backend is up")

    async def _voice_unavailable(self, reason: str, message: str) -> None:
        self._metrics.count("bridge_voice_sessions_total", reason)
        await self._emit(p.voice_unavailable(reason, message))

    async def _connect_moshi(self, backend: MoshiBackend) -> aiohttp.ClientWebSocketResponse:
        """Open the websocket and wait for the 0x00 handshake, all within the connect timeout."""
        limit = self._s.moshi_connect_timeout_s
        moshi_ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            async with timeout(limit):
                moshi_ws = await self._svc.http.ws_connect(
                    backend.url,
                    autoping=True,
                    max_msg_size=self._s.hard_frame_bytes,
                    **ws_close_timeout(2.0),
                )
                msg = await moshi_ws.receive()
        except asyncio.TimeoutError:
            if moshi_ws is None:
                raise _ConnectFailed(False, f"no connection within {limit:g} s") from None
            await _close_quietly(moshi_ws)
            raise _ConnectFailed(True, f"no handshake within {limit:g} s (serving someone else?)") from None
        except (aiohttp.ClientError, OSError) as exc:
            if moshi_ws is not None:
                await _close_quietly(moshi_ws)
            raise _ConnectFailed(False, f"connection failed ({type(exc).__name__})") from None
        except asyncio.CancelledError:
            if moshi_ws is not None:
                await _close_quietly(moshi_ws)
            raise
        if msg.type is not aiohttp.WSMsgType.BINARY or msg.data[:1] != b"\x00":
            await _close_quietly(moshi_ws)
            raise _ConnectFailed(False, f"expected the 0x00 handshake, got {msg.type.name}")
        return moshi_ws

    async def _stop_voice(self) -> None:
        voice = self._voice
        if voice is None:
            await self._error(p.E_BAD_STATE, "no voice session is active")
            return
        await self._finish_voice(voice, lost=False, reason="voice_stop")
        await self._emit(p.voice_stopped())

    async def _finish_voice(self, voice: _Voice, *, lost: bool, reason: str) -> None:
        """End ``voice``: the backend goes back to the pool at once. Idempotent; safe from the relay."""
        if voice.ended:
            return
        voice.ended = True
        if self._voice is voice:
            self._voice = None
        pool = self._svc.pool
        pool.release(voice.backend)
        if lost:
            pool.mark_down(voice.backend, reason)
            self._metrics.count("bridge_degraded_total", "moshi")
            log.warning("session %s: lost moshi %s: %s", self.id, voice.backend.url, reason)
            await self._emit(
                p.degraded("moshi", "backend_lost", f"Moshi is gone ({reason}); text still works")
            )
        else:
            log.info("session %s: voice ended (%s)", self.id, reason)
        await self._flush_utterance()
        if voice.relay is not None and voice.relay is not asyncio.current_task():
            await cancel_and_wait([voice.relay])
        await _close_quietly(voice.ws)
        if self._svc.draining:
            self._svc.idle_changed.set()

    async def _relay(self, voice: _Voice) -> None:
        moshi_ws = voice.ws
        reason = "Moshi closed the connection"
        try:
            while True:
                msg = await moshi_ws.receive()  # bounded by the stall watchdog
                if msg.type is aiohttp.WSMsgType.BINARY:
                    voice.unanswered_since = None
                    await self._from_moshi(msg.data)
                elif msg.type in _CLOSED_TYPES:
                    break
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    reason = f"Moshi connection failed ({type(msg.data).__name__})"
                    break
        except asyncio.CancelledError:
            if not voice.stalled:
                raise
            _uncancel()
            reason = f"Moshi answered nothing for {self._s.moshi_stall_s:g} s"
        except (ConnectionError, aiohttp.ClientError) as exc:
            reason = f"Moshi connection failed ({type(exc).__name__})"
        await self._finish_voice(voice, lost=True, reason=reason)

    async def _from_moshi(self, data: bytes) -> None:
        if not data:
            return
        kind = data[0]
        if kind == p.KIND_AUDIO:
            self._metrics.count("bridge_moshi_frames_total", "audio")
            await self._emit(data)
            self._frames_since_text += 1
            if self._utterance and self._frames_since_text >= self._gap_frames:
                await self._flush_utterance()
        elif kind == p.KIND_TEXT:
            self._metrics.count("bridge_moshi_frames_total", "text")
            piece = data[1:].decode("utf-8", "replace")
            await self._emit(p.moshi_text(piece))
            self._utterance.append(piece)
            self._utterance_chars += len(piece)
            self._frames_since_text = 0
            if piece.rstrip().endswith(_SENTENCE_END) or self._utterance_chars >= _UTTERANCE_MAX_CHARS:
                await self._flush_utterance()

    async def _flush_utterance(self) -> None:
        text = "".join(self._utterance).strip()
        self._utterance.clear()
        self._utterance_chars = 0
        if text and not self._ended:
            await self._queue_turn(_Turn(text, "moshi"))


def _uncancel() -> None:
    """Forget a cancellation this task has handled itself (the watchdog's), on Pythons that count them."""
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse) -> None:
    try:
        async with timeout(2.0):
            await ws.close()
    except (asyncio.TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
        pass
