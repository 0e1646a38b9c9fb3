"""Client of the MAS orchestrator's chat endpoint, with a timeout and a shared backoff.

One call: ``POST BRIDGE_MAS_URL`` with ``{"session_id", "text", "source"}``; the reply must be a JSON
object with a string ``response``. Those names are the default contract: ``BRIDGE_MAS_REQUEST_FIELDS``
and ``BRIDGE_MAS_REPLY_FIELDS`` map each to the MAS's own field (a name, or a dotted path into nested
objects), see :class:`MasContract`. A timeout, a refused connection or a 5xx reply is "unavailable":
the MAS is then left alone for a backoff (1 s, doubling up to a maximum) during which calls fail at
once, so that a struggling MAS is not hammered by every session. The first call after the backoff
goes through; a success (or a 2xx from ``BRIDGE_MAS_HEALTH_URL``) clears it. The state is
``unknown`` until the first call or health probe has an outcome.

A refused reply is logged with its reason and the field names involved, never with the user's text
nor the reply's values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from .config import MAS_REPLY_FIELDS, MAS_REQUEST_FIELDS, Settings, mas_field_paths
from .metrics import Metrics
from .protocol import MasState, Source

log = logging.getLogger("personaplex_bridge.mas")

_LIST_KEYS = ("tool_calls", "agent_activity", "memory")
# At most this many of a reply's top-level keys are named in a refusal's log line.
_LOGGED_KEYS = 12


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


def _path(dotted: str) -> tuple[str, ...]:
    return tuple(dotted.split(".")) if dotted else ()


def _keys(obj: dict[str, Any]) -> str:
    names = [k if len(k) <= 40 else k[:40] + "..." for k in list(obj)[:_LOGGED_KEYS]]
    more = f", +{len(obj) - _LOGGED_KEYS} more" if len(obj) > _LOGGED_KEYS else ""
    return (", ".join(names) + more) if names else "none"


@dataclass(frozen=True)
class MasContract:
    """Where each field of the bridge's request and of the MAS's reply lives in the MAS's JSON.

    A path is a tuple of keys into nested objects; the empty path means "left out" (the request
    omits the field; the reply's list is always empty).
    """

    request: dict[str, tuple[str, ...]]
    reply: dict[str, tuple[str, ...]]

    @classmethod
    def from_settings(cls, settings: Settings) -> MasContract:
        request = mas_field_paths(MAS_REQUEST_FIELDS, settings.mas_request_fields)
        reply = mas_field_paths(MAS_REPLY_FIELDS, settings.mas_reply_fields)
        return cls({k: _path(v) for k, v in request.items()}, {k: _path(v) for k, v in reply.items()})

    def body(self, session_id: str, text: str, source: Source) -> dict[str, Any]:
        values = {"session_id": session_id, "text": text, "source": source}
        out: dict[str, Any] = {}
        for name, path in self.request.items():
            if not path:
                continue
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = values[name]
        return out

    def describe(self) -> dict[str, dict[str, str | None]]:
        """The contract as ``/status`` shows it: each field and the MAS's name for it (None: left out)."""
        return {
            "request": {k: ".".join(v) or None for k, v in self.request.items()},
            "reply": {k: ".".join(v) or None for k, v in self.reply.items()},
        }

    def parse(self, obj: Any) -> MasReply:
        """Validate a decoded MAS reply. Missing lists become empty; unknown keys go to ``extra``."""
        if not isinstance(obj, dict):
            raise MasBadReply(f"the reply is a JSON {type(obj).__name__}, not an object")
        found, text = _lookup(obj, self.reply["response"])
        if not isinstance(text, str):
            where = ".".join(self.reply["response"])
            what = f"a {type(text).__name__} there; " if found else ""
            raise MasBadReply(f"the reply has no string '{where}' ({what}its keys: {_keys(obj)})")
        lists: dict[str, list[Any]] = {}
        for key in _LIST_KEYS:
            path = self.reply[key]
            value = _lookup(obj, path)[1] if path else None
            if value is None:
                value = []
            if not isinstance(value, list):
                raise MasBadReply(f"'{'.'.join(path)}' is a {type(value).__name__}, not a list")
            lists[key] = value
        used = {path[0] for path in self.reply.values() if path}
        extra = {k: v for k, v in obj.items() if k not in used}
        return MasReply(text, lists["tool_calls"], lists["agent_activity"], lists["memory"], extra)


_DEFAULT_CONTRACT = MasContract(
    {name: (name,) for name in MAS_REQUEST_FIELDS}, {name: (name,) for name in MAS_REPLY_FIELDS}
)


def _lookup(obj: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    """(found, value) at ``path`` in nested objects."""
    node: Any = obj
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def parse_reply(obj: Any, contract: MasContract = _DEFAULT_CONTRACT) -> MasReply:
    """Validate a decoded MAS reply against ``contract`` (default: the bridge's own field names)."""
    return contract.parse(obj)


def _refusal_detail(body: bytes) -> str:
    """What a 4xx body says about the request, without any value from it.

    A FastAPI/pydantic validation error (``{"detail": [{"loc": [...], "msg": ...}]}``) names the
    fields it wanted; its ``input`` (which may hold the user's text) is never read. Any other body is
    described by its size and top-level keys only.
    """
    try:
        obj = json.loads(body)
    except ValueError:
        return f"a non-JSON body of {len(body)} bytes"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}"
    detail = obj.get("detail")
    if isinstance(detail, list):
        items = []
        for entry in detail[:5]:
            if not isinstance(entry, dict):
                continue
            loc = entry.get("loc")
            msg = entry.get("msg")
            where = (
                ".".join(str(p) for p in loc if isinstance(p, (str, int))) if isinstance(loc, list) else "?"
            )
            items.append(f"{where[:80]}: {str(msg)[:80]}" if isinstance(msg, str) else where[:80])
        if items:
            return "validation errors: " + "; ".join(items)
    return f"a JSON object with keys: {_keys(obj)}"


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
        self.contract = MasContract.from_settings(settings)
        self.state: MasState = "unknown"
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

    def _bad(self, reason: str, detail: str = "") -> MasBadReply:
        """A refused reply. ``reason`` goes to the client and /status, ``detail`` to the log only."""
        self.state = "down"
        self.reason = f"bad reply: {reason}"
        self._metrics.count("bridge_mas_requests_total", "bad_reply")
        log.warning("MAS reply refused: %s%s", reason, f" ({detail})" if detail else "")
        return MasBadReply(f"MAS sent a bad reply: {reason}")

    async def chat(self, session_id: str, text: str, source: Source) -> MasReply:
        """One MAS call. Raises :class:`MasUnavailable` or :class:`MasBadReply`."""
        wait = self.retry_in_s()
        if wait > 0:
            self._metrics.count("bridge_mas_requests_total", "backoff")
            raise MasUnavailable(f"MAS unavailable ({self.reason}); retrying in {wait:.1f} s", round(wait, 3))
        payload = self.contract.body(session_id, text, source)
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
            sent = ", ".join(sorted(payload))
            raise self._bad(
                f"HTTP {status}",
                f"the request had the fields {sent} (BRIDGE_MAS_REQUEST_FIELDS); the MAS answered "
                + _refusal_detail(body),
            )
        try:
            obj = json.loads(body)
        except ValueError:
            kind = resp.content_type if resp.content_type else "no content type"
            raise self._bad("the body is not JSON", f"{len(body)} bytes, {kind}") from None
        try:
            reply = self.contract.parse(obj)
        except MasBadReply as exc:
            raise self._bad(exc.message, "BRIDGE_MAS_REPLY_FIELDS says where each field is") from None
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
            "contract": self.contract.describe(),
            "consecutive_failures": self.failures,
            "retry_in_s": round(self.retry_in_s(), 3),
        }


class _TooLarge(Exception):
    pass
