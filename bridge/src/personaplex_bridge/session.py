"""One client's session: its state machine, its voice modes, and its MAS turns.

Voice has two modes. **Agent** (``voice_start`` ``mode:"agent"``, the default when an STT is
configured): the client's audio is decoded and streamed to the STT (:mod:`.asr`); its words come back
as ``transcript`` events; :mod:`.turns` decides when the user's turn ends (the turn is then posted to
MAS with ``source:"voice"`` and the reply is spoken into the same audio stream) and when the user
barges in on a reply (the playback stops, ``tts_interrupted``). **Duplex**: the audio is relayed to a
Moshi server (:mod:`.moshi`) and Moshi's audio and words come back; Moshi's words are its own, never
the user's, so they are not posted to MAS as turns.

Tasks of a session, all owned here and cancelled and awaited in :meth:`Session.run`'s ``finally``:

* the receive loop (the handler's own task): client frames, in order;
* the writer: the only task that writes to the client, from a bounded queue;
* the turn worker: MAS calls and spoken replies, one turn at a time, from a bounded queue;
* while a reply is spoken in agent mode, its playback (so that a barge-in can cancel it);
* while voice is on, the relay: Moshi frames back to the client, or the STT's events.

The hot path (a frame in, a frame out) arms no timer: waits that have no natural end are bounded by
:meth:`Session.watchdog`, which the app calls about once a second. It closes sessions idle past
``BRIDGE_IDLE_TIMEOUT_S``, aborts a write to a client stuck past ``BRIDGE_SEND_TIMEOUT_S``, and ends
a voice session whose Moshi answered nothing for ``BRIDGE_MOSHI_STALL_S`` (which also covers a send
to Moshi that cannot complete: the frame is counted as unanswered before it is sent), and an agent
voice session whose STT answered nothing (or did not finish a turn's flush) for ``BRIDGE_ASR_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from aiohttp import web

from . import moshi
from . import protocol as p
from .aio import cancel_and_wait, timeout
from .asr import AsrClient, AsrLost, AsrStream, AsrUnavailable, Marker, Step, Word
from .audio import CHUNK_S, BadAudio, Chunker, OpusDecoder, level_dbfs, ogg_end_s, silence
from .config import Settings
from .mas import MasBadReply, MasClient, MasUnavailable
from .metrics import Metrics
from .pool import MoshiPool
from .tts import R_CLOSED, R_EMPTY, R_VOICE_ACTIVE, TtsClient, TtsSkipped
from .turns import TurnDetector, TurnSettings

log = logging.getLogger("personaplex_bridge.session")

_CLOSE: Final = object()  # writer sentinel: close the websocket after what is queued
_FRAME_S = 0.08  # one Moshi frame
_UTTERANCE_MAX_CHARS = 1000
_SENTENCE_END = (".", "!", "?", "…")


@dataclass
class Services:
    """What sessions share: settings, backends and the bridge-wide state."""

    settings: Settings
    http: aiohttp.ClientSession
    pool: MoshiPool
    mas: MasClient
    tts: TtsClient
    asr: AsrClient
    metrics: Metrics
    draining: bool = False
    idle_changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class _Turn:
    text: str
    source: p.Source


@dataclass(eq=False)
class _Duplex:
    """Voice relayed to a Moshi backend."""

    link: moshi.MoshiLink
    relay: asyncio.Task[None] | None = None
    ended: bool = False
    stalled: bool = False

    @property
    def backend_url(self) -> str:
        return self.link.backend.url


@dataclass(eq=False)
class _Agent:
    """Voice to the STT, replies through MAS and the TTS."""

    stream: AsrStream
    turns: TurnDetector
    decoder: OpusDecoder = field(default_factory=OpusDecoder)
    chunker: Chunker = field(default_factory=Chunker)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # keeps a flush's messages together
    relay: asyncio.Task[None] | None = None
    ended: bool = False
    stalled: bool = False
    stall_reason: str = ""
    unanswered_since: float | None = None  # audio sent and no STT message since
    flush_marker: int | None = None  # the Marker that ends the turn being flushed
    flush_started: float = 0.0
    next_marker: int = 1
    voiced_since: float | None = None  # wall time of the first loud chunk of the current run
    playback: asyncio.Task[None] | None = None  # the reply being spoken
    interrupted: bool = False


_Voice = _Duplex | _Agent


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
        self._turn_settings = TurnSettings(
            pause_threshold=s.asr_pause_threshold,
            pause_head=s.asr_pause_head,
            min_silence_s=s.asr_min_silence_s,
            silence_dbfs=s.asr_silence_dbfs,
            barge_in_threshold=s.asr_barge_in_threshold,
        )

    # --- state seen by the app ---

    @property
    def voice_active(self) -> bool:
        return self._voice is not None

    @property
    def voice_mode(self) -> p.VoiceMode | None:
        voice = self._voice
        if voice is None:
            return None
        return "agent" if isinstance(voice, _Agent) else "duplex"

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
            await self._emit(
                p.ready(self.id, svc.pool.summary(), svc.mas.state, svc.tts.state, svc.asr.state)
            )
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
        if isinstance(voice, _Duplex) and not voice.stalled and voice.relay is not None:
            since = voice.link.unanswered_since
            if since is not None and now - since > s.moshi_stall_s:
                voice.stalled = True
                voice.relay.cancel()
        elif isinstance(voice, _Agent) and not voice.stalled and voice.relay is not None:
            since = voice.unanswered_since
            if since is not None and now - since > s.asr_timeout_s:
                voice.stall_reason = f"the STT answered nothing for {s.asr_timeout_s:g} s"
            elif voice.flush_marker is not None and now - voice.flush_started > s.asr_timeout_s:
                voice.stall_reason = f"the STT did not finish the turn within {s.asr_timeout_s:g} s"
            if voice.stall_reason:
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
        if isinstance(voice, _Agent):
            await self._to_asr(voice, data[1:])
            return
        link = voice.link
        if link.unanswered_since is None:
            link.unanswered_since = time.monotonic()
        try:
            await link.send(data)  # bounded by the stall watchdog
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
            await self._start_voice(message.mode)
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
                if turn.source == "voice":
                    await self._error(
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
        if turn.source == "assistant_speech":
            return  # context for MAS; Moshi is speaking
        voice = self._voice
        if isinstance(voice, _Agent):
            await self._speak_agent(reply.text, voice)
        else:
            await self._speak(reply.text)

    async def _speak(self, text: str) -> None:
        metrics = self._metrics
        try:
            if not text.strip():
                raise TtsSkipped(R_EMPTY, "the reply is empty")
            if isinstance(self._voice, _Duplex):
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
        if isinstance(self._voice, _Duplex):
            raise TtsSkipped(R_VOICE_ACTIVE, "duplex voice started while the reply was spoken")
        self._metrics.count("bridge_tts_frames_total")
        await self._emit(bytes((p.KIND_AUDIO,)) + page)

    # --- spoken replies in agent voice mode ---

    async def _speak_agent(self, text: str, agent: _Agent) -> None:
        """Speak a reply into the agent voice stream: paced to real time, cancelled by a barge-in."""
        metrics = self._metrics
        if not text.strip():
            metrics.count("bridge_tts_turns_total", R_EMPTY)
            await self._emit(p.tts_skipped(R_EMPTY, "the reply is empty"))
            return
        agent.interrupted = False
        agent.turns.playback_started()
        started: list[float] = []

        async def on_audio(page: bytes) -> None:
            await self._paced_audio(agent, page, started)

        async def play() -> None:
            await self._svc.tts.speak(text, on_audio)

        playback = asyncio.create_task(play(), name=f"playback-{self.id}")
        agent.playback = playback
        self._relays.add(playback)
        playback.add_done_callback(self._relays.discard)
        try:
            await asyncio.wait([playback])
        except asyncio.CancelledError:
            playback.cancel()
            raise
        finally:
            if agent.playback is playback:
                agent.playback = None
        if playback.cancelled():
            metrics.count("bridge_tts_turns_total", "interrupted")
            return  # tts_interrupted was sent by whoever stopped it
        exc = playback.exception()
        if isinstance(exc, TtsSkipped):
            metrics.count("bridge_tts_turns_total", exc.reason)
            await self._emit(p.tts_skipped(exc.reason, exc.message))
            return
        if exc is not None:
            raise exc
        metrics.count("bridge_tts_turns_total", "done")
        await self._emit(p.tts_done())

    async def _paced_audio(self, agent: _Agent, page: bytes, started: list[float]) -> None:
        """Relay one TTS page at most ``BRIDGE_PLAYBACK_LEAD_S`` ahead of real time.

        Pacing keeps the client's buffer short, so that stopping the relay stops what the user hears.
        """
        if self._closing or self._ended:
            raise TtsSkipped(R_CLOSED, "the session is closing")
        now = time.monotonic()
        if not started:
            started.append(now)
        end_s = ogg_end_s(page)
        if end_s is not None:
            wait = started[0] + end_s - self._s.playback_lead_s - now
            if wait > 0:
                await asyncio.sleep(wait)  # a barge-in cancels it
        if agent.interrupted:
            raise asyncio.CancelledError
        self._metrics.count("bridge_tts_frames_total")
        await self._emit(bytes((p.KIND_AUDIO,)) + page)

    async def _interrupt(self, agent: _Agent, reason: str) -> None:
        """Stop the reply being spoken (if any): no audio of it is queued after this."""
        playback = agent.playback
        if playback is None or playback.done() or agent.interrupted:
            return
        agent.interrupted = True
        playback.cancel()
        if reason == "barge_in":
            self._metrics.count("bridge_barge_in_total")
            if agent.voiced_since is not None:
                self._metrics.observe("bridge_barge_in_seconds", time.monotonic() - agent.voiced_since)
        log.info("session %s: reply interrupted (%s)", self.id, reason)
        await self._emit(p.tts_interrupted(reason))

    # --- voice ---

    async def _start_voice(self, mode: p.VoiceMode | None) -> None:
        svc = self._svc
        if self._voice is not None:
            await self._error(p.E_BAD_STATE, "a voice session is already active")
            return
        if svc.draining:
            await self._voice_unavailable("draining", "the bridge is shutting down")
            return
        if mode is None:
            mode = "agent" if self._s.asr_url else "duplex"
        if mode == "agent":
            await self._start_agent()
        else:
            await self._start_duplex()

    async def _voice_unavailable(self, reason: str, message: str) -> None:
        self._metrics.count("bridge_voice_sessions_total", reason)
        await self._emit(p.voice_unavailable(reason, message))

    async def _stop_voice(self) -> None:
        voice = self._voice
        if voice is None:
            await self._error(p.E_BAD_STATE, "no voice session is active")
            return
        await self._finish_voice(voice, lost=False, reason="voice_stop")
        await self._emit(p.voice_stopped())

    async def _finish_voice(self, voice: _Voice, *, lost: bool, reason: str) -> None:
        if isinstance(voice, _Agent):
            await self._finish_agent(voice, lost=lost, reason=reason)
        else:
            await self._finish_duplex(voice, lost=lost, reason=reason)

    # --- agent voice: the STT ---

    async def _start_agent(self) -> None:
        svc = self._svc
        try:
            stream = await svc.asr.open()
        except AsrUnavailable as exc:
            self._metrics.count("bridge_asr_sessions_total", exc.reason)
            log.info("session %s: no STT: %s", self.id, exc.message)
            await self._voice_unavailable(exc.reason, exc.message)
            return
        if self._ended or self._voice is not None:  # the session ended (or raced) meanwhile
            await stream.close()
            return
        agent = _Agent(stream, TurnDetector(self._turn_settings))
        self._voice = agent
        agent.relay = asyncio.create_task(self._asr_relay(agent), name=f"asr-{self.id}")
        self._relays.add(agent.relay)
        agent.relay.add_done_callback(self._relays.discard)
        self._metrics.count("bridge_asr_sessions_total", "ready")
        self._metrics.count("bridge_voice_sessions_total", "ready")
        log.info("session %s: agent voice on %s", self.id, stream.url)
        await self._emit(p.voice_ready(stream.url, "agent"))

    async def _to_asr(self, agent: _Agent, ogg: bytes) -> None:
        """Decode one client frame and send its 80 ms chunks to the STT."""
        try:
            pcm = agent.decoder.decode(ogg)
        except BadAudio as exc:
            await self._error(p.E_BAD_AUDIO, f"audio frames must be 0x01 + Ogg/Opus: {exc}")
            return
        chunks = agent.chunker.push(pcm)
        if not chunks:
            return
        try:
            async with agent.send_lock:
                for chunk in chunks:
                    level = level_dbfs(chunk)
                    agent.turns.audio(CHUNK_S, level)
                    if level > self._s.asr_silence_dbfs:
                        if agent.voiced_since is None:
                            agent.voiced_since = time.monotonic()
                    else:
                        agent.voiced_since = None
                    if agent.unanswered_since is None:
                        agent.unanswered_since = time.monotonic()
                    await agent.stream.send_audio(chunk)  # bounded by the stall watchdog
                    self._metrics.count("bridge_asr_audio_seconds_total", None, CHUNK_S)
        except AsrLost as exc:
            await self._finish_agent(agent, lost=True, reason=str(exc))

    async def _asr_relay(self, agent: _Agent) -> None:
        try:
            await self._asr_events(agent)
            reason = "the STT stream ended"  # not reached: _asr_events only returns by raising
        except AsrLost as exc:
            reason = str(exc)
        except asyncio.CancelledError:
            if not agent.stalled:
                raise
            _uncancel()
            reason = agent.stall_reason
        await self._finish_agent(agent, lost=True, reason=reason)

    async def _asr_events(self, agent: _Agent) -> None:
        turns = agent.turns
        metrics = self._metrics
        while True:
            event = await agent.stream.receive()  # bounded by the stall watchdog
            agent.unanswered_since = None
            if isinstance(event, Step):
                metrics.count("bridge_asr_messages_total", "step")
                turns.step(event.prs)
                if agent.playback is not None:
                    if turns.barge_in():
                        await self._interrupt(agent, "barge_in")
                elif agent.flush_marker is None and turns.turn_ended():
                    await self._flush_turn(agent)
            elif isinstance(event, Word):
                metrics.count("bridge_asr_messages_total", "word")
                if not event.text.strip():
                    continue
                turns.word(event.text)
                await self._emit(p.transcript(event.text.strip(), False))
                if agent.playback is not None and turns.barge_in():
                    await self._interrupt(agent, "barge_in")
            elif isinstance(event, Marker):
                metrics.count("bridge_asr_messages_total", "marker")
                if event.id == agent.flush_marker:
                    metrics.observe("bridge_turn_flush_seconds", time.monotonic() - agent.flush_started)
                    agent.flush_marker = None
                    await self._end_turn(agent)
            else:
                metrics.count("bridge_asr_messages_total", "end_word")

    async def _flush_turn(self, agent: _Agent) -> None:
        """The user's turn ended: send a Marker, then ``BRIDGE_ASR_FLUSH_S`` of silence.

        The STT's words lag its audio by its text delay; it returns a Marker once the audio before it
        has been processed *and* that delay has passed (Kyutai's servers and ours), which the silence
        after it provides. The words that arrive before the Marker complete the turn.
        """
        marker = agent.next_marker
        agent.next_marker += 1
        agent.flush_marker = marker
        agent.flush_started = time.monotonic()
        log.debug("session %s: end of turn detected (pause %.2f), flushing", self.id, agent.turns.pause)
        zeros = silence()
        frames = math.ceil(self._s.asr_flush_s / CHUNK_S - 1e-9) + 1  # one frame of margin, as Unmute
        async with agent.send_lock:
            await agent.stream.send_marker(marker)
            for _ in range(frames):
                await agent.stream.send_audio(zeros)
                agent.turns.audio(CHUNK_S, -math.inf)
                self._metrics.count("bridge_asr_audio_seconds_total", None, CHUNK_S)

    async def _end_turn(self, agent: _Agent) -> None:
        text = agent.turns.take_turn()
        if not text or self._ended:
            self._metrics.count("bridge_voice_turns_total", "empty")
            return
        self._metrics.count("bridge_voice_turns_total", "sent")
        await self._emit(p.transcript(text, True))
        await self._queue_turn(_Turn(text, "voice"))

    async def _finish_agent(self, agent: _Agent, *, lost: bool, reason: str) -> None:
        """End agent voice. Idempotent; safe from the relay. The words of an unfinished turn are
        posted (on ``voice_stop`` and on a lost STT); a reply being spoken stops on ``voice_stop``
        and goes on when only the STT was lost."""
        if agent.ended:
            return
        agent.ended = True
        if self._voice is agent:
            self._voice = None
        if lost:
            self._svc.asr.lost(reason)
            self._metrics.count("bridge_degraded_total", "asr")
            self._metrics.count("bridge_asr_sessions_total", "lost")
            log.warning("session %s: lost the STT: %s", self.id, reason)
            await self._emit(
                p.degraded("asr", "backend_lost", f"the STT is gone ({reason}); text still works")
            )
        else:
            log.info("session %s: agent voice ended (%s)", self.id, reason)
            if not self._ended:
                await self._interrupt(agent, "voice_stopped")
        agent.flush_marker = None
        if not self._ended:
            await self._end_turn(agent)
        if agent.relay is not None and agent.relay is not asyncio.current_task():
            await cancel_and_wait([agent.relay])
        await agent.stream.close()
        if self._svc.draining:
            self._svc.idle_changed.set()

    # --- duplex voice: Moshi ---

    async def _start_duplex(self) -> None:
        svc = self._svc
        tried: set[str] = set()
        busy = False
        while (backend := svc.pool.acquire(frozenset(tried))) is not None:
            tried.add(backend.url)
            try:
                link = await moshi.connect(
                    svc.http, backend, self._s.moshi_connect_timeout_s, self._s.hard_frame_bytes
                )
            except BaseException as exc:  # on cancellation too, the backend must go back
                svc.pool.release(backend)
                if not isinstance(exc, moshi.MoshiConnectFailed):
                    raise
                busy = busy or exc.busy
                if not exc.busy:
                    svc.pool.mark_down(backend, exc.reason)
                log.info("session %s: moshi %s: %s", self.id, backend.url, exc.reason)
                continue
            voice = _Duplex(link)
            self._voice = voice
            self._utterance.clear()
            self._utterance_chars = 0
            self._frames_since_text = 0
            voice.relay = asyncio.create_task(self._moshi_relay(voice), name=f"moshi-{self.id}")
            self._relays.add(voice.relay)
            voice.relay.add_done_callback(self._relays.discard)
            svc.metrics.count("bridge_voice_sessions_total", "ready")
            log.info("session %s: voice on %s", self.id, backend.url)
            await self._emit(p.voice_ready(backend.url, "duplex"))
            return
        if not svc.pool.backends:
            await self._voice_unavailable("no_backend", "no Moshi backend is configured")
        elif busy or svc.pool.summary() == "busy":
            await self._voice_unavailable("busy", "every Moshi backend is in a conversation")
        else:
            await self._voice_unavailable("down", "no Moshi backend is up")

    async def _finish_duplex(self, voice: _Duplex, *, lost: bool, reason: str) -> None:
        """End ``voice``: the backend goes back to the pool at once. Idempotent; safe from the relay."""
        if voice.ended:
            return
        voice.ended = True
        if self._voice is voice:
            self._voice = None
        pool = self._svc.pool
        backend = voice.link.backend
        pool.release(backend)
        if lost:
            pool.mark_down(backend, reason)
            self._metrics.count("bridge_degraded_total", "moshi")
            log.warning("session %s: lost moshi %s: %s", self.id, backend.url, reason)
            await self._emit(
                p.degraded("moshi", "backend_lost", f"Moshi is gone ({reason}); text still works")
            )
        else:
            log.info("session %s: voice ended (%s)", self.id, reason)
        await self._flush_utterance()
        if voice.relay is not None and voice.relay is not asyncio.current_task():
            await cancel_and_wait([voice.relay])
        await voice.link.close()
        if self._svc.draining:
            self._svc.idle_changed.set()

    async def _moshi_relay(self, voice: _Duplex) -> None:
        try:
            reason = await voice.link.relay(self._from_moshi)
        except asyncio.CancelledError:
            if not voice.stalled:
                raise
            _uncancel()
            reason = f"Moshi answered nothing for {self._s.moshi_stall_s:g} s"
        await self._finish_duplex(voice, lost=True, reason=reason)

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
            if not self._s.duplex_moshi_to_mas:
                return  # Moshi's own words: never posted to MAS as the user's
            self._utterance.append(piece)
            self._utterance_chars += len(piece)
            self._frames_since_text = 0
            if piece.rstrip().endswith(_SENTENCE_END) or self._utterance_chars >= _UTTERANCE_MAX_CHARS:
                await self._flush_utterance()

    async def _flush_utterance(self) -> None:
        """Post Moshi's last utterance to MAS, labelled as the assistant's speech (only with
        ``BRIDGE_DUPLEX_MOSHI_TO_MAS``; otherwise nothing is ever gathered)."""
        text = "".join(self._utterance).strip()
        self._utterance.clear()
        self._utterance_chars = 0
        if text and not self._ended:
            await self._queue_turn(_Turn(text, "assistant_speech"))


def _uncancel() -> None:
    """Forget a cancellation this task has handled itself (the watchdog's), on Pythons that count them."""
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
