"""Batched stepping: many sessions share one model; every step advances all slots that have work.

The split between the event loop and the model:

* A :class:`Stepper` is the model side (torch, blocking). It owns ``slots`` rows of streaming state and
  advances the rows it is given by one 80 ms frame per :meth:`Stepper.step` call. It runs on one worker
  thread per module, so a step never blocks the event loop and two steps of one module never overlap.
* A :class:`BatchLoop` is the event-loop side. Sessions :meth:`BatchLoop.acquire` a :class:`Lease` (a
  slot), put inputs in its inbox, and read outputs from its queue. The loop gathers one input per ready
  slot, runs one step on the worker thread, and hands each slot's output back to its lease.

A slot is reset (its streaming state cleared, its seed and parameters applied) at the first step after it
is acquired, inside the same :meth:`Stepper.step` call, so that a joining session never disturbs the
others and never sees the state of the session before it.

A lease whose output queue is full (a client that stopped reading) is closed by the loop with reason
``"client too slow"``: the batch never waits for one session.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from .stats import StepStats

log = logging.getLogger("voice_engine.batch")

InT = TypeVar("InT")
OutT = TypeVar("OutT")
InT_contra = TypeVar("InT_contra", contravariant=True)
OutT_co = TypeVar("OutT_co", covariant=True)


class Stepper(Protocol[InT_contra, OutT_co]):
    """The model side of a module. Implementations live in ``voice_engine.models``."""

    @property
    def slots(self) -> int:
        """Rows of streaming state (the batch size; fixed for the process)."""
        ...

    def step(
        self, inputs: Mapping[int, Sequence[InT_contra]], resets: Mapping[int, Any]
    ) -> Mapping[int, OutT_co]:
        """Advance the slots in ``inputs`` by one frame; the other slots keep their state untouched.

        ``resets`` maps a slot to its start parameters (for example a seed, a voice); those slots are
        reset before this step. A reset slot may also be in ``inputs``. Returns one output per slot of
        ``inputs`` (a stepper may omit a slot that produced nothing).
        """
        ...


@dataclass(eq=False)
class Lease(Generic[InT, OutT]):
    """One session's slot: its inbox, its outputs, and whether it wants steps without input."""

    slot: int
    params: Any
    outputs: asyncio.Queue[OutT | None]  # None: the loop closed the lease (see closed_reason)
    inbox: collections.deque[InT] = field(default_factory=collections.deque)
    continuous: bool = False  # step even with an empty inbox (TTS while it generates)
    closed_reason: str | None = None
    released: bool = False
    steps: int = 0
    _loop: BatchLoop[InT, OutT] | None = None

    def submit(self, item: InT) -> None:
        """Queue an input (an audio frame, a word); the loop takes it at its next step."""
        self.inbox.append(item)
        if self._loop is not None:
            self._loop.wake()

    def set_continuous(self, on: bool) -> None:
        self.continuous = on
        if on and self._loop is not None:
            self._loop.wake()

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        if self._loop is not None and not self.released:
            self._loop._release(self)


