"""The replies' Ogg/Opus encoded in worker processes (``opus_pool.py``, the chat option ``opus_workers``):
the same bytes as the writer in the engine's process, and a clear error when a worker dies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sphn

from chat_helpers import chat_module, converse, talk, tiny_chat_dir, user_frames
from conftest import EngineProcess, start_engine
from voice_engine.modules.chat import opus_workers_for
from voice_engine.opus_pool import OpusPool, OpusPoolError

PROMPT = {"voice_prompt": "TINYF0.pt", "text_prompt": "you are a tiny model", "seed": 42}


def test_pool_pages_equal_the_in_process_writer_per_stream() -> None:
    frames = user_frames(3, 12)
    other = user_frames(4, 12)

    async def pooled() -> tuple[list[bytes], list[bytes]]:
        pool = OpusPool(2, 24000)
        pool.start()
        try:
            a, b, c = pool.stream(), pool.stream(), pool.stream()  # a and c share a worker
            pages_a, pages_c = [], []
            for x, y in zip(frames, other, strict=True):
                got = await asyncio.gather(a.encode(x), b.encode(y), c.encode(y))
                pages_a.append(got[0])
                pages_c.append(got[2])
            a.close()
            b.close()
            c.close()
            return pages_a, pages_c
        finally:
            await asyncio.to_thread(pool.close)

    pages_a, pages_c = asyncio.run(pooled())
    mine, theirs = sphn.OpusStreamWriter(24000), sphn.OpusStreamWriter(24000)
    assert pages_a == [bytes(mine.append_pcm(x)) for x in frames]
    assert pages_c == [bytes(theirs.append_pcm(y)) for y in other]
    assert all(pages_a[1:])


def test_a_dead_worker_fails_the_encode_instead_of_hanging() -> None:
    async def main() -> None:
        pool = OpusPool(1, 24000)
        pool.start()
        try:
            stream = pool.stream()
            assert await stream.encode(np.zeros(1920, np.float32)) is not None
            pool._workers[0].process.kill()

            async def encode_until_it_fails() -> None:
                async with asyncio.timeout(10):
                    for _ in range(10):  # a request may still be in the pipe when it dies
                        await stream.encode(np.zeros(1920, np.float32))

            with pytest.raises(OpusPoolError, match="exited"):
                await encode_until_it_fails()
        finally:
            await asyncio.to_thread(pool.close)

    asyncio.run(main())


def test_default_workers_scale_with_slots() -> None:
    assert opus_workers_for(1) == 0 and opus_workers_for(7) == 0
    assert 1 <= opus_workers_for(64) <= 8


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[list[EngineProcess]]:
    model_dir = tiny_chat_dir(models_root, "personaplex")
    started = []
    try:
        for workers in (0, 2):
            modules = chat_module(model_dir, 2, idle_timeout_s=5.0, opus_workers=workers)
            started.append(start_engine(tmp_path_factory.mktemp(f"chat-opus-{workers}"), modules))
        yield started
    finally:
        for eng in started:
            eng.stop()


def test_pooled_replies_are_the_bytes_of_the_in_process_writer(engines: list[EngineProcess]) -> None:
    local, pooled = engines
    assert local.status()["modules"]["chat"]["opus_workers"] == 0
    assert pooled.status()["modules"]["chat"]["opus_workers"] == 2
    frames = user_frames(5, 12)
    alone = talk(local.ws, frames, **PROMPT)

    async def two() -> list:
        return list(
            await asyncio.gather(
                converse(pooled.ws, frames, **PROMPT), converse(pooled.ws, user_frames(6, 12), seed=3)
            )
        )

    first, second = asyncio.run(two())
    assert len(alone.audio) == len(frames) and alone.audio[0].startswith(b"OggS")
    assert first.settled == alone.settled
    assert second.settled == talk(local.ws, user_frames(6, 12), seed=3).settled
