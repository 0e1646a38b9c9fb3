"""Ogg/Opus encoding in worker processes, for the replies of a module with many conversations.

sphn's encoder holds the GIL while it encodes, about 1 ms per 80 ms frame: in the engine's process, the
encodes of 64 conversations take most of every frame away from the thread that steps the model. A
:class:`OpusPool` runs each stream's ``sphn.OpusStreamWriter`` in one of ``workers`` child processes
(spawned: no torch, no CUDA), so that the encodes run on other cores. A stream's pages are the bytes its
own writer in this process would give: the same encoder fed the same PCM in the same order.

Per worker, a sender thread writes the requests to its pipe and a receiver thread reads the replies in
order (a worker answers its requests in the order they came), so the event loop only queues bytes and
awaits a future. A worker that dies fails every waiting encode with :class:`OpusPoolError`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import multiprocessing
import queue
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

_PCM, _CLOSE = 0, 1
_OK, _FAIL = 0, 1


class OpusPoolError(RuntimeError):
    pass


def _serve(conn: Connection, sample_rate: int) -> None:  # pragma: no cover - runs in the child
    """A worker: one writer per stream id; a reply (``_OK`` + pages, or ``_FAIL`` + message) per PCM."""
    import sphn  # noqa: PLC0415 - the child's only heavy import

    writers: dict[int, Any] = {}
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        op, sid = msg[0], int.from_bytes(msg[1:9], "little")
        if op == _CLOSE:
            writers.pop(sid, None)
            continue
        try:
            writer = writers.get(sid)
            if writer is None:
                writer = writers[sid] = sphn.OpusStreamWriter(sample_rate)
            pages = bytes(writer.append_pcm(np.frombuffer(msg[9:], dtype=np.float32)))
            conn.send_bytes(bytes([_OK]) + pages)
        except Exception as exc:  # the parent gets the encoder's message
            conn.send_bytes(bytes([_FAIL]) + f"{type(exc).__name__}: {exc}".encode())


@dataclass(eq=False)
class _Worker:
    conn: Connection
    process: Any
    outbox: queue.SimpleQueue[bytes | None] = field(default_factory=queue.SimpleQueue)
    pending: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[bytes]]] = field(
        default_factory=collections.deque
    )
    failed: str | None = None


def _settle(future: asyncio.Future[bytes], data: bytes | None, error: str | None) -> None:
    if future.done():
        return  # its waiter timed out
    if error is not None:
        future.set_exception(OpusPoolError(error))
    else:
        future.set_result(data or b"")


class OpusPool:
    """``workers`` encoder processes; :meth:`stream` hands out streams, spread over them in turn."""

    def __init__(self, workers: int, sample_rate: int, name: str = "opus") -> None:
        if workers < 1:
            raise ValueError("an OpusPool needs at least one worker")
        self.sample_rate = sample_rate
        self.name = name
        self._count = workers
        self._workers: list[_Worker] = []
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []

    @property
    def workers(self) -> int:
        return self._count

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for i in range(self._count):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=_serve, args=(child, self.sample_rate), daemon=True, name=f"{self.name}-{i}"
            )
            process.start()
            child.close()
            worker = _Worker(parent, process)
            self._workers.append(worker)
            for target, role in ((self._send, "send"), (self._receive, "recv")):
                thread = threading.Thread(
                    target=target, args=(worker,), daemon=True, name=f"{self.name}-{i}-{role}"
                )
                thread.start()
                self._threads.append(thread)

    def stream(self) -> OpusStream:
        if not self._workers:
            raise OpusPoolError("the Opus pool is not started")
        sid = next(self._ids)
        return OpusStream(self._workers[sid % len(self._workers)], sid)

    def close(self) -> None:
        for worker in self._workers:
            worker.outbox.put(None)
        for worker in self._workers:
            worker.process.join(5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
        for thread in self._threads:
            thread.join(5)
        self._workers.clear()
        self._threads.clear()

    @staticmethod
    def _send(worker: _Worker) -> None:
        while True:
            msg = worker.outbox.get()
            if msg is None:
                break
            try:
                worker.conn.send_bytes(msg)
            except (OSError, ValueError):
                break
        worker.conn.close()  # the worker sees EOF and exits

    @staticmethod
    def _receive(worker: _Worker) -> None:
        while True:
            try:
                reply = worker.conn.recv_bytes()
            except (EOFError, OSError):
                break
            if not worker.pending:
                continue
            loop, future = worker.pending.popleft()
            if reply[0] == _OK:
                loop.call_soon_threadsafe(_settle, future, reply[1:], None)
            else:
                loop.call_soon_threadsafe(_settle, future, None, reply[1:].decode(errors="replace"))
        worker.failed = f"Opus encoder process {worker.process.name} exited"
        while worker.pending:
            loop, future = worker.pending.popleft()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, future, None, worker.failed)


class OpusStream:
    """One conversation's Ogg/Opus stream in a pool worker: :meth:`encode` returns its next pages."""

    def __init__(self, worker: _Worker, sid: int) -> None:
        self._worker = worker
        self._head = bytes([_PCM]) + sid.to_bytes(8, "little")
        self._sid = sid
        self._closed = False

    async def encode(self, pcm: np.ndarray[Any, Any]) -> bytes:
        """The pages for ``pcm`` (float32 samples; may be empty until a page is full)."""
        worker = self._worker
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        worker.pending.append((loop, future))
        if worker.failed is not None:  # checked after the append: a worker that died answers nobody
            _settle(future, None, worker.failed)
        worker.outbox.put(self._head + np.ascontiguousarray(pcm, dtype=np.float32).tobytes())
        return await future

    def close(self) -> None:
        """Drop the stream's writer in the worker (idempotent)."""
        if not self._closed:
            self._closed = True
            self._worker.outbox.put(bytes([_CLOSE]) + self._sid.to_bytes(8, "little"))