class BatchLoop(Generic[InT, OutT]):
    """Runs a :class:`Stepper` for the sessions of one module.

    ``take_all``: frame modules (ASR) take one inbox item per step; streaming ones (TTS) take the whole
    inbox at each step (every word that arrived since the last one).

    ``gather_s``: how long a step may wait, once some slot has work, for every slot to have work (0: step
    at once). A step costs the same whatever the number of slots with work, so with clients at random
    phases, stepping at once runs more (partial) steps than frames; waiting gives one full step per frame.
    """

    def __init__(
        self,
        name: str,
        stepper: Stepper[InT, OutT],
        *,
        take_all: bool = False,
        out_queue_max: int = 256,
        gather_s: float = 0.0,
    ) -> None:
        self.name = name
        self.gather_s = gather_s
        self.stepper = stepper
        self.take_all = take_all
        self.out_queue_max = out_queue_max
        self.stats = StepStats()
        self._leases: dict[int, Lease[InT, OutT]] = {}
        self._free: list[int] = list(range(stepper.slots - 1, -1, -1))
        self._resets: dict[int, Any] = {}
        self._wake = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"step-{name}")
        self._task: asyncio.Task[None] | None = None
        self.failed: str | None = None

    # --- capacity ---

    @property
    def slots_total(self) -> int:
        return self.stepper.slots

    @property
    def slots_used(self) -> int:
        return len(self._leases)

    def acquire(self, params: Any = None) -> Lease[InT, OutT] | None:
        """A free slot, or None when every slot is taken (the caller refuses the session)."""
        if not self._free or self.failed is not None:
            return None
        slot = self._free.pop()
        queue: asyncio.Queue[OutT | None] = asyncio.Queue(self.out_queue_max)
        lease: Lease[InT, OutT] = Lease(slot, params, queue, _loop=self)
        self._leases[slot] = lease
        self._resets[slot] = params
        return lease

    def _release(self, lease: Lease[InT, OutT]) -> None:
        lease.released = True
        if self._leases.get(lease.slot) is lease:
            del self._leases[lease.slot]
            self._resets.pop(lease.slot, None)
            self._free.append(lease.slot)

    def wake(self) -> None:
        self._wake.set()

    # --- the loop ---

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batch-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _gather(self) -> dict[int, list[InT]]:
        inputs: dict[int, list[InT]] = {}
        for slot, lease in self._leases.items():
            if lease.closed_reason is not None:
                continue
            if lease.inbox:
                if self.take_all:
                    inputs[slot] = list(lease.inbox)
                    lease.inbox.clear()
                else:
                    inputs[slot] = [lease.inbox.popleft()]
            elif lease.continuous:
                inputs[slot] = []
        return inputs

    def _ready(self) -> tuple[bool, bool]:
        """(some slot has work, every slot has work)."""
        ready = [
            bool(lease.inbox) or lease.continuous
            for lease in self._leases.values()
            if not lease.closed_reason
        ]
        return any(ready) or bool(self._resets), all(ready)

    async def _wait_for_all(self) -> None:
        deadline = time.monotonic() + self.gather_s
        while True:
            self._wake.clear()  # before looking: a frame that arrives after the look wakes the wait
            some, every = self._ready()
            left = deadline - time.monotonic()
            if not some or every or left <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.gather_s > 0:
                await self._wait_for_all()
            inputs = self._gather()
            if not inputs and not self._resets:
                self._wake.clear()
                await self._wake.wait()
                continue
            resets, self._resets = self._resets, {}
            leases = {slot: self._leases[slot] for slot in inputs}
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self.stepper.step, inputs, resets)
            except Exception as exc:  # a model failure ends every session of the module, loudly
                self.failed = f"{type(exc).__name__}: {exc}"
                log.exception("module %s: step failed; closing its sessions", self.name)
                for lease in list(self._leases.values()):
                    self._close(lease, "engine error: " + self.failed)
                return
            if inputs:
                self.stats.record(time.perf_counter() - started, len(inputs))
            for slot, out in outputs.items():
                target = leases.get(slot)
                if target is None or target.released or target.closed_reason is not None:
                    continue  # the session left during the step: its output goes nowhere
                target.steps += 1
                try:
                    target.outputs.put_nowait(out)
                except asyncio.QueueFull:
                    self._close(target, "client too slow")
            # Let the sessions' tasks run between steps (they queue the next inputs).
            await asyncio.sleep(0)

    def _close(self, lease: Lease[InT, OutT], reason: str) -> None:
        lease.closed_reason = reason
        lease.continuous = False
        lease.inbox.clear()
        # Wake a reader blocked on an empty queue: it checks closed_reason after each get.
        if lease.outputs.empty():
            lease.outputs.put_nowait(None)


@dataclass(frozen=True)
class Ended:
    """Why a session's outputs stopped: its reader task ended first (``reader``: that task's result), or
    the loop closed the lease (``closed``: the reason)."""

    reader: Any = None
    closed: str | None = None


async def next_output(
    lease: Lease[Any, OutT], reader: asyncio.Task[Any], poll_s: float = 1.0
) -> OutT | Ended:
    """The lease's next output, or :class:`Ended` once the session's reader task has finished or the loop
    has closed the lease with nothing left to read. The caller tells its client why."""
    while True:
        getter = asyncio.ensure_future(lease.outputs.get())
        await asyncio.wait({getter, reader}, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
        if getter.done() and not getter.cancelled():
            out = getter.result()
            if out is None:
                return Ended(closed=lease.closed_reason or "the session was closed")
            return out
        if reader.done():
            return Ended(reader=reader.result())
        if lease.closed_reason is not None and lease.outputs.empty():
            return Ended(closed=lease.closed_reason)


def status_of(loop: BatchLoop[Any, Any]) -> dict[str, Any]:
    """The capacity part of a module's ``/status`` entry."""
    p50, p99 = loop.stats.percentiles_ms()
    return {
        "slots_total": loop.slots_total,
        "slots_used": loop.slots_used,
        "slots_free": loop.slots_total - loop.slots_used,
        "steps_last_minute": loop.stats.count(),
        "step_ms_p50": p50,
        "step_ms_p99": p99,
        "failed": loop.failed,
    }
