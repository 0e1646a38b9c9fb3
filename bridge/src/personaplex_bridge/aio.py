"""Small asyncio helpers shared by the modules: a version-independent ``timeout`` and task reaping."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from typing import Any

import aiohttp

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover - Python 3.10 (Ubuntu 22.04)
    from async_timeout import timeout

__all__ = ["cancel_and_wait", "timeout", "uncancel", "ws_close_timeout"]


def ws_close_timeout(seconds: float) -> dict[str, Any]:
    """``ws_connect`` keyword arguments: no receive timeout, ``seconds`` to wait for the close reply.

    aiohttp 3.11 takes a ``ClientWSTimeout``; 3.10 takes a float (deprecated in 3.11).
    """
    factory = getattr(aiohttp, "ClientWSTimeout", None)
    if factory is None:  # pragma: no cover - aiohttp 3.10
        return {"timeout": seconds}
    return {"timeout": factory(ws_receive=None, ws_close=seconds)}


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | None], grace_s: float = 5.0) -> None:
    """Cancel ``tasks`` and wait (at most ``grace_s``) until they have finished.

    Exceptions raised by the tasks are retrieved so that asyncio does not log them as never retrieved;
    the tasks are expected to report their own failures.
    """
    present = [t for t in tasks if t is not None]
    pending = [t for t in present if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=grace_s)
    for task in present:
        if task.done() and not task.cancelled():
            task.exception()


def uncancel() -> None:
    """Forget a cancellation this task has handled itself (a watchdog's), on Pythons that count them."""
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
