"""Duplex voice: the client's audio relayed to a chat backend (Moshi, PersonaPlex), its audio and words back.

Moshi's words are its own, never the user's: they are not posted to MAS as turns. With
``BRIDGE_DUPLEX_MOSHI_TO_MAS`` they are gathered into utterances and posted as the assistant's speech.
A PersonaPlex backend gets the session's voice and text prompts as the query of ``/api/chat``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from . import moshi
from . import protocol as p
from .aio import cancel_and_wait, uncancel
from .prompts import Prompts
from .services import Host, Turn

log = logging.getLogger("personaplex_bridge.session")

FRAME_S = 0.08  # one Moshi frame
_UTTERANCE_MAX_CHARS = 1000
_SENTENCE_END = (".", "!", "?", "…")


class DuplexVoice:
    """Voice relayed to one backend of the pool, for one session."""

    mode: p.VoiceMode = "duplex"

    def __init__(self, host: Host, link: moshi.MoshiLink) -> None:
        self._host = host
        self._svc = host.svc
        self.link = link
        self.relay: asyncio.Task[None] | None = None
        self.ended = False
        self.stalled = False
        self._utterance: list[str] = []
        self._utterance_chars = 0
        self._frames_since_text = 0
        self._gap_frames = max(1, round(self._svc.settings.utterance_gap_s / FRAME_S))

    @property
    def backend_url(self) -> str:
        return self.link.backend.url

    @classmethod
    async def start(cls, host: Host, prompts: Prompts) -> DuplexVoice | None:
        """Take a backend (the pool's best), connect, and answer ``voice_ready`` or ``voice_unavailable``."""
        svc = host.svc
        s = svc.settings
        opened = await moshi.connect_best(
            svc.pool,
            svc.http,
            s.moshi_connect_timeout_s,
            s.hard_frame_bytes,
            prompts.query(),
            s.moshi_key,
            f"session {host.id}: moshi",
        )
        if opened.refused is not None:
            await _unavailable(host, "prompt_refused", opened.refused)
            return None
        busy = opened.busy
        if (link := opened.link) is not None and (backend := opened.backend) is not None:
            if host.ended:
                svc.pool.release(backend)
                await link.close()
                return None
            voice = cls(host, link)
            host.voice_started(voice)
            voice.relay = host.spawn(voice._relay(), f"moshi-{host.id}")
            svc.metrics.count("bridge_voice_sessions_total", "ready")
            log.info("session %s: voice on %s", host.id, backend.url)
            await host.emit(p.voice_ready(backend.url, "duplex"))
            return voice
        if not svc.pool.backends:
            await _unavailable(host, "no_backend", "no Moshi backend is configured")
        elif busy or svc.pool.summary() == "busy":
            await _unavailable(host, "busy", "every Moshi backend is in a conversation")
        else:
            await _unavailable(host, "down", "no Moshi backend is up")
        return None

    async def on_audio(self, data: bytes) -> None:
        """A client ``0x01`` frame, relayed unchanged."""
        link = self.link
        if link.unanswered_since is None:
            link.unanswered_since = time.monotonic()
        try:
            await link.send(data)  # bounded by the stall watchdog
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            await self.finish(lost=True, reason=f"sending to Moshi failed ({type(exc).__name__})")

    def watchdog(self, now: float) -> None:
        if self.stalled or self.relay is None:
            return
        since = self.link.unanswered_since
        if since is not None and now - since > self._svc.settings.moshi_stall_s:
            self.stalled = True
            self.relay.cancel()

    async def finish(self, *, lost: bool, reason: str) -> None:
        """End the voice: the backend goes back to the pool at once. Idempotent; safe from the relay."""
        if self.ended:
            return
        self.ended = True
        host = self._host
        host.voice_ended(self)
        pool = self._svc.pool
        backend = self.link.backend
        pool.release(backend)
        if lost:
            pool.mark_down(backend, reason)
            self._svc.metrics.count("bridge_degraded_total", "moshi")
            log.warning("session %s: lost moshi %s: %s", host.id, backend.url, reason)
            await host.emit(
                p.degraded("moshi", "backend_lost", f"Moshi is gone ({reason}); text still works")
            )
        else:
            log.info("session %s: voice ended (%s)", host.id, reason)
        await self._flush_utterance()
        if self.relay is not None and self.relay is not asyncio.current_task():
            await cancel_and_wait([self.relay])
        await self.link.close()
        if self._svc.draining:
            self._svc.idle_changed.set()

    async def _relay(self) -> None:
        try:
            reason = await self.link.relay(self._from_moshi)
        except asyncio.CancelledError:
            if not self.stalled:
                raise
            uncancel()
            reason = f"Moshi answered nothing for {self._svc.settings.moshi_stall_s:g} s"
        await self.finish(lost=True, reason=reason)

    async def _from_moshi(self, data: bytes) -> None:
        if not data:
            return
        host = self._host
        metrics = self._svc.metrics
        kind = data[0]
        if kind == p.KIND_AUDIO:
            metrics.count("bridge_moshi_frames_total", "audio")
            await host.emit(data)
            self._frames_since_text += 1
            if self._utterance and self._frames_since_text >= self._gap_frames:
                await self._flush_utterance()
        elif kind == p.KIND_TEXT:
            metrics.count("bridge_moshi_frames_total", "text")
            piece = data[1:].decode("utf-8", "replace")
            await host.emit(p.moshi_text(piece))
            if not self._svc.settings.duplex_moshi_to_mas:
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
        if text and not self._host.ended:
            await self._host.queue_turn(Turn(text, "assistant_speech"))


async def _unavailable(host: Host, reason: str, message: str) -> None:
    host.svc.metrics.count("bridge_voice_sessions_total", reason)
    await host.emit(p.voice_unavailable(reason, message))
