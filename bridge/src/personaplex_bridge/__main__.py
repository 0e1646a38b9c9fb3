"""``personaplex-bridge``: read the settings, serve, and drain on SIGTERM.

The signal is handled here rather than by aiohttp: once aiohttp's own shutdown starts it stops
delivering frames on open websockets, so a drain inside ``on_shutdown`` could not finish a turn.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .app import Bridge
from .config import ConfigError, Settings, load_settings

log = logging.getLogger("personaplex_bridge")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "debug":
        # aiohttp's own loggers are chatty at info and may print request details.
        for name in (
            "aiohttp.access",
            "aiohttp.server",
            "aiohttp.web",
            "aiohttp.client",
            "aiohttp.websocket",
        ):
            logging.getLogger(name).setLevel(logging.WARNING)


async def serve(settings: Settings) -> int:
    bridge = Bridge(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await bridge.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        await bridge.close()
        return 1
    gc.freeze()  # what start-up allocated is permanent: keep it out of every later collection
    svc = bridge.services
    log.info(
        "listening on http://%s:%d (moshi backends: %d, %s; mas: %s; tts: %s)",
        settings.host,
        bridge.port,
        len(settings.moshi_urls),
        svc.pool.summary(),
        svc.mas.state,
        svc.tts.state,
    )
    if not settings.allowed_origins:
        log.warning("BRIDGE_ALLOWED_ORIGINS is empty: browser clients (requests with an Origin) get 403")
    await stop.wait()  # until SIGTERM/SIGINT, by design
    log.info("signal received: stop accepting and drain")
    await bridge.drain()
    await bridge.close()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(os.environ, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"personaplex-bridge: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:  # a second Ctrl-C during the drain
        return 130


if __name__ == "__main__":
    sys.exit(main())
