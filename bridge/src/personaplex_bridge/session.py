"""One client's session: its state machine, its frames, its writer, and its MAS turns.

Voice has two modes, each in a module of its own that sees the session as a :class:`.services.Host`:
**agent** (:mod:`.agent`: the STT, turn-taking, replies spoken by the TTS or the chat reply voice) and
**duplex** (:mod:`.duplex`: the audio relayed to a Moshi/PersonaPlex backend).

Tasks of a session, all owned here and cancelled and awaited in :meth:`Session.run`'s ``finally``:

* the receive loop (the handler's own task): client frames, in order;
* the writer: the only task that writes to the client, from a bounded queue;
* the turn worker: MAS calls and spoken replies, one turn at a time, from a bounded queue;
* those its voice spawns (:meth:`Session.spawn`): while voice is on, the relay (Moshi's frames, or the
  STT's events, and the chat reply voice's frames); while a reply is spoken in agent mode, its playback
  (so that a barge-in can cancel it).

The hot path (a frame in, a frame out) arms no timer: waits that have no natural end are bounded by
:meth:`Session.watchdog`, which the app calls about once a second. It closes sessions idle past
``BRIDGE_IDLE_TIMEOUT_S``, aborts a write to a client stuck past ``BRIDGE_SEND_TIMEOUT_S``, and passes
the time to the voice, whose own watchdog ends a backend that answers nothing (``BRIDGE_MOSHI_STALL_S``
for Moshi and the chat reply voice, which also covers a send that cannot complete: the frame is
counted as unanswered before it is sent; ``BRIDGE_ASR_TIMEOUT_S`` for the STT and a turn's flush).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, Final

import aiohttp
from aiohttp import web

from . import protocol as p
from .agent import AgentVoice
from .aio import cancel_and_wait, timeout, uncancel
from .duplex import DuplexVoice
from .mas import MasBadReply, MasUnavailable
from .prompts import Prompts
from .services import Services, Turn
from .tts import R_CLOSED, R_EMPTY, R_VOICE_ACTIVE, TtsSkipped

__all__ = ["Services", "Session"]

log = logging.getLogger("personaplex_bridge.session")

_CLOSE: Final = object()  # writer sentinel: close the websocket after what is queued

Voice = AgentVoice | DuplexVoice


class Session:
    def __init__(self, session_id: str, ws: web.WebSocketResponse, services: Services) -> None:
        s = services.settings
        self.id = session_id
        self._ws = ws
        self.svc = services
        self._s = s
        self._metrics = services.metrics
        self._out: asyncio.Queue[object] = asyncio.Queue(s.out_queue_frames)
        self._turns: asyncio.Queue[Turn] = asyncio.Queue(s.max_pending_turns)
        self._writer: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._voice: Voice | None = None
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

    # --- state seen by the app ---

    @property
    def voice_active(self) -> bool:
        return self._voice is not None

    @property
    def voice_mode(self) -> p.VoiceMode | None:
        voice = self._voice
        return None if voice is None else voice.mode

    @property
    def idle(self) -> bool:
        """Nothing in flight: no MAS turn, no spoken reply, no voice conversation."""
        return not self._turn_active and self._turns.empty() and self._voice is None

    # --- the session as its voice sees it (services.Host) ---

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def closing(self) -> bool:
        return self._closing

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        return task

    def voice_started(self, voice: object) -> None:
        assert isinstance(voice, (AgentVoice, DuplexVoice))
        self._voice = voice

    def voice_ended(self, voice: object) -> None:
        if self._voice is voice:
            self._voice = None

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
        svc = self.svc
        self._writer = asyncio.create_task(self._write_loop(), name=f"writer-{self.id}")
        self._worker = asyncio.create_task(self._turn_loop(), name=f"turns-{self.id}")
        try:
            await self.emit(p.ready(self.id, svc.pool.summary(), svc.mas.state, svc.tts.state, svc.asr.state))
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
        if self._voice is not None:
            self._voice.watchdog(now)

    async def _teardown(self) -> None:
        self._ended = True
        voice = self._voice
        if voice is not None:
            await voice.finish(lost=False, reason="client left")
        await cancel_and_wait([self._worker, *self._relays])
        self.request_close(*self._close_code)
        await self._wait_writer()
        await cancel_and_wait([self._writer])
        self.svc.idle_changed.set()

    async def _wait_writer(self) -> None:
        if self._writer is not None and not self._writer.done():
            await asyncio.wait([self._writer], timeout=self._s.send_timeout_s + 2.0)

    # --- towards the client ---

    async def emit(self, item: str | bytes | dict[str, object]) -> None:
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

    async def error(self, code: str, message: str, **extra: object) -> None:
        self._metrics.count("bridge_client_errors_total", code)
        await self.emit(p.error(code, message, **extra))

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
            uncancel()
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
        await self.error(
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
            await self.error(p.E_FRAME_TOO_LARGE, f"frames are limited to {self._s.max_frame_bytes} bytes")
            return
        voice = self._voice
        if voice is None:
            await self.error(p.E_BINARY_BEFORE_VOICE, "binary frames need a voice session: send voice_start")
            return
        if not data or data[0] != p.KIND_AUDIO:
            kind = f"0x{data[0]:02x}" if data else "empty"
            await self.error(p.E_UNKNOWN_KIND, f"binary frames must be 0x01 + Ogg/Opus, got kind {kind}")
            return
        await voice.on_audio(data)

    async def _on_text(self, data: str) -> None:
        self._metrics.count("bridge_client_frames_total", "text")
        if not self._allow():
            await self._rate_limited()
            return
        limit = self._s.max_frame_bytes
        if len(data) > limit or (4 * len(data) > limit and len(data.encode("utf-8")) > limit):
            await self.error(p.E_FRAME_TOO_LARGE, f"frames are limited to {limit} bytes")
            return
        try:
            message = p.parse_client_text(data, self._s.max_text_chars)
        except p.ProtocolError as exc:
            await self.error(exc.code, exc.message)
            return
        if isinstance(message, p.TextTurn):
            if self.svc.draining:
                await self.error(p.E_DRAINING, "the bridge is shutting down; no new turns")
                return
            await self.queue_turn(Turn(message.text, "text"))
        elif isinstance(message, p.VoiceStart):
            await self._start_voice(message)
        else:
            await self._stop_voice()

    # --- MAS turns ---

    async def queue_turn(self, turn: Turn) -> None:
        try:
            self._turns.put_nowait(turn)
        except asyncio.QueueFull:
            if turn.source == "text":
                await self.error(p.E_BUSY, f"{self._s.max_pending_turns} turns are already waiting for MAS")
            else:
                self._metrics.count("bridge_dropped_frames_total", "utterance_queue_full")
                if turn.source == "voice":
                    await self.error(
                        p.E_BUSY,
                        f"{self._s.max_pending_turns} turns are already waiting for MAS; "
                        "this spoken turn was dropped",
                        source="voice",
                    )

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
                if self.svc.draining:
                    self.svc.idle_changed.set()

    async def _run_turn(self, turn: Turn) -> None:
        log.debug("session %s: %s turn: %r", self.id, turn.source, turn.text)
        try:
            reply = await self.svc.mas.chat(self.id, turn.text, turn.source)
        except MasUnavailable as exc:
            await self.error(p.E_MAS_UNAVAILABLE, exc.message, retry_in_s=exc.retry_in_s, source=turn.source)
            return
        except MasBadReply as exc:
            await self.error(p.E_MAS_BAD_REPLY, exc.message, source=turn.source)
            return
        await self.emit(
            p.mas_response(
                reply.text, reply.tool_calls, reply.agent_activity, reply.memory, reply.extra, turn.source
            )
        )
        if turn.source == "assistant_speech":
            return  # context for MAS; Moshi is speaking
        voice = self._voice
        if isinstance(voice, AgentVoice):
            await voice.speak(reply.text)
        else:
            await self._speak(reply.text)

    async def _speak(self, text: str) -> None:
        metrics = self._metrics
        try:
            if not text.strip():
                raise TtsSkipped(R_EMPTY, "the reply is empty")
            if isinstance(self._voice, DuplexVoice):
                raise TtsSkipped(R_VOICE_ACTIVE, "Moshi is speaking in this session")
            await self.svc.tts.speak(text, self._tts_audio)
        except TtsSkipped as exc:
            metrics.count("bridge_tts_turns_total", exc.reason)
            await self.emit(p.tts_skipped(exc.reason, exc.message))
            return
        metrics.count("bridge_tts_turns_total", "done")
        await self.emit(p.tts_done())

    async def _tts_audio(self, page: bytes) -> None:
        if self._closing or self._ended:
            raise TtsSkipped(R_CLOSED, "the session is closing")
        if isinstance(self._voice, DuplexVoice):
            raise TtsSkipped(R_VOICE_ACTIVE, "duplex voice started while the reply was spoken")
        self._metrics.count("bridge_tts_frames_total")
        await self.emit(bytes((p.KIND_AUDIO,)) + page)

    # --- voice ---

    async def _start_voice(self, start: p.VoiceStart) -> None:
        svc = self.svc
        s = self._s
        if self._voice is not None:
            await self.error(p.E_BAD_STATE, "a voice session is already active")
            return
        if svc.draining:
            svc.metrics.count("bridge_voice_sessions_total", "draining")
            await self.emit(p.voice_unavailable("draining", "the bridge is shutting down"))
            return
        prompts = Prompts(
            s.voice_prompt if start.voice_prompt is None else start.voice_prompt,
            s.text_prompt if start.text_prompt is None else start.text_prompt,
        )
        mode = start.mode or ("agent" if s.asr_url else "duplex")
        if mode == "agent":
            await AgentVoice.start(self, prompts, start.reply_voice or s.reply_voice)
        else:
            await DuplexVoice.start(self, prompts)

    async def _stop_voice(self) -> None:
        voice = self._voice
        if voice is None:
            await self.error(p.E_BAD_STATE, "no voice session is active")
            return
        await voice.finish(lost=False, reason="voice_stop")
        await self.emit(p.voice_stopped())
