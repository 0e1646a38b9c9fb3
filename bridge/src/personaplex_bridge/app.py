"""Routes and wiring: the aiohttp application, admission checks, background probes and the drain."""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from . import __version__
from .aio import cancel_and_wait, timeout
from .asr import AsrClient
from .config import Settings
from .mas import MasClient
from .metrics import Gauge, Metrics
from .pool import MoshiPool
from .session import Services, Session
from .tts import TtsClient

log = logging.getLogger("personaplex_bridge")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

WATCHDOG_INTERVAL_S = 0.5

_STATIC_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _static_text(name: str) -> str:
    """A file of the package's ``static/`` folder (the /test-voice page)."""
    return importlib.resources.files(__package__).joinpath("static", name).read_text("utf-8")


def _static_scripts() -> frozenset[str]:
    folder = importlib.resources.files(__package__).joinpath("static")
    return frozenset(f.name for f in folder.iterdir() if f.name.endswith(".js"))


def _json_error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """Requests without an Origin (non-browser clients) pass; browsers must be on the list."""
    if origin is None:
        return True
    return "*" in allowed or origin.strip().rstrip("/").lower() in allowed


def token_ok(request: web.Request, expected: str) -> bool:
    """Bearer token from ``Authorization`` (or ``?token=`` for browsers), compared in constant time."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    presented = value.strip() if scheme.lower() == "bearer" else request.query.get("token", "")
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8"))


class Bridge:
    """The service: start, serve, drain, close."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.sessions: dict[str, Session] = {}
        self.started_at = time.time()
        self._svc: Services | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._health: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def services(self) -> Services:
        assert self._svc is not None, "start() first"
        return self._svc

    # --- lifecycle ---

    async def start(self) -> None:
        s = self.settings
        connector = aiohttp.TCPConnector(limit=2 * s.max_sessions + 32, enable_cleanup_closed=False)
        self._http = aiohttp.ClientSession(connector=connector)
        pool = MoshiPool(s.moshi_urls, self._http, s.probe_timeout_s)
        mas = MasClient(s, self._http, self.metrics)
        tts = TtsClient(s, self._http)
        asr = AsrClient(s, self._http)
        self._svc = Services(s, self._http, pool, mas, tts, asr, self.metrics)
        await self._probe_once()
        self._health = asyncio.create_task(self._health_loop(), name="health")
        self._watchdog = asyncio.create_task(self._watchdog_loop(), name="watchdog")
        self._runner = web.AppRunner(
            self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, s.host, s.port, reuse_address=True)
        await self._site.start()

    async def drain(self) -> None:
        """Stop accepting; let sessions finish what is in flight, up to the drain timeout; close the rest."""
        svc = self.services
        svc.draining = True
        log.info("draining: %d session(s), up to %.0f s", len(self.sessions), self.settings.drain_timeout_s)
        if self._site is not None:
            await self._site.stop()
            self._site = None
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.sessions:
            for session in list(self.sessions.values()):
                if session.idle:
                    session.request_close(1001, "server shutting down")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self._wait_idle_change(min(remaining, 0.25))
        if self.sessions:
            log.warning("drain timeout: closing %d busy session(s)", len(self.sessions))
            for session in list(self.sessions.values()):
                session.request_close(1001, "server shutting down")
            end = time.monotonic() + self.settings.send_timeout_s + 3.0
            while self.sessions and time.monotonic() < end:
                await self._wait_idle_change(0.1)
        log.info("drained")

    async def _wait_idle_change(self, seconds: float) -> None:
        event = self.services.idle_changed
        event.clear()
        try:
            async with timeout(seconds):
                await event.wait()
        except asyncio.TimeoutError:
            pass

    async def close(self) -> None:
        await cancel_and_wait([self._health, self._watchdog])
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._runner is not None
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                return int(address[1])
        raise RuntimeError("not listening")

    async def _probe_once(self) -> None:
        svc = self.services
        try:
            async with timeout(self.settings.probe_timeout_s + 1.0):
                await asyncio.gather(svc.pool.probe_all(), svc.mas.probe(), svc.tts.probe(), svc.asr.probe())
        except asyncio.TimeoutError:
            log.warning("backend probes took longer than %.1f s", self.settings.probe_timeout_s + 1.0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            await self._probe_once()

    async def _watchdog_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                session.watchdog(now)

    # --- HTTP ---

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._origin_middleware], client_max_size=64 * 1024)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/test-voice", self.test_voice_page)  # the browser test page (static/)
        app.router.add_get("/test-voice/{name}", self.test_voice_asset)
        return app

    @web.middleware
    async def _origin_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not origin_allowed(request.headers.get("Origin"), self.settings.allowed_origins):
            self.metrics.count("bridge_rejected_total", "origin")
            log.info("refused a request from origin %r", request.headers.get("Origin", "")[:100])
            return _json_error(403, "origin_not_allowed", "this Origin is not in BRIDGE_ALLOWED_ORIGINS")
        return await handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def status(self, request: web.Request) -> web.Response:
        svc = self.services
        body: dict[str, Any] = {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "draining": svc.draining,
            "sessions": {
                "active": len(self.sessions),
                "voice": sum(1 for x in self.sessions.values() if x.voice_active),
                "max": self.settings.max_sessions,
                "total": int(self.metrics.value("bridge_sessions_total")),
            },
            "moshi": svc.pool.snapshot(),
            "mas": svc.mas.snapshot(),
            "tts": svc.tts.snapshot(),
            "asr": svc.asr.snapshot(),
        }
        return web.json_response(body)

    async def metrics_page(self, request: web.Request) -> web.Response:
        svc = self.services
        backends = svc.pool.backends
        gauges = [
            Gauge("bridge_sessions_active", "Client sessions open now.", (((), len(self.sessions)),)),
            Gauge(
                "bridge_voice_sessions_active",
                "Sessions in voice now (agent or duplex).",
                (((), sum(1 for x in self.sessions.values() if x.voice_active)),),
            ),
            Gauge("bridge_draining", "1 while the bridge drains after SIGTERM.", (((), int(svc.draining)),)),
            Gauge("bridge_moshi_backend_up", "1 if the Moshi backend answers its probe.",
                  tuple(((("url", b.url),), int(b.up)) for b in backends)),
            Gauge("bridge_moshi_backend_busy", "1 if the Moshi backend has no free slot.",
                  tuple(((("url", b.url),), int(b.busy)) for b in backends)),
            Gauge("bridge_moshi_backend_slots_free", "Free conversation slots of the Moshi backend.",
                  tuple(((("url", b.url),), b.free_slots if b.up else 0) for b in backends)),
            Gauge("bridge_mas_up", "1 if the last MAS call (or health check) succeeded.",
                  (((), int(svc.mas.state == "up")),)),
            Gauge("bridge_tts_up", "1 if a TTS is configured and working, 0 if down or off.",
                  (((), int(svc.tts.state == "up")),)),
            Gauge("bridge_asr_up", "1 if an STT is configured and working, 0 if down or off.",
                  (((), int(svc.asr.state == "up")),)),
            Gauge("bridge_agent_voice_sessions_active", "Sessions in agent voice mode now.",
                  (((), sum(1 for x in self.sessions.values() if x.voice_mode == "agent")),)),
        ]  # fmt: skip
        return web.Response(text=self.metrics.render(gauges), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})  # fmt: skip

    async def test_voice_page(self, request: web.Request) -> web.Response:
        """``static/test-voice.html``, told whether ``/ws`` needs a token (so the page asks for one)."""
        html = _static_text("test-voice.html")
        html = html.replace("{{TOKEN_REQUIRED}}", "true" if self.settings.token is not None else "false")
        return web.Response(text=html, content_type="text/html", charset="utf-8", headers=_STATIC_HEADERS)

    async def test_voice_asset(self, request: web.Request) -> web.Response:
        """The page's ES modules (``static/*.js``), by name; anything else is 404."""
        name = request.match_info["name"]
        if name not in _static_scripts():
            raise web.HTTPNotFound(text="no such file")
        return web.Response(text=_static_text(name), content_type="text/javascript", charset="utf-8",
                            headers=_STATIC_HEADERS)  # fmt: skip

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        svc = self.services
        if svc.draining:
            self.metrics.count("bridge_rejected_total", "draining")
            return _json_error(503, "draining", "the bridge is shutting down")
        if s.token is not None and not token_ok(request, s.token):
            self.metrics.count("bridge_rejected_total", "token")
            log.info("refused a websocket: missing or wrong token")
            return _json_error(401, "unauthorized", "a valid bearer token is required",
                               **{"WWW-Authenticate": "Bearer"})  # fmt: skip
        if len(self.sessions) >= s.max_sessions:
            self.metrics.count("bridge_rejected_total", "capacity")
            return _json_error(503, "capacity", f"{s.max_sessions} sessions are open; try again later")
        ws = web.WebSocketResponse(
            heartbeat=s.heartbeat_s, max_msg_size=s.hard_frame_bytes, compress=False, timeout=2.0
        )
        if not ws.can_prepare(request).ok:
            self.metrics.count("bridge_rejected_total", "not_websocket")
            return _json_error(400, "not_websocket", "GET /ws expects a websocket upgrade")
        session_id = secrets.token_hex(8)
        session = Session(session_id, ws, svc)
        self.sessions[session_id] = session
        try:
            await ws.prepare(request)
            self.metrics.count("bridge_sessions_total")
            log.info("session %s: open from %s", session_id, request.remote)
            await session.run()
        finally:
            del self.sessions[session_id]
            svc.idle_changed.set()
            log.info("session %s: closed", session_id)
        return ws
