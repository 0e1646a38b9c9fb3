"""The pool of Moshi backends: their health, and who holds each one.

A Moshi server serves one conversation at a time, so a backend is handed to at most one session.
Health comes from a cheap probe: a plain HTTP ``GET`` on the websocket path answers 400 when the
server is up. A backend found down (by the probe, or by a session whose connection failed) is skipped
until a later probe finds it up again; no restart is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .protocol import MoshiSummary

log = logging.getLogger("personaplex_bridge.pool")


def probe_url(ws_url: str) -> str:
    """The HTTP URL answering the liveness probe for Moshi websocket URL ``ws_url``."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))


@dataclass
class MoshiBackend:
    url: str
    up: bool = False
    busy: bool = False
    reason: str = "not probed yet"
    changed_at: float = field(default_factory=time.time)
    sessions_total: int = 0

    def set_health(self, up: bool, reason: str) -> None:
        if up != self.up:
            log.info("moshi backend %s is %s (%s)", self.url, "up" if up else "down", reason)
            self.changed_at = time.time()
        self.up = up
        self.reason = reason

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": "up" if self.up else "down",
            "busy": self.busy,
            "reason": self.reason,
            "since": round(self.changed_at, 3),
            "sessions_total": self.sessions_total,
        }


class MoshiPool:
    def __init__(self, urls: tuple[str, ...], http: aiohttp.ClientSession, probe_timeout_s: float) -> None:
        self.backends = [MoshiBackend(url) for url in urls]
        self._http = http
        self._probe_timeout_s = probe_timeout_s
        self._next = 0

    def summary(self) -> MoshiSummary:
        """``up`` if a backend is free, ``busy`` if every live backend is taken, else ``down``."""
        live = [b for b in self.backends if b.up]
        if not live:
            return "down"
        return "up" if any(not b.busy for b in live) else "busy"

    def acquire(self, exclude: frozenset[str] = frozenset()) -> MoshiBackend | None:
        """Take a free backend that is up (round robin), or ``None``. Never hands out a busy one."""
        n = len(self.backends)
        for i in range(n):
            backend = self.backends[(self._next + i) % n]
            if backend.up and not backend.busy and backend.url not in exclude:
                backend.busy = True
                backend.sessions_total += 1
                self._next = (self._next + i + 1) % n
                return backend
        return None

    def release(self, backend: MoshiBackend) -> None:
        backend.busy = False

    def mark_down(self, backend: MoshiBackend, reason: str) -> None:
        backend.set_health(False, reason)

    async def probe_one(self, backend: MoshiBackend) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=self._probe_timeout_s)
            async with self._http.get(probe_url(backend.url), timeout=timeout, allow_redirects=False) as resp:
                if resp.status == 400:
                    backend.set_health(True, "probe answered 400")
                else:
                    backend.set_health(False, f"probe answered HTTP {resp.status}, expected 400")
        except asyncio.TimeoutError:
            backend.set_health(False, "probe timed out")
        except (aiohttp.ClientError, OSError) as exc:
            backend.set_health(False, f"probe failed: {type(exc).__name__}")

    async def probe_all(self) -> None:
        if self.backends:
            await asyncio.gather(*(self.probe_one(b) for b in self.backends))

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.summary(),
            "backends": [b.snapshot() for b in self.backends],
        }
