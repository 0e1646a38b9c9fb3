"""The chat pool's choice among backends, from the state its probes record (``pool.MoshiBackend``).

The probes themselves run against real engines and a real ``moshi.server`` in ``test_chat_voice.py``
and ``test_voice.py``; here the recorded state is set directly, to cover every ranking case.
"""

from __future__ import annotations

from typing import Any

from personaplex_bridge.pool import MoshiPool


def pool(*backends: dict[str, Any]) -> MoshiPool:
    out = MoshiPool(tuple(f"ws://b{i}:8998/api/chat" for i in range(len(backends))), None, 1.0)  # type: ignore[arg-type]
    for backend, values in zip(out.backends, backends, strict=True):
        backend.up = True
        for key, value in values.items():
            setattr(backend, key, value)
    return out


def engine(slots: int, p50: float | None, p99: float | None, **extra: Any) -> dict[str, Any]:
    return {"kind": "engine", "slots_total": slots, "step_ms_p50": p50, "step_ms_p99": p99, **extra}


def test_real_time_first_then_unmeasured_then_not_real_time():
    p = pool(engine(4, 150.0, 200.0), engine(1, 25.0, 30.0), engine(2, None, None))
    cpu, gpu, fresh = p.backends
    assert (cpu.real_time, gpu.real_time, fresh.real_time) == (False, True, None)
    assert p.acquire() is gpu
    assert cpu.passed_over is not None
    assert cpu.passed_over.startswith("not real time (step p99 200 ms > the 80 ms frame)")
    assert fresh.passed_over is not None
    assert fresh.passed_over.startswith("not measured")
    # The real-time one is full: the unmeasured one before the one that is not real time.
    assert gpu.busy
    assert p.acquire() is fresh
    assert p.acquire() is fresh
    # Only the one that is not real time has a free slot left: it is taken rather than nothing.
    assert p.acquire() is cpu
    assert p.summary() == "up"
    snap = {b["url"]: b for b in p.snapshot()["backends"]}
    assert snap[cpu.url]["real_time"] is False
    assert snap[cpu.url]["slots_free"] == 3
    assert snap[cpu.url]["held"] == 1
    p.release(gpu)
    assert not gpu.busy
    assert p.acquire() is gpu


def test_fastest_real_time_backend_wins_and_others_count():
    p = pool(engine(8, 50.0, 70.0), engine(8, 20.0, 40.0, others=7))
    slow, fast = p.backends
    assert p.acquire() is fast  # the one free slot left after the 7 others use
    assert slow.passed_over is not None
    assert "slower (step p50 50 ms)" in slow.passed_over
    assert fast.busy
    assert p.acquire() is slow
    # An engine that answered 503 is full until the next probe.
    p.mark_full(slow)
    assert p.acquire() is None
    assert p.summary() == "busy"


def test_kyutai_servers_one_conversation_each_round_robin_and_engine_only():
    p = pool({"kind": "moshi"}, {"kind": "moshi"}, engine(2, 30.0, 40.0, up=False))
    a, b, eng = p.backends
    assert p.acquire(engine_only=True) is None  # the say channel needs our engine
    assert p.summary(engine_only=True) == "down"
    assert p.acquire() is a
    assert a.busy
    assert p.acquire() is b
    assert p.acquire() is None
    p.release(a)
    assert p.acquire() is a
    snap = a.snapshot()
    assert snap["kind"] == "moshi"
    assert snap["real_time"] is None
    assert "no /status" in snap["real_time_reason"]
    eng.up = True
    assert p.acquire(engine_only=True) is eng
