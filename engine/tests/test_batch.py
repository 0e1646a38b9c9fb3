"""BatchLoop mechanics with a counting stepper: slots, resets, routing, slow clients, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from voice_engine.batch import BatchLoop, status_of
from voice_engine.stats import StepStats


class Counter:
    """Each slot returns (its seed, how many inputs it has seen, the inputs of this step)."""

    def __init__(self, slots: int, fail_at: int | None = None) -> None:
        self._slots = slots
        self.seen: dict[int, int] = {}
        self.seed: dict[int, Any] = {}
        self.calls: list[tuple[set[int], set[int]]] = []
        self.fail_at = fail_at

    @property
    def slots(self) -> int:
        return self._slots

    def step(self, inputs: Mapping[int, Sequence[int]], resets: Mapping[int, Any]) -> dict[int, Any]:
        self.calls.append((set(inputs), set(resets)))
        if self.fail_at is not None and len(self.calls) >= self.fail_at:
            raise RuntimeError("boom")
        for slot, params in resets.items():
            self.seen[slot] = 0
            self.seed[slot] = params
        out = {}
        for slot, items in inputs.items():
            self.seen[slot] += len(items)
            out[slot] = (self.seed[slot], self.seen[slot], list(items))
        return out


async def _get(lease: Any) -> Any:
    return await asyncio.wait_for(lease.outputs.get(), 5)


async def test_slots_are_limited_and_reused() -> None:
    loop: BatchLoop[int, Any] = BatchLoop("t", Counter(2))
    loop.start()
    try:
        a, b = loop.acquire("a"), loop.acquire("b")
        assert a is not None and b is not None and {a.slot, b.slot} == {0, 1}
        assert loop.acquire("c") is None
        a.release()
        a.release()  # idempotent
        c = loop.acquire("c")
        assert c is not None and c.slot == a.slot
        c.submit(7)
        assert await _get(c) == ("c", 1, [7])  # the reused slot was reset for c
        assert status_of(loop)["slots_free"] == 0
    finally:
        await loop.close()


async def test_frame_mode_takes_one_item_per_step_and_stream_mode_takes_all() -> None:
    frames: BatchLoop[int, Any] = BatchLoop("f", Counter(1))
    stream: BatchLoop[int, Any] = BatchLoop("s", Counter(1), take_all=True)
    frames.start()
    stream.start()
    try:
        lf, ls = frames.acquire(0), stream.acquire(0)
        assert lf is not None and ls is not None
        for i in range(3):
            lf.submit(i)
            ls.submit(i)
        assert [(await _get(lf))[2] for _ in range(3)] == [[0], [1], [2]]
        first = await _get(ls)
        assert first[1] == 3 or first[2] == [0]  # all pending items, or the first if the step began early
        ls.set_continuous(True)
        assert (await _get(ls))[0] == 0  # continuous leases step with an empty inbox too
        ls.set_continuous(False)
    finally:
        await frames.close()
        await stream.close()


async def test_a_client_that_never_reads_is_closed_without_blocking_others() -> None:
    loop: BatchLoop[int, Any] = BatchLoop("t", Counter(2), out_queue_max=2)
    loop.start()
    try:
        slow, fast = loop.acquire(0), loop.acquire(1)
        assert slow is not None and fast is not None
        for i in range(10):
            slow.submit(i)
            fast.submit(i)
            await _get(fast)
        assert slow.closed_reason == "client too slow"
        assert fast.closed_reason is None
    finally:
        await loop.close()


async def test_a_step_failure_closes_every_session_with_the_reason() -> None:
    loop: BatchLoop[int, Any] = BatchLoop("t", Counter(2, fail_at=1))
    loop.start()
    try:
        lease = loop.acquire(0)
        assert lease is not None
        lease.submit(1)
        assert await _get(lease) is None
        assert lease.closed_reason == "engine error: RuntimeError: boom"
        assert loop.failed == "RuntimeError: boom"
        assert loop.acquire(1) is None
    finally:
        await loop.close()


def test_step_stats_percentiles() -> None:
    stats = StepStats()
    assert stats.percentiles_ms() == (None, None)
    for ms in range(1, 101):
        stats.record(ms / 1000, 1)
    p50, p99 = stats.percentiles_ms()
    assert p50 == pytest.approx(50.5, abs=0.01)
    assert p99 == pytest.approx(99.01, abs=0.01)
    assert stats.steps_total == 100
