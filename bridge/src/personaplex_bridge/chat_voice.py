"""The chat reply voice: MAS's replies spoken by the session's own chat slot (our engine's say channel).

The session holds one ``/api/chat`` conversation on an engine backend, opened with ``say_after=hold``
(speaker-only: outside a reply the model's words are held to PAD) and the session's voice and text
prompts. It is fed the user's audio frames (the engine steps one model frame per user frame), so its
own barge-in signal hears the user. Protocol (the engine's say channel):

* client to engine: ``0x02`` + UTF-8 text = say this; ``0x04`` + ``{"say":"cancel"}`` = stop at the end
  of the current word;
* engine to client: ``0x04`` + JSON ``say_start {id, text, words, dropped}``, ``say_word {id, index,
  word}``, ``say_end {id, spoken, reason}`` (``done``, ``cancelled``, ``barge_in``, ``replaced``);
  ``0x05`` + message for a refused ``0x02`` (bad UTF-8, empty, too long, queue full); ``0x01`` audio
  every step, ``0x02`` text pieces.

The engine's audio is one Ogg stream for the whole conversation; it is decoded here continuously and
each reply is re-encoded as a fresh Ogg stream (headers first), as a TTS reply is, so that a client's
player treats both voices alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import sphn

from . import moshi
from . import protocol as p
from .aio import timeout
from .audio import SAMPLE_RATE

log = logging.getLogger("personaplex_bridge.chat_voice")

SAY_CANCEL = bytes((p.KIND_METADATA,)) + b'{"say":"cancel"}'
SAY_REASONS = ("done", "cancelled", "barge_in", "replaced")


class SayFailed(Exception):
    """A reply the chat voice could not speak. ``refused``: the engine refused the text (``0x05``),
    the connection is fine; else the connection is lost. ``spoke``: some of its audio was relayed."""

    def __init__(self, message: str, *, refused: bool, spoke: bool) -> None:
        super().__init__(message)
        self.message = message
        self.refused = refused
        self.spoke = spoke


@dataclass(frozen=True)
class SayResult:
    id: int
    spoken: str
    reason: str


@dataclass(eq=False)
class _Say:
    items: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    id: int | None = None
    orphaned: bool = False  # its speaker was cancelled (barge-in, voice_stop): report the end only


def parse_metadata(payload: bytes) -> dict[str, Any] | None:
    """A ``0x04`` payload as a JSON object with a string ``type``, or ``None``."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return None
    return obj


