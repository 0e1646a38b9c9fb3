"""Client of the MAS orchestrator's chat endpoint, with a timeout and a shared backoff.

One call: ``POST BRIDGE_MAS_URL`` with ``{"session_id", "text", "source"}``; the reply must be a JSON
object with a string ``response``. A timeout, a refused connection or a 5xx reply is "unavailable":
the MAS is then left alone for a backoff (1 s, doubling up to a maximum) during which calls fail at
once, so that a struggling MAS is not hammered by every session. The first call after the backoff
goes through; a success (or a 2xx from ``BRIDGE_MAS_HEALTH_URL``) clears it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from .config import Settings
from .metrics import Metrics
from .protocol import BackendState, Source

log = logging.getLogger("personaplex_bridge.mas")

_KNOWN_KEYS = ("response", "tool_calls", "agent_activity", "memory")
_LIST_KEYS = ("tool_calls", "agent_activity", "memory")


class MasUnavailable(Exception):
    def __init__(self, message: str, retry_in_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_in_s = retry_in_s


class MasBadReply(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class MasReply:
    text: str
    tool_calls: list[Any]
    agent_activity: list[Any]
    memory: list[Any]
    extra: dict[str, Any]


def parse_reply(obj: Any) -> MasReply:
    """Validate a decoded MAS reply. Missing lists become empty; unknown keys go to ``extra``."""
    if not isinstance(obj, dict):
        raise MasBadReply(f"the reply is a JSON {type(obj).__name__}, not an object")
    text = obj.get("response")
    if not isinstance(text, str):
        raise MasBadReply("the reply has no string 'response'")
    lists: dict[str, list[Any]] = {}
    for key in _LIST_KEYS:
        value = obj.get(key)
        if value is None:
            value = []
        if not isinstance(value, list):
            raise MasBadReply(f"'{key}' is a {type(value).__name__}, not a list")
        lists[key] = value
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_KEYS}
    return MasReply(text, lists["tool_calls"], lists["agent_activity"], lists["memory"], extra)


class MasClient:
    def __init__(self, settings: Settings, http: aiohttp.ClientSession, metrics: Metrics) -> None:
        self._url = settings.mas_url
        self._health_url = settings.mas_health_url
        self._timeout = aiohttp.ClientTimeout(total=settings.mas_timeout_s)
        self._probe_timeout = aiohttp.ClientTimeout(total=settings.probe_timeout_s)
        self._max_bytes = settings.mas_max_reply_bytes
        self._backoff_s = settings.mas_backoff_s
        self._backoff_max_s = settings.mas_backoff_max_s
        self._http = http
        self._metrics = metrics
        self.state: BackendState = "up"
        self.reason = "no call yet"
        self.failures = 0
        self._retry_at = 0.0

    def retry_in_s(self) -> float:
        return max(0.0, self._retry_at - time.monotonic())

    def _ok(self, reason: str) -> None:
        if self.state != "up":
            log.info("MAS is up (%s)", reason)
        self.state = "up"
        self.reason = reason
        self.failures = 0
        self._retry_at = 0.0

    def _unavailable(self, reason: str) -> MasUnavailable:
        self.failures += 1
        delay = min(self._backoff_max_s, self._backoff_s * 2 ** min(self.failures - 1, 30))
        self._retry_at = time.monotonic() + delay
        if self.state != "down":
            log.warning("MAS is down (%s); backing off %.1f s", reason, delay)
        self.state = "down"
        self.reason = reason
        self._metrics.count("bridge_mas_requests_total", "unavailable")
        return MasUnavailable(f"MAS unavailable: {reason}", round(delay, 3))

    def _bad(self, reason: str) -> MasBadReply:
        self.state = "down"
        self.reason = f"bad reply: {reason}"
        self._metrics.count("bridge_mas_requests_total", "bad_reply")
        log.warning("MAS sent a bad reply: %s", reason)
        return MasBadReply(f"MAS sent a bad reply: {reason}")

    async def chat(self, session_id: str, text: str, source: Source) -> MasReply:
        """One MAS call. Raises :class:`MasUnavailable` or :class:`MasBadReply`."""
        wait = self.retry_in_s()
        if wait > 0:
            self._metrics.count("bridge_mas_requests_total", "backoff")
            raise MasUnavailable(f"MAS unavailable ({self.reason}); retrying in {wait:.1f} s", round(wait, 3))
        payload = {"session_id": session_id, "text": text, "source": source}
        started = time.monotonic()
        try:
            async with self._http.post(self._url, json=payload, timeout=self._timeout) as resp:
                status = resp.status
                body = await self._read_capped(resp)
        except asyncio.TimeoutError:
            raise self._unavailable("timed out") from None
        except _TooLarge:
            raise self._bad(f"the body is larger than {self._max_bytes} bytes") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unavailable(f"connection failed ({type(exc).__name__})") from None
        self._metrics.observe("bridge_mas_request_seconds", time.monotonic() - started)
        if status >= 500:
            raise self._unavailable(f"HTTP {status}")
        if not 200 <= status < 300:
            raise self._bad(f"HTTP {status}")
        try:
            obj = json.loads(body)
        except ValueError:
            raise self._bad("the body is not JSON") from None
        try:
            reply = parse_reply(obj)
        except MasBadReply as exc:
            raise self._bad(exc.message) from None
        self._ok("last call succeeded")
        self._metrics.count("bridge_mas_requests_total", "ok")
        return reply

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(16384):
            size += len(chunk)
            if size > self._max_bytes:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def probe(self) -> None:
        """GET the health URL (if configured); a 2xx marks the MAS up and clears the backoff."""
        if self._health_url is None:
            return
        try:
            async with self._http.get(self._health_url, timeout=self._probe_timeout) as resp:
                ok = 200 <= resp.status < 300
                reason = f"health check answered HTTP {resp.status}"
        except asyncio.TimeoutError:
            ok, reason = False, "health check timed out"
        except (aiohttp.ClientError, OSError) as exc:
            ok, reason = False, f"health check failed ({type(exc).__name__})"
        if ok:
            self._ok(reason)
        else:
            if self.state != "down":
                log.warning("MAS is down (%s)", reason)
            self.state = "down"
            self.reason = reason

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self._url,
            "health_url": self._health_url,
            "state": self.state,
            "reason": self.reason,
            "consecutive_failures": self.failures,
            "retry_in_s": round(self.retry_in_s(), 3),
        }


class _TooLarge(Exception):
    pass
