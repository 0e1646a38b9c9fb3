"""The pool of chat backends (``/api/chat``): their health, their free slots, and which one to take.

Two kinds of backend answer ``BRIDGE_MOSHI_URLS``:

* **engine**: our ``voice-engine`` with a ``chat`` module. Its ``GET /status`` lists the module (found by
  its ``route``, the URL's path) with its slots (``slots_total``, ``slots_used``), its step times over
  the last minute (``step_ms_p50``, ``step_ms_p99``), ``device``, ``precision`` and ``flavor``. The
  pool counts its free slots (the slots others use at the last probe, plus the ones this bridge holds
  now) and measures it: a backend whose step p99 is above the 80 ms frame is **not real time** and is
  never chosen while a real-time one has a free slot; among the rest the fastest (step p50) wins.
  The last measured step times are kept while the engine is idle (it reports none then).
* **moshi**: Kyutai's ``moshi.server`` (no ``/status``): one conversation at a time, so it is busy
  while this bridge holds it. Up when a plain ``GET`` on the websocket path answers 400.

A backend found down (by the probe, or by a session whose connection failed) is skipped until a later
probe finds it up again; no restart is needed. An engine that answers 503 (full) is full until the
next probe.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .protocol import MoshiSummary

log = logging.getLogger("personaplex_bridge.pool")

FRAME_MS = 80.0  # one model frame: a backend whose step p99 is above this is not real time

BackendKind = Literal["engine", "moshi", "unknown"]


def probe_url(ws_url: str) -> str:
    """The HTTP URL answering the liveness probe for Moshi websocket URL ``ws_url``."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))


