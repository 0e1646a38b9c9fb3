"""What a session's parts share: the bridge-wide services, a MAS turn, and the session seen by its voice.

The voice modes (:mod:`.agent`, :mod:`.duplex`) talk to their session only through :class:`Host`, so
that each lives in a module of its own and the session (:mod:`.session`) stays the client's state
machine: its frames, its writer, its turns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from . import protocol as p
from .asr import AsrClient
from .config import Settings
from .mas import MasClient
from .metrics import Metrics
from .pool import MoshiPool
from .tts import TtsClient


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
class Turn:
    text: str
    source: p.Source


class Host(Protocol):
    """The session, as its voice mode sees it."""

    id: str
    svc: Services

    @property
    def ended(self) -> bool:
        """The session is over (no more events are delivered)."""

    @property
    def closing(self) -> bool:
        """The session is closing (events already queued are still written)."""

    async def emit(self, item: str | bytes | dict[str, object]) -> None:
        """Queue a frame (a dict: a JSON event) for the client."""

    async def error(self, code: str, message: str, **extra: object) -> None:
        """Send an ``error`` event."""

    async def queue_turn(self, turn: Turn) -> None:
        """Queue a MAS turn (``busy`` when the queue is full)."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task the session cancels and awaits when it ends."""

    def voice_started(self, voice: object) -> None:
        """``voice`` is the session's voice from now on (set before its relay starts)."""

    def voice_ended(self, voice: object) -> None:
        """``voice`` is over: the session forgets it (if it is still the session's voice)."""