class ChatVoice:
    """One engine conversation speaking one session's replies."""

    def __init__(
        self,
        link: moshi.MoshiLink,
        on_spoken: Callable[[SayResult], Awaitable[None]],
        step_timeout_s: float,
        max_s: float,
    ) -> None:
        self.link = link
        self._on_spoken = on_spoken
        self._step_s = step_timeout_s
        self._max_s = max_s
        self._decoder = sphn.OpusStreamReader(SAMPLE_RATE)
        self._say: _Say | None = None
        self.lost: str | None = None  # why the connection ended

    @property
    def url(self) -> str:
        return self.link.backend.url

    @property
    def unanswered_since(self) -> float | None:
        return self.link.unanswered_since

    async def feed(self, data: bytes) -> None:
        """A client ``0x01`` frame (the user's audio), relayed unchanged. Raises on a lost connection
        (ConnectionError, RuntimeError or aiohttp.ClientError); bounded by the session's watchdog."""
        if self.link.unanswered_since is None:
            self.link.unanswered_since = time.monotonic()
        await self.link.send(data)

    async def relay(self) -> str:
        """Read the engine until the connection ends; returns why. Wakes a reply waiting on it."""
        reason = await self.link.relay(self._on_frame)
        self.lost = reason
        say = self._say
        if say is not None:
            say.items.put_nowait(("lost", reason))
        return reason

    async def _on_frame(self, data: bytes) -> None:
        if not data:
            return
        kind, payload = data[0], data[1:]
        say = self._say
        if kind == p.KIND_AUDIO:
            pcm = np.asarray(self._decoder.append_bytes(payload), dtype=np.float32).reshape(-1)
            if say is not None and say.id is not None and not say.orphaned and pcm.size:
                say.items.put_nowait(("pcm", pcm))
        elif kind == p.KIND_METADATA:
            meta = parse_metadata(payload)
            if meta is not None:
                await self._on_metadata(meta)
        elif kind == p.KIND_ERROR:
            message = payload[:300].decode("utf-8", "replace")
            if say is not None and say.id is None:
                say.items.put_nowait(("refused", message))
            else:
                log.info("chat voice %s reported: %s", self.url, message)
        # 0x02 text pieces: the forced words (or PAD, held); the say_word events say the same.

    async def _on_metadata(self, meta: dict[str, Any]) -> None:
        say = self._say
        kind = meta["type"]
        ident = meta.get("id")
        if kind == "say_start" and say is not None and say.id is None and isinstance(ident, int):
            say.id = ident
            say.items.put_nowait(("start", meta))
        elif kind == "say_end" and isinstance(ident, int):
            reason = meta.get("reason")
            spoken = meta.get("spoken")
            result = SayResult(
                ident,
                spoken if isinstance(spoken, str) else "",
                reason if reason in SAY_REASONS else "done",
            )
            if say is not None and say.id == ident and not say.orphaned:
                say.items.put_nowait(("end", result))
            else:
                if say is not None and say.id == ident:
                    self._say = None
                await self._on_spoken(result)

    async def say(self, text: str, on_audio: Callable[[bytes], Awaitable[None]]) -> SayResult:
        """Speak ``text``; ``on_audio`` gets each page of a fresh Ogg stream. Returns how it ended.

        Raises :class:`SayFailed`. Cancelled (a barge-in): the engine is told to stop at the end of the
        word (:meth:`cancel` is the caller's), and its ``say_end`` is reported through ``on_spoken``.
        """
        if self.lost is not None:
            raise SayFailed(f"the chat backend is gone ({self.lost})", refused=False, spoke=False)
        say = _Say()
        self._say = say
        writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        spoke = False
        deadline = time.monotonic() + self._max_s
        try:
            try:
                await self.link.send(bytes((p.KIND_TEXT,)) + text.encode("utf-8"))
            except (ConnectionError, RuntimeError, OSError, aiohttp.ClientError) as exc:
                raise SayFailed(
                    f"sending to the chat backend failed ({type(exc).__name__})", refused=False, spoke=False
                ) from None
            while True:
                wait = min(self._step_s, deadline - time.monotonic())
                if wait <= 0:
                    await self.cancel()
                    raise SayFailed(
                        f"the reply took longer than {self._max_s:g} s", refused=True, spoke=spoke
                    )
                try:
                    async with timeout(wait):
                        kind, value = await say.items.get()
                except asyncio.TimeoutError:
                    what = "started the reply" if say.id is None else "sent audio"
                    raise SayFailed(
                        f"the chat backend has not {what} for {wait:.1f} s", refused=False, spoke=spoke
                    ) from None
                if kind == "pcm":
                    page = bytes(writer.append_pcm(value))
                    if page:
                        spoke = True
                        await on_audio(page)
                elif kind == "end":
                    assert isinstance(value, SayResult)
                    return value
                elif kind == "refused":
                    raise SayFailed(f"the chat backend refused the reply: {value}", refused=True, spoke=False)
                elif kind == "lost":
                    raise SayFailed(f"the chat backend is gone ({value})", refused=False, spoke=spoke)
                # "start": the reply's audio follows
        except asyncio.CancelledError:
            self.orphan()
            raise
        finally:
            if self._say is say and not say.orphaned:
                self._say = None

    def orphan(self) -> SayResult | None:
        """The reply's speaker is being stopped (call before cancelling it): its ``say_end`` goes to
        ``on_spoken`` from now on; one that already arrived, unread, is returned instead."""
        say = self._say
        if say is None or say.orphaned:
            return None
        say.orphaned = True
        ended: SayResult | None = None
        while not say.items.empty():
            kind, value = say.items.get_nowait()
            if kind == "end":
                ended = value
        if ended is not None or say.id is None:
            self._say = None
        return ended

    def abort(self, reason: str) -> None:
        """The session gives the connection up: a reply waiting on it fails at once."""
        self.lost = self.lost or reason
        say = self._say
        if say is not None:
            say.items.put_nowait(("lost", reason))

    async def cancel(self) -> None:
        """Ask the engine to stop the reply at the end of the current word (and drop its queue)."""
        try:
            async with timeout(2.0):
                await self.link.send(SAY_CANCEL)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError, OSError, aiohttp.ClientError):
            pass

    async def close(self) -> None:
        await self.link.close()