def status_url(ws_url: str) -> str:
    """The engine's ``/status`` on the host of ``ws_url``."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "/status", "", ""))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class MoshiBackend:
    url: str
    up: bool = False
    reason: str = "not probed yet"
    changed_at: float = field(default_factory=time.time)
    sessions_total: int = 0
    kind: BackendKind = "unknown"
    held: int = 0  # conversations this bridge holds on it now
    slots_total: int = 1
    others: int = 0  # engine: slots used by other clients at the last probe
    full: bool = False  # engine: answered 503 since the last probe
    step_ms_p50: float | None = None  # engine: last measured
    step_ms_p99: float | None = None
    device: str | None = None
    precision: str | None = None
    flavor: str | None = None  # engine: moshi or personaplex
    passed_over: str | None = None  # why it was last passed over for another backend

    @property
    def free_slots(self) -> int:
        if self.kind != "engine":
            return 0 if self.held else 1
        if self.full:
            return 0
        return max(0, self.slots_total - self.others - self.held)

    @property
    def busy(self) -> bool:
        """No free slot (a Moshi server: in a conversation)."""
        return self.free_slots == 0

    @property
    def real_time(self) -> bool | None:
        """``None`` when unmeasured (no step yet, or a Kyutai server)."""
        if self.step_ms_p99 is None:
            return None
        return self.step_ms_p99 <= FRAME_MS

    @property
    def real_time_reason(self) -> str:
        if self.kind == "moshi":
            return "Kyutai moshi.server: no /status, not measured"
        p99 = self.step_ms_p99
        if p99 is None:
            return "no step measured yet"
        sign = "<=" if p99 <= FRAME_MS else ">"
        return f"step p99 {p99:g} ms {sign} the {FRAME_MS:g} ms frame"

    def set_health(self, up: bool, reason: str) -> None:
        if up != self.up:
            log.info("moshi backend %s is %s (%s)", self.url, "up" if up else "down", reason)
            self.changed_at = time.time()
        self.up = up
        self.reason = reason

    def rank(self) -> tuple[int, float]:
        """Lower is better: measured real time, then unmeasured, then not real time; then step p50."""
        tier = {True: 0, None: 1, False: 2}[self.real_time]
        return tier, self.step_ms_p50 if self.step_ms_p50 is not None else math.inf

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.url,
            "kind": self.kind,
            "state": "up" if self.up else "down",
            "busy": self.busy,
            "reason": self.reason,
            "since": round(self.changed_at, 3),
            "sessions_total": self.sessions_total,
            "held": self.held,
            "slots_free": self.free_slots if self.up else 0,
            "real_time": self.real_time,
            "real_time_reason": self.real_time_reason,
            "passed_over": self.passed_over,
        }
        if self.kind == "engine":
            out.update(
                slots_total=self.slots_total,
                step_ms_p50=self.step_ms_p50,
                step_ms_p99=self.step_ms_p99,
                device=self.device,
                precision=self.precision,
                flavor=self.flavor,
            )
        return out


def _why_passed_over(backend: MoshiBackend, chosen: MoshiBackend) -> str:
    if backend.real_time is False and chosen.real_time is not False:
        return f"not real time ({backend.real_time_reason}) while {chosen.url} had a free slot"
    if backend.rank()[0] > chosen.rank()[0]:
        return f"not measured while {chosen.url} is measured real time"
    return (
        f"slower (step p50 {backend.step_ms_p50:g} ms) than {chosen.url} (step p50 {chosen.step_ms_p50:g} ms)"
        if backend.step_ms_p50 is not None and chosen.step_ms_p50 is not None
        else f"{chosen.url} came first in turn"
    )


class MoshiPool:
    def __init__(self, urls: tuple[str, ...], http: aiohttp.ClientSession, probe_timeout_s: float) -> None:
        self.backends = [MoshiBackend(url) for url in urls]
        self._http = http
        self._probe_timeout_s = probe_timeout_s
        self._next = 0

    def summary(self, engine_only: bool = False) -> MoshiSummary:
        """``up`` if a backend has a free slot, ``busy`` if every live backend is full, else ``down``."""
        live = [b for b in self.backends if b.up and (b.kind == "engine" or not engine_only)]
        if not live:
            return "down"
        return "up" if any(not b.busy for b in live) else "busy"

    def acquire(
        self, exclude: frozenset[str] = frozenset(), engine_only: bool = False
    ) -> MoshiBackend | None:
        """Take a slot on the best backend that is up and has one, or ``None``.

        Best: a measured real-time backend before an unmeasured one before one that is not real time;
        then the lowest step p50; ties in turn (round robin). ``engine_only``: only our engine (the say
        channel of the chat reply voice needs it).
        """
        n = len(self.backends)
        order = [self.backends[(self._next + i) % n] for i in range(n)]
        candidates = [
            b
            for b in order
            if b.up and not b.busy and b.url not in exclude and (b.kind == "engine" or not engine_only)
        ]
        if not candidates:
            return None
        candidates.sort(key=MoshiBackend.rank)  # stable: round robin among equals
        chosen = candidates[0]
        for other in candidates[1:]:
            other.passed_over = _why_passed_over(other, chosen)
            log.debug("moshi backend %s passed over: %s", other.url, other.passed_over)
        chosen.passed_over = None
        chosen.held += 1
        chosen.sessions_total += 1
        self._next = (self.backends.index(chosen) + 1) % n
        return chosen

    def release(self, backend: MoshiBackend) -> None:
        backend.held = max(0, backend.held - 1)

    def mark_down(self, backend: MoshiBackend, reason: str) -> None:
        backend.set_health(False, reason)

    def mark_full(self, backend: MoshiBackend) -> None:
        """The engine answered 503: no slot until the next probe says otherwise."""
        backend.full = True

    async def probe_one(self, backend: MoshiBackend) -> None:
        timeout = aiohttp.ClientTimeout(total=self._probe_timeout_s)
        try:
            async with self._http.get(
                status_url(backend.url), timeout=timeout, allow_redirects=False
            ) as resp:
                body: Any = None
                if resp.status == 200:
                    try:
                        body = await resp.json(content_type=None)
                    except ValueError:
                        body = None
            if isinstance(body, dict) and isinstance(body.get("modules"), dict):
                self._engine_status(backend, body["modules"])
                return
            async with self._http.get(probe_url(backend.url), timeout=timeout, allow_redirects=False) as resp:
                backend.kind = "moshi"
                backend.full = False
                if resp.status == 400:
                    backend.set_health(True, "probe answered 400")
                else:
                    backend.set_health(False, f"probe answered HTTP {resp.status}, expected 400")
        except asyncio.TimeoutError:
            backend.set_health(False, "probe timed out")
        except (aiohttp.ClientError, OSError) as exc:
            backend.set_health(False, f"probe failed: {type(exc).__name__}")

    def _engine_status(self, backend: MoshiBackend, modules: dict[str, Any]) -> None:
        path = urlsplit(backend.url).path or "/"
        entry = next(
            (m for m in modules.values() if isinstance(m, dict) and m.get("route") == path),
            None,
        )
        backend.kind = "engine"
        if entry is None or entry.get("kind") != "chat":
            backend.set_health(False, f"the engine serves no chat module at {path}")
            return
        failed = entry.get("failed")
        if failed:
            backend.set_health(False, f"the engine's chat module failed: {str(failed)[:200]}")
            return
        total = _number(entry.get("slots_total"))
        used = _number(entry.get("slots_used"))
        if total is None or used is None:
            backend.set_health(False, "the engine's /status has no slots_total/slots_used")
            return
        backend.slots_total = int(total)
        backend.others = max(0, int(used) - backend.held)
        backend.full = False
        p50, p99 = _number(entry.get("step_ms_p50")), _number(entry.get("step_ms_p99"))
        if p99 is not None:  # an idle engine reports none: keep the last measurement
            backend.step_ms_p50, backend.step_ms_p99 = p50, p99
        for key in ("device", "precision", "flavor"):
            value = entry.get(key)
            setattr(backend, key, value if isinstance(value, str) else None)
        backend.set_health(True, "engine /status answered")

    async def probe_all(self) -> None:
        if self.backends:
            await asyncio.gather(*(self.probe_one(b) for b in self.backends))

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.summary(),
            "frame_ms": FRAME_MS,
            "backends": [b.snapshot() for b in self.backends],
        }
