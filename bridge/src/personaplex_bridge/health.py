"""Up or down, and why, for one websocket backend of the bridge (the STT, the TTS).

The state comes from two sources: the outcome of the last session (a refused key is "down" even though
the host answers) and a background TCP probe (an unreachable host is "down" before the next session
finds out). A reachable probe clears a failed outcome only when ``recovers(reason)`` says the failure
was about reaching the host; the default lets any failure recover.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from .aio import timeout
from .protocol import TtsState

log = logging.getLogger("personaplex_bridge")


class BackendHealth:
    def __init__(
        self,
        name: str,
        url: str | None,
        probe_timeout_s: float,
        reason: str,
        recovers: Callable[[str], bool] = lambda _reason: True,
    ) -> None:
        self.name = name
        self.url = url
        self.reason = reason
        self._probe_timeout_s = probe_timeout_s
        self._recovers = recovers
        self.reachable = True
        self._last_ok = True

    @property
    def state(self) -> TtsState:
        if self.url is None:
            return "off"
        return "up" if self.reachable and self._last_ok else "down"

    def outcome(self, ok: bool, reason: str) -> None:
        """What the last session found (``ok`` False: down until a session or a probe says otherwise)."""
        before = self.state
        self._last_ok = ok
        self.reason = reason
        if self.state != before:
            log.info("%s is %s (%s)", self.name, self.state, reason)

    async def probe(self) -> None:
        """A TCP connect to the backend's host: down when unreachable, up again when it answers."""
        if self.url is None:
            return
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        try:
            async with timeout(self._probe_timeout_s):
                _, writer = await asyncio.open_connection(parts.hostname, port)
                writer.close()
                await writer.wait_closed()
            reachable = True
        except (asyncio.TimeoutError, OSError):
            reachable = False
        before = self.state
        self.reachable = reachable
        if not reachable:
            self.reason = "TCP connect failed"
        elif not self._last_ok and self._recovers(self.reason):
            self._last_ok = True
            self.reason = "reachable again"
        if self.state != before:
            log.info("%s is %s (%s)", self.name, self.state, self.reason)
