"""Agent voice: the user's audio to the STT, turn-taking, and MAS's replies spoken into the same stream.

The client's audio is decoded and streamed to the STT (:mod:`.asr`); its words come back as
``transcript`` events; :mod:`.turns` decides when the user's turn ends (the turn is then posted to MAS
with ``source:"voice"``) and when the user barges in on a reply (the playback stops,
``tts_interrupted``). Replies are spoken by the **reply voice**: the TTS (:mod:`.tts`), or ``chat``, the
session's own slot on an engine chat backend (:mod:`.chat_voice`, PersonaPlex's voice), which falls
back to the TTS (event ``reply_voice_fallback``) when it is down, full, refuses a reply or is lost.
Either way a reply is paced to real time, at most ``BRIDGE_PLAYBACK_LEAD_S`` ahead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import aiohttp

from . import moshi
from . import protocol as p
from .aio import cancel_and_wait, uncancel
from .asr import AsrLost, AsrStream, AsrUnavailable, Marker, Step, Word
from .audio import CHUNK_S, BadAudio, Chunker, OpusDecoder, level_dbfs, ogg_end_s, silence
from .chat_voice import ChatVoice, SayFailed, SayResult
from .prompts import Prompts, ReplyVoice
from .services import Host, Turn
from .tts import R_CLOSED, R_EMPTY, R_ERROR, TtsSkipped
from .turns import TurnDetector, TurnSettings

log = logging.getLogger("personaplex_bridge.session")

T = TypeVar("T")

CHAT_QUERY = {"say_after": "hold"}  # speaker-only: the model says MAS's words and nothing else


def turn_settings(host: Host) -> TurnSettings:
    s = host.svc.settings
    return TurnSettings(
        pause_threshold=s.asr_pause_threshold,
        pause_head=s.asr_pause_head,
        min_silence_s=s.asr_min_silence_s,
        silence_dbfs=s.asr_silence_dbfs,
        barge_in_threshold=s.asr_barge_in_threshold,
    )


class AgentVoice:
    """One session's agent voice: its STT stream, its turn detector, its reply voice."""

    mode: p.VoiceMode = "agent"

    def __init__(self, host: Host, stream: AsrStream) -> None:
        self._host = host
        self._svc = host.svc
        self._s = host.svc.settings
        self._metrics = host.svc.metrics
        self.stream = stream
        self.turns = TurnDetector(turn_settings(host))
        self.decoder = OpusDecoder()
        self.chunker = Chunker()
        self.send_lock = asyncio.Lock()  # keeps a flush's messages together
        self.relay: asyncio.Task[None] | None = None
        self.ended = False
        self.stalled = False
        self.stall_reason = ""
        self.unanswered_since: float | None = None  # audio sent and no STT message since
        self.flush_marker: int | None = None  # the Marker that ends the turn being flushed
        self.flush_started = 0.0
        self.next_marker = 1
        self.voiced_since: float | None = None  # wall time of the first loud chunk of the current run
        self.playback: asyncio.Task[None] | None = None  # the reply being spoken
        self.interrupted = False
        self.chat: ChatVoice | None = None  # the chat reply voice, while it works
        self._chat_relay: asyncio.Task[None] | None = None
        self._chat_stalled = False
        self._playing_chat = False

    @property
    def reply_voice(self) -> ReplyVoice:
        return "chat" if self.chat is not None else "tts"

    # --- start and end ---

    @classmethod
    async def start(cls, host: Host, prompts: Prompts, reply_voice: ReplyVoice) -> AgentVoice | None:
        svc = host.svc
        metrics = svc.metrics
        try:
            stream = await svc.asr.open()
        except AsrUnavailable as exc:
            metrics.count("bridge_asr_sessions_total", exc.reason)
            log.info("session %s: no STT: %s", host.id, exc.message)
            metrics.count("bridge_voice_sessions_total", exc.reason)
            await host.emit(p.voice_unavailable(exc.reason, exc.message))
            return None
        agent = cls(host, stream)
        fallback: tuple[str, str] | None = None
        if reply_voice == "chat" and not host.ended:
            fallback = await agent._open_chat(prompts)
        if host.ended:  # the session ended meanwhile
            await agent._close_chat()
            await stream.close()
            return None
        host.voice_started(agent)
        agent.relay = host.spawn(agent._asr_relay(), f"asr-{host.id}")
        metrics.count("bridge_asr_sessions_total", "ready")
        metrics.count("bridge_voice_sessions_total", "ready")
        log.info("session %s: agent voice on %s, replies by %s", host.id, stream.url, agent.reply_voice)
        await host.emit(p.voice_ready(stream.url, "agent", reply_voice=agent.reply_voice))
        if fallback is not None:
            await agent._fallback(fallback[0], fallback[1], "session")
        return agent

    async def _open_chat(self, prompts: Prompts) -> tuple[str, str] | None:
        """Open the chat reply voice; ``(reason, message)`` when it cannot be had (the TTS speaks)."""
        host, svc, s = self._host, self._svc, self._s
        query = {**prompts.query(), **CHAT_QUERY}
        opened = await moshi.connect_best(
            svc.pool,
            svc.http,
            s.moshi_connect_timeout_s,
            s.hard_frame_bytes,
            query,
            s.moshi_key,
            f"session {host.id}: chat voice",
            engine_only=True,
        )
        if opened.refused is not None:
            return "prompt_refused", opened.refused
        busy = opened.busy
        if (link := opened.link) is not None:
            self.chat = ChatVoice(link, self._on_spoken, s.tts_timeout_s, s.tts_max_s)
            self._chat_relay = host.spawn(self._run_chat_relay(self.chat), f"chat-{host.id}")
            self._metrics.count("bridge_chat_voice_sessions_total", "ready")
            return None
        if not any(b.kind == "engine" for b in svc.pool.backends):
            return "no_backend", "no engine chat backend is known (BRIDGE_MOSHI_URLS, our engine's /api/chat)"
        if busy or svc.pool.summary(engine_only=True) == "busy":
            return "busy", "every engine chat backend is full"
        return "down", "no engine chat backend is up"

    async def _fallback(self, reason: str, message: str, scope: Literal["session", "reply"]) -> None:
        if scope == "session":
            self._metrics.count("bridge_chat_voice_sessions_total", reason)
        self._metrics.count("bridge_reply_voice_fallback_total", reason)
        log.info("session %s: replies by the TTS (%s, %s): %s", self._host.id, scope, reason, message)
        await self._host.emit(p.reply_voice_fallback(reason, message, scope))

    async def _run_chat_relay(self, chat: ChatVoice) -> None:
        try:
            reason = await chat.relay()
        except asyncio.CancelledError:
            if not self._chat_stalled:
                raise
            uncancel()
            reason = f"the chat backend answered nothing for {self._s.moshi_stall_s:g} s"
            chat.lost = reason
        await self._chat_lost(chat, reason)

    async def _chat_lost(self, chat: ChatVoice, reason: str) -> None:
        if self.chat is not chat:
            return
        self.chat = None
        pool = self._svc.pool
        pool.release(chat.link.backend)
        pool.mark_down(chat.link.backend, reason)
        log.warning("session %s: lost the chat voice %s: %s", self._host.id, chat.url, reason)
        if not self.ended and not self._host.ended:
            await self._fallback("backend_lost", f"the chat backend is gone ({reason})", "session")
        await chat.close()

    async def _close_chat(self) -> None:
        chat, self.chat = self.chat, None
        if chat is None:
            return
        chat.abort("the voice session ended")
        self._svc.pool.release(chat.link.backend)
        if self._chat_relay is not None and self._chat_relay is not asyncio.current_task():
            await cancel_and_wait([self._chat_relay])
        await chat.close()

    async def finish(self, *, lost: bool, reason: str) -> None:
        """End agent voice. Idempotent; safe from the relay. The words of an unfinished turn are
        posted (on ``voice_stop`` and on a lost STT); a reply being spoken stops on ``voice_stop``
        and goes on when only the STT was lost."""
        if self.ended:
            return
        self.ended = True
        host = self._host
        host.voice_ended(self)
        if lost:
            self._svc.asr.lost(reason)
            self._metrics.count("bridge_degraded_total", "asr")
            self._metrics.count("bridge_asr_sessions_total", "lost")
            log.warning("session %s: lost the STT: %s", host.id, reason)
            await host.emit(
                p.degraded("asr", "backend_lost", f"the STT is gone ({reason}); text still works")
            )
        else:
            log.info("session %s: agent voice ended (%s)", host.id, reason)
            if not host.ended:
                await self.interrupt("voice_stopped")
        self.flush_marker = None
        if not host.ended:
            await self._end_turn()
        if self.relay is not None and self.relay is not asyncio.current_task():
            await cancel_and_wait([self.relay])
        await self.stream.close()
        await self._close_chat()  # a reply it is speaking ends (the TTS speaks it if none was heard)
        if self._svc.draining:
            self._svc.idle_changed.set()

    def watchdog(self, now: float) -> None:
        s = self._s
        chat = self.chat
        if chat is not None and not self._chat_stalled and self._chat_relay is not None:
            since = chat.unanswered_since
            if since is not None and now - since > s.moshi_stall_s:
                self._chat_stalled = True
                self._chat_relay.cancel()
        if self.stalled or self.relay is None:
            return
        since = self.unanswered_since
        if since is not None and now - since > s.asr_timeout_s:
            self.stall_reason = f"the STT answered nothing for {s.asr_timeout_s:g} s"
        elif self.flush_marker is not None and now - self.flush_started > s.asr_timeout_s:
            self.stall_reason = f"the STT did not finish the turn within {s.asr_timeout_s:g} s"
        if self.stall_reason:
            self.stalled = True
            self.relay.cancel()

    # --- the user's audio ---

    async def on_audio(self, data: bytes) -> None:
        """A client ``0x01`` frame: decoded for the STT, relayed as is to the chat reply voice."""
        chat = self.chat
        if chat is not None:
            try:
                await chat.feed(data)  # bounded by the chat stall watchdog
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                await self._chat_lost(chat, f"sending to the chat backend failed ({type(exc).__name__})")
        await self._to_asr(data[1:])

    async def _to_asr(self, ogg: bytes) -> None:
        """Decode one client frame and send its 80 ms chunks to the STT."""
        try:
            pcm = self.decoder.decode(ogg)
        except BadAudio as exc:
            await self._host.error(p.E_BAD_AUDIO, f"audio frames must be 0x01 + Ogg/Opus: {exc}")
            return
        chunks = self.chunker.push(pcm)
        if not chunks:
            return
        try:
            async with self.send_lock:
                for chunk in chunks:
                    level = level_dbfs(chunk)
                    self.turns.audio(CHUNK_S, level)
                    if level > self._s.asr_silence_dbfs:
                        if self.voiced_since is None:
                            self.voiced_since = time.monotonic()
                    else:
                        self.voiced_since = None
                    if self.unanswered_since is None:
                        self.unanswered_since = time.monotonic()
                    await self.stream.send_audio(chunk)  # bounded by the stall watchdog
                    self._metrics.count("bridge_asr_audio_seconds_total", None, CHUNK_S)
        except AsrLost as exc:
            await self.finish(lost=True, reason=str(exc))

    # --- the STT's events: words, turns, barge-in ---

    async def _asr_relay(self) -> None:
        try:
            await self._asr_events()
            reason = "the STT stream ended"  # not reached: _asr_events only returns by raising
        except AsrLost as exc:
            reason = str(exc)
        except asyncio.CancelledError:
            if not self.stalled:
                raise
            uncancel()
            reason = self.stall_reason
        await self.finish(lost=True, reason=reason)

    async def _asr_events(self) -> None:
        turns = self.turns
        metrics = self._metrics
        host = self._host
        while True:
            event = await self.stream.receive()  # bounded by the stall watchdog
            self.unanswered_since = None
            if isinstance(event, Step):
                metrics.count("bridge_asr_messages_total", "step")
                turns.step(event.prs)
                if self.playback is not None:
                    if turns.barge_in():
                        await self.interrupt("barge_in")
                elif self.flush_marker is None and turns.turn_ended():
                    await self._flush_turn()
            elif isinstance(event, Word):
                metrics.count("bridge_asr_messages_total", "word")
                if not event.text.strip():
                    continue
                turns.word(event.text)
                await host.emit(p.transcript(event.text.strip(), False))
                if self.playback is not None and turns.barge_in():
                    await self.interrupt("barge_in")
            elif isinstance(event, Marker):
                metrics.count("bridge_asr_messages_total", "marker")
                if event.id == self.flush_marker:
                    metrics.observe("bridge_turn_flush_seconds", time.monotonic() - self.flush_started)
                    self.flush_marker = None
                    await self._end_turn()
            else:
                metrics.count("bridge_asr_messages_total", "end_word")

    async def _flush_turn(self) -> None:
        """The user's turn ended: send a Marker, then ``BRIDGE_ASR_FLUSH_S`` of silence.

        The STT's words lag its audio by its text delay; it returns a Marker once the audio before it
        has been processed *and* that delay has passed (Kyutai's servers and ours), which the silence
        after it provides. The words that arrive before the Marker complete the turn.
        """
        marker = self.next_marker
        self.next_marker += 1
        self.flush_marker = marker
        self.flush_started = time.monotonic()
        log.debug("session %s: end of turn detected (pause %.2f), flushing", self._host.id, self.turns.pause)
        zeros = silence()
        frames = math.ceil(self._s.asr_flush_s / CHUNK_S - 1e-9) + 1  # one frame of margin, as Unmute
        async with self.send_lock:
            await self.stream.send_marker(marker)
            for _ in range(frames):
                await self.stream.send_audio(zeros)
                self.turns.audio(CHUNK_S, -math.inf)
                self._metrics.count("bridge_asr_audio_seconds_total", None, CHUNK_S)

    async def _end_turn(self) -> None:
        text = self.turns.take_turn()
        if not text or self._host.ended:
            self._metrics.count("bridge_voice_turns_total", "empty")
            return
        self._metrics.count("bridge_voice_turns_total", "sent")
        await self._host.emit(p.transcript(text, True))
        await self._host.queue_turn(Turn(text, "voice"))

    # --- replies ---

    async def speak(self, text: str) -> None:
        """Speak a reply into the voice stream: paced to real time, cancelled by a barge-in."""
        metrics = self._metrics
        host = self._host
        if not text.strip():
            metrics.count("bridge_tts_turns_total", R_EMPTY)
            await host.emit(p.tts_skipped(R_EMPTY, "the reply is empty"))
            return
        chat = self.chat
        if chat is not None:
            try:
                result = await self._play(lambda on_audio: chat.say(text, on_audio), chat=True)
            except SayFailed as exc:
                if exc.spoke:  # part of it was heard: not said twice
                    metrics.count("bridge_tts_turns_total", R_ERROR)
                    await host.emit(p.tts_skipped(R_ERROR, exc.message))
                    return
                if exc.refused:
                    await self._fallback("refused", exc.message, "reply")
                elif chat.lost is None:  # alive, but it did not start (or go on with) the reply in time
                    await self._fallback("error", exc.message, "reply")
                # (a lost connection sends its own session-wide fallback)
            else:
                if result is not None:
                    await self._said(result)
                return
        try:
            await self._play(lambda on_audio: self._svc.tts.speak(text, on_audio), chat=False)
        except TtsSkipped as exc:
            metrics.count("bridge_tts_turns_total", exc.reason)
            await host.emit(p.tts_skipped(exc.reason, exc.message))

    async def _said(self, result: SayResult) -> None:
        host = self._host
        if result.reason == "barge_in":  # the engine heard the user first
            self._metrics.count("bridge_tts_turns_total", "interrupted")
            if not self.interrupted:
                self._metrics.count("bridge_barge_in_total")
                await host.emit(p.tts_interrupted("barge_in"))
            await host.emit(p.reply_spoken(result.spoken, result.reason))
            return
        await host.emit(p.reply_spoken(result.spoken, result.reason))
        self._metrics.count("bridge_tts_turns_total", "done")
        await host.emit(p.tts_done())

    async def _on_spoken(self, result: SayResult) -> None:
        """A reply whose speaker was stopped (a barge-in, voice_stop) ended in the engine."""
        if not self._host.ended:
            await self._host.emit(p.reply_spoken(result.spoken, result.reason))

    async def _play(
        self, speak: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[T]], *, chat: bool
    ) -> T | None:
        """Run ``speak`` as the cancellable playback; ``None`` when it was interrupted (the event was
        sent by whoever stopped it). Raises what ``speak`` raises."""
        self.interrupted = False
        self.turns.playback_started()
        started: list[float] = []

        async def on_audio(page: bytes) -> None:
            await self._paced_audio(page, started, chat)

        outcome: list[T] = []

        async def play() -> None:
            outcome.append(await speak(on_audio))

        playback = self._host.spawn(play(), f"playback-{self._host.id}")
        self.playback = playback
        self._playing_chat = chat
        try:
            await asyncio.wait([playback])
        except asyncio.CancelledError:
            playback.cancel()
            raise
        finally:
            if self.playback is playback:
                self.playback = None
        if playback.cancelled():
            self._metrics.count("bridge_tts_turns_total", "interrupted")
            return None
        exc = playback.exception()
        if exc is not None:
            raise exc
        if not chat:
            self._metrics.count("bridge_tts_turns_total", "done")
            await self._host.emit(p.tts_done())
        return outcome[0]

    async def _paced_audio(self, page: bytes, started: list[float], chat: bool) -> None:
        """Relay one reply page at most ``BRIDGE_PLAYBACK_LEAD_S`` ahead of real time.

        Pacing keeps the client's buffer short, so that stopping the relay stops what the user hears.
        """
        host = self._host
        if host.closing or host.ended:
            raise TtsSkipped(R_CLOSED, "the session is closing")
        now = time.monotonic()
        if not started:
            started.append(now)
        end_s = ogg_end_s(page)
        if end_s is not None:
            wait = started[0] + end_s - self._s.playback_lead_s - now
            if wait > 0:
                await asyncio.sleep(wait)  # a barge-in cancels it
        if self.interrupted:
            raise asyncio.CancelledError
        self._metrics.count("bridge_tts_frames_total")
        await host.emit(bytes((p.KIND_AUDIO,)) + page)

    async def interrupt(self, reason: str) -> None:
        """Stop the reply being spoken (if any): no audio of it is queued after this."""
        playback = self.playback
        if playback is None or playback.done() or self.interrupted:
            return
        self.interrupted = True
        chat = self.chat if self._playing_chat else None
        ended = chat.orphan() if chat is not None else None  # before the cancel: no say_end is lost
        playback.cancel()
        if chat is not None and ended is None:
            await chat.cancel()  # the engine stops at the end of the word; its say_end is reported
        if reason == "barge_in":
            self._metrics.count("bridge_barge_in_total")
            if self.voiced_since is not None:
                self._metrics.observe("bridge_barge_in_seconds", time.monotonic() - self.voiced_since)
        log.info("session %s: reply interrupted (%s)", self._host.id, reason)
        await self._host.emit(p.tts_interrupted(reason))
        if ended is not None:
            await self._on_spoken(ended)
