"""Client of a Moshi server (``/api/chat``), the backend of the duplex voice mode.

Moshi's protocol: binary frames with a kind byte. The server sends the ``0x00`` handshake when the
conversation starts, then ``0x01`` + Ogg/Opus audio and ``0x02`` + UTF-8 text pieces (its own words);
it takes ``0x01`` audio and drops every other kind. It serves one conversation at a time: a server that
accepts the socket but sends no handshake is serving someone else.

Our engine speaks the same protocol and refuses before the upgrade: 503 when every slot is taken, 400
for a bad query (a voice or text prompt it refuses; the JSON body says why), 401 for a missing key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from .aio import timeout, ws_close_timeout
from .pool import MoshiBackend, MoshiPool

log = logging.getLogger("personaplex_bridge.moshi")

_CLOSED_TYPES = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


Refusal = Literal["down", "busy", "full", "refused"]


class MoshiConnectFailed(Exception):
    """``kind``: ``down`` (unreachable, broken), ``busy`` (accepted but no handshake: a Moshi server
    serving someone else), ``full`` (an engine's 503), ``refused`` (an engine's 400: a query it refuses;
    every backend would, so the caller does not try the next one)."""

    def __init__(self, kind: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.kind: Refusal = kind
        self.reason = reason

    @property
    def busy(self) -> bool:
        return self.kind in ("busy", "full")


@dataclass(frozen=True)
class Opened:
    """What :func:`connect_best` got: a ``link`` (its backend's slot taken; release it when done), or
    none, with ``refused`` (an engine's reason for a query every backend would refuse) or ``busy``."""

    link: MoshiLink | None = None
    backend: MoshiBackend | None = None
    refused: str | None = None
    busy: bool = False


async def connect_best(
    pool: MoshiPool,
    http: aiohttp.ClientSession,
    limit_s: float,
    max_msg_size: int,
    query: Mapping[str, str],
    key: str | None,
    label: str,
    engine_only: bool = False,
) -> Opened:
    """Connect to the pool's best backend, then the next best, until one answers the handshake. A
    backend that fails is marked full or down; a refused query stops the search (no retry storm)."""
    tried: set[str] = set()
    busy = False
    while (backend := pool.acquire(frozenset(tried), engine_only=engine_only)) is not None:
        tried.add(backend.url)
        try:
            link = await connect(http, backend, limit_s, max_msg_size, query, key)
        except BaseException as exc:  # on cancellation too, the slot must go back
            pool.release(backend)
            if not isinstance(exc, MoshiConnectFailed):
                raise
            log.info("%s: %s: %s", label, backend.url, exc.reason)
            if exc.kind == "refused":
                return Opened(refused=exc.reason)
            busy = busy or exc.busy
            if exc.kind == "full":
                pool.mark_full(backend)
            elif exc.kind == "down":
                pool.mark_down(backend, exc.reason)
            continue
        return Opened(link, backend)
    return Opened(busy=busy)


def with_query(url: str, extra: Mapping[str, str]) -> str:
    """``url`` with ``extra`` appended to its query (what is already there, e.g. ``auth_id``, stays)."""
    if not extra:
        return url
    parts = urlsplit(url)
    added = urlencode(dict(extra))
    query = f"{parts.query}&{added}" if parts.query else added
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


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


async def _refusal_message(
    http: aiohttp.ClientSession, url: str, limit_s: float, headers: Mapping[str, str]
) -> str:
    """The engine's reason for a 400, read with a plain GET of the same URL (it checks the query before
    the upgrade, so it answers the same JSON body)."""
    parts = urlsplit(url)
    plain = urlunsplit(("https" if parts.scheme == "wss" else "http", *parts[1:]))
    try:
        async with timeout(limit_s), http.get(plain, allow_redirects=False, headers=headers) as resp:
            body = await resp.json(content_type=None)
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return "the backend refused the query (HTTP 400)"
    message = body.get("error") if isinstance(body, dict) else None
    return (
        f"the backend refused the query (HTTP 400): {str(message)[:300]}"
        if message
        else ("the backend refused the query (HTTP 400)")
    )


async def connect(
    http: aiohttp.ClientSession,
    backend: MoshiBackend,
    limit_s: float,
    max_msg_size: int,
    query: Mapping[str, str] | None = None,
    key: str | None = None,
) -> MoshiLink:
    """Open the websocket (``query`` added to the backend's URL) and wait for the 0x00 handshake, all
    within ``limit_s`` (an engine runs a PersonaPlex prompt's prefill before it). ``key`` goes in the
    ``kyutai-api-key`` header (our engine's chat modules ask for one; Kyutai's server ignores it). Raises
    :class:`MoshiConnectFailed`.
    """
    headers = {"kyutai-api-key": key} if key else {}
    url = with_query(backend.url, query or {})
    moshi_ws: aiohttp.ClientWebSocketResponse | None = None
    try:
        async with timeout(limit_s):
            moshi_ws = await http.ws_connect(
                url, autoping=True, max_msg_size=max_msg_size, headers=headers, **ws_close_timeout(2.0)
            )
            msg = await moshi_ws.receive()
    except asyncio.TimeoutError:
        if moshi_ws is None:
            raise MoshiConnectFailed("down", f"no connection within {limit_s:g} s") from None
        await close_quietly(moshi_ws)
        raise MoshiConnectFailed(
            "busy", f"no handshake within {limit_s:g} s (serving someone else?)"
        ) from None
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status == 503:
            raise MoshiConnectFailed("full", "every slot is taken (HTTP 503)") from None
        if exc.status == 400:
            raise MoshiConnectFailed("refused", await _refusal_message(http, url, limit_s, headers)) from None
        if exc.status == 401:
            raise MoshiConnectFailed(
                "down", "the backend refused the key (HTTP 401): set BRIDGE_MOSHI_KEY to one of its keys"
            ) from None
        raise MoshiConnectFailed("down", f"the backend refused the connection (HTTP {exc.status})") from None
    except (aiohttp.ClientError, OSError) as exc:
        if moshi_ws is not None:
            await close_quietly(moshi_ws)
        raise MoshiConnectFailed("down", f"connection failed ({type(exc).__name__})") from None
    except asyncio.CancelledError:
        if moshi_ws is not None:
            await close_quietly(moshi_ws)
        raise
    if msg.type is not aiohttp.WSMsgType.BINARY or msg.data[:1] != b"\x00":
        await close_quietly(moshi_ws)
        if msg.type is aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x05":
            detail = bytes(msg.data[1:301]).decode("utf-8", "replace")
            raise MoshiConnectFailed("down", f"the backend reported an error before its handshake: {detail}")
        raise MoshiConnectFailed("down", f"expected the 0x00 handshake, got {msg.type.name}")
    return MoshiLink(backend, moshi_ws)


async def close_quietly(ws: aiohttp.ClientWebSocketResponse) -> None:
    try:
        async with timeout(2.0):
            await ws.close()
    except (asyncio.TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
        pass
