"""Client of a Moshi server (``/api/chat``), the backend of the duplex voice mode.

Moshi's protocol: binary frames with a kind byte. The server sends the ``0x00`` handshake when the
conversation starts, then ``0x01`` + Ogg/Opus audio and ``0x02`` + UTF-8 text pieces (its own words);
it takes ``0x01`` audio and drops every other kind. It serves one conversation at a time: a server that
accepts the socket but sends no handshake is serving someone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp

from .aio import timeout, ws_close_timeout
from .pool import MoshiBackend

_CLOSED_TYPES = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


class MoshiConnectFailed(Exception):
    def __init__(self, busy: bool, reason: str) -> None:
        super().__init__(reason)
        self.busy = busy
        self.reason = reason


class MoshiLink:
    """One conversation with one backend."""

    def __init__(self, backend: MoshiBackend, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.backend = backend
        self.ws = ws
        self.unanswered_since: float | None = None  # first client frame not yet followed by a Moshi frame

    async def send(self, data: bytes) -> None:
        """Raises ConnectionError, RuntimeError or aiohttp.ClientError when the connection is gone."""
        await self.ws.send_bytes(data)

    async def relay(self, on_frame: Callable[[bytes], Awaitable[None]]) -> str:
        """Hand every binary frame to ``on_frame`` until the connection ends; returns why it ended.

        Unbounded by itself: the caller's stall watchdog cancels it when Moshi stops answering.
        """
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self.unanswered_since = None
                    await on_frame(msg.data)
                elif msg.type in _CLOSED_TYPES:
                    return "Moshi closed the connection"
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    return f"Moshi connection failed ({type(msg.data).__name__})"
        except (ConnectionError, aiohttp.ClientError) as exc:
            return f"Moshi connection failed ({type(exc).__name__})"

    async def close(self) -> None:
        await close_quietly(self.ws)


async def connect(
    http: aiohttp.ClientSession, backend: MoshiBackend, limit_s: float, max_msg_size: int
) -> MoshiLink:
    """Open the websocket and wait for the 0x00 handshake, all within ``limit_s``.

    Raises :class:`MoshiConnectFailed` (``busy`` when the server accepted but sent no handshake).
    """
    moshi_ws: aiohttp.ClientWebSocketResponse | None = None
    try:
        async with timeout(limit_s):
            moshi_ws = await http.ws_connect(
                backend.url, autoping=True, max_msg_size=max_msg_size, **ws_close_timeout(2.0)
            )
            msg = await moshi_ws.receive()
    except asyncio.TimeoutError:
        if moshi_ws is None:
            raise MoshiConnectFailed(False, f"no connection within {limit_s:g} s") from None
        await close_quietly(moshi_ws)
        raise MoshiConnectFailed(True, f"no handshake within {limit_s:g} s (serving someone else?)") from None
    except (aiohttp.ClientError, OSError) as exc:
        if moshi_ws is not None:
            await close_quietly(moshi_ws)
        raise MoshiConnectFailed(False, f"connection failed ({type(exc).__name__})") from None
    except asyncio.CancelledError:
        if moshi_ws is not None:
            await close_quietly(moshi_ws)
        raise
    if msg.type is not aiohttp.WSMsgType.BINARY or msg.data[:1] != b"\x00":
        await close_quietly(moshi_ws)
        raise MoshiConnectFailed(False, f"expected the 0x00 handshake, got {msg.type.name}")
    return MoshiLink(backend, moshi_ws)


async def close_quietly(ws: aiohttp.ClientWebSocketResponse) -> None:
    try:
        async with timeout(2.0):
            await ws.close()
    except (asyncio.TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
        pass
