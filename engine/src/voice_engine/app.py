"""Routes and wiring: ``/healthz``, ``/status``, ``/metrics`` and each module's websocket route."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from aiohttp import web

from . import __version__
from .config import EngineConfig
from .metrics import Labels, Metrics
from .modules import build
from .modules.base import EngineModule

log = logging.getLogger("voice_engine")


class Engine:
    """Every configured module, loaded, behind one aiohttp application."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.started_at = time.time()
        self.modules: dict[str, EngineModule] = {}
        for mcfg in cfg.modules:
            module = build(mcfg)
            module.api_keys = cfg.api_keys
            module.metrics = self.metrics
            module.max_message_bytes = cfg.max_message_bytes
            self.modules[mcfg.name] = module

    def load(self) -> None:
        """Load every model (blocking: call before serving)."""
        for module in self.modules.values():
            started = time.monotonic()
            module.load()
            log.info("module %s (%s) loaded in %.1f s", module.name, module.kind, time.monotonic() - started)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_message_bytes)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        routes: dict[str, str] = {}
        for module in self.modules.values():
            if module.route in routes:
                other = routes[module.route]
                raise ValueError(f"modules {other} and {module.name} both serve {module.route}")
            routes[module.route] = module.name
            app.router.add_get(module.route, module.handle)
        return app

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Start the modules' batch loops, listen, and serve until SIGTERM/SIGINT (or ``stop``)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for module in self.modules.values():
            module.start()
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.cfg.host, self.cfg.port).start()
            log.info("serving %s on %s:%d", ", ".join(self.modules), self.cfg.host, self.cfg.port)
            await stop.wait()
            log.info("stopping")
        finally:
            await runner.cleanup()
            await asyncio.gather(*(m.close() for m in self.modules.values()))

    def failed(self) -> list[str]:
        return [f"{m.name}: {m.loop.failed}" for m in self.modules.values() if m.loop and m.loop.failed]

    async def _healthz(self, _request: web.Request) -> web.Response:
        failed = self.failed()
        if failed:
            return web.json_response({"status": "failed", "failed": failed}, status=503)
        return web.json_response({"status": "ok", "modules": sorted(self.modules)})

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "modules": {name: m.describe() for name, m in self.modules.items()},
        }

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _metrics(self, _request: web.Request) -> web.Response:
        slots_used: list[tuple[Labels, float]] = []
        slots_total: list[tuple[Labels, float]] = []
        steps: list[tuple[Labels, float]] = []
        seconds: list[tuple[Labels, float]] = []
        for name, m in self.modules.items():
            if m.loop is None:
                continue
            lb: Labels = (("module", name), ("kind", m.kind))
            slots_used.append((lb, m.loop.slots_used))
            slots_total.append((lb, m.loop.slots_total))
            steps.append((lb, m.loop.stats.steps_total))
            seconds.append((lb, m.loop.stats.seconds_total))
        body = self.metrics.render(
            [
                ("voice_engine_slots_used", "gauge", "Slots held by sessions.", slots_used),
                ("voice_engine_slots", "gauge", "Slots configured.", slots_total),
                ("voice_engine_steps_total", "counter", "Batched model steps.", steps),
                ("voice_engine_step_seconds_total", "counter", "Time spent in model steps.", seconds),
            ]
        )
        return web.Response(text=body, content_type="text/plain", charset="utf-8")
