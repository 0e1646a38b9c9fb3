"""Benchmark: what the bridge adds to a voice stream, measured against the same clients talking directly.

Usage::

    python -m personaplex_bridge.bench [--sessions 64] [--seconds 10] [--idle-sessions 200]

It starts a loopback peer that speaks Moshi's websocket protocol and answers every 0x01 frame at
once with the same frame (so only the bridge is measured), and the bridge as a subprocess pinned to
one CPU. Then, in one run:

1. memory: the bridge's resident memory before and after opening ``--idle-sessions`` idle sessions;
2. direct: ``--sessions`` clients send an 80 ms frame every 80 ms straight to the peer and time
   each echo;
3. via the bridge: the same clients, each in a voice session through the bridge, same traffic.

It prints the round-trip percentiles of both modes, the latency the bridge adds, the bridge's CPU
time per session-second, and its memory per idle session. Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import platform
import random
import socket
import statistics
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from .aio import timeout

FRAME_S = 0.08
TARGET_P99_ADDED_MS = 1.0
TARGET_IDLE_KIB = 100.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 < q < 1, in hundredths) of ``values``, by ``statistics.quantiles``
    (inclusive method); NaN when empty."""
    if not values:
        return math.nan
    if len(values) == 1:
        return float(values[0])
    cut = min(99, max(1, round(q * 100)))
    return statistics.quantiles(values, n=100, method="inclusive")[cut - 1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def _cpu_busy_seconds(cpu: int) -> float:
    """Busy time (everything but idle and iowait) of one CPU since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                ticks = [int(x) for x in line.split()[1:]]
                return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --- the loopback peer (Moshi's protocol, answering each frame at once) ---


async def _peer_chat(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 20)
    if not ws.can_prepare(request).ok:
        return web.Response(status=400, text="websocket expected")  # what Moshi answers a probe
    await ws.prepare(request)
    await ws.send_bytes(b"\x00")
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
            await ws.send_bytes(msg.data)
    return ws


async def _peer_mas(request: web.Request) -> web.Response:
    return web.json_response({"response": ""})


async def start_peer() -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/api/chat", _peer_chat)
    app.router.add_post("/mas", _peer_mas)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


# --- clients ---


@dataclass
class Stream:
    """One client's paced frames and the round trips measured inside the current window."""

    ws: aiohttp.ClientWebSocketResponse
    frame_bytes: int
    window: tuple[float, float] = (math.inf, math.inf)
    sent_at: dict[int, float] = field(default_factory=dict)
    rtts: list[float] = field(default_factory=list)
    sent: int = 0
    seq: int = 0

    def frame(self, seq: int) -> bytes:
        head = b"\x01" + struct.pack("<Q", seq)
        return head + b"\x55" * max(0, self.frame_bytes - len(head))

    async def send_loop(self, start: float, stop: float) -> None:
        loop = asyncio.get_running_loop()
        due = start
        while due < stop:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            self.sent_at[self.seq] = now
            await self.ws.send_bytes(self.frame(self.seq))
            if self.window[0] <= now < self.window[1]:
                self.sent += 1
            self.seq += 1
            due += FRAME_S

    async def receive_loop(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.BINARY or msg.data[:1] != b"\x01":
                continue
            now = time.perf_counter()
            (seq,) = struct.unpack_from("<Q", msg.data, 1)
            sent = self.sent_at.pop(seq, None)
            if sent is not None and self.window[0] <= sent < self.window[1]:
                self.rtts.append(now - sent)


@dataclass
class PhaseResult:
    rtts_ms: list[float]
    sent: int
    received: int
    window_s: float
    bridge_cpu_s: float = math.nan
    other_load: float = math.nan  # share of the bridge's CPU used by other processes during the window

    def p(self, q: float) -> float:
        return percentile(self.rtts_ms, q)

    @staticmethod
    def pool(results: Sequence[PhaseResult]) -> PhaseResult:
        return PhaseResult(
            sorted(x for r in results for x in r.rtts_ms),
            sum(r.sent for r in results),
            sum(r.received for r in results),
            sum(r.window_s for r in results),
            sum(r.bridge_cpu_s for r in results),
        )


async def run_phase(
    streams: list[Stream],
    seconds: float,
    warmup: float,
    bridge_pid: int | None,
    seed: int,
    bridge_cpu: int | None = None,
) -> PhaseResult:
    """Every stream sends for ``warmup + seconds``; round trips of frames sent after the warm-up count."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    for s in streams:
        s.rtts, s.sent = [], 0
    begin = loop.time() + 0.2
    stop = begin + warmup + seconds
    # Random phases, as independent users would have.
    senders = [asyncio.create_task(s.send_loop(begin + rng.uniform(0, FRAME_S), stop)) for s in streams]
    await asyncio.sleep(begin + warmup - loop.time())
    cpu0 = _cpu_seconds(bridge_pid) if bridge_pid else math.nan
    busy0 = _cpu_busy_seconds(bridge_cpu) if bridge_cpu is not None else math.nan
    t0 = time.perf_counter()
    t1 = t0 + seconds
    for s in streams:
        s.window = (t0, t1)
    await asyncio.gather(*senders)
    cpu1 = _cpu_seconds(bridge_pid) if bridge_pid else math.nan
    busy1 = _cpu_busy_seconds(bridge_cpu) if bridge_cpu is not None else math.nan
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(0.3)  # late echoes
    for s in streams:
        s.window = (math.inf, math.inf)
        s.sent_at.clear()
    rtts = sorted(r * 1000.0 for s in streams for r in s.rtts)
    sent = sum(s.sent for s in streams)
    own = cpu1 - cpu0 if bridge_pid else 0.0
    other = max(0.0, (busy1 - busy0 - own) / elapsed)
    return PhaseResult(rtts, sent, len(rtts), seconds, cpu1 - cpu0, other)


async def _expect(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, object]:
    async with timeout(20):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                event = msg.json()
                if event.get("type") == kind:
                    return dict(event)
                if event.get("type") in ("voice_unavailable", "error"):
                    raise RuntimeError(f"bridge answered {event}")
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise RuntimeError(f"bridge closed the socket waiting for {kind}")


# --- the bridge process ---


@dataclass
class BridgeProc:
    proc: asyncio.subprocess.Process
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with timeout(15):
                    await self.proc.wait()
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def start_bridge(peer_port: int, sessions: int, idle: int, cpu: int | None) -> BridgeProc:
    port = _free_port()
    urls = ",".join(f"ws://127.0.0.1:{peer_port}/api/chat?slot={i}" for i in range(sessions))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        BRIDGE_HOST="127.0.0.1",
        BRIDGE_PORT=str(port),
        BRIDGE_MAS_URL=f"http://127.0.0.1:{peer_port}/mas",
        BRIDGE_MOSHI_URLS=urls,
        BRIDGE_MAX_SESSIONS=str(max(sessions, idle) + 16),
        BRIDGE_PROBE_INTERVAL_S="3600",
        BRIDGE_ALLOWED_ORIGINS="*",
        BRIDGE_LOG_LEVEL="warning",
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "personaplex_bridge", env=env)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    bp = BridgeProc(proc, port)
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 30
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the bridge exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/status") as resp:
                    status = await resp.json()
                    if all(b["state"] == "up" for b in status["moshi"]["backends"]):
                        return bp
            if time.monotonic() > deadline:
                await bp.stop()
                raise RuntimeError("the bridge did not come up")
            await asyncio.sleep(0.1)


async def measure_idle(http: aiohttp.ClientSession, bridge: BridgeProc, count: int) -> float:
    """KiB of bridge RSS per idle session (ready received, nothing else)."""
    await asyncio.sleep(0.5)
    before = _rss_kib(bridge.pid)
    sockets = []
    for _ in range(count):
        ws = await http.ws_connect(f"ws://127.0.0.1:{bridge.port}/ws")
        await _expect(ws, "ready")
        sockets.append(ws)
    await asyncio.sleep(1.0)
    after = _rss_kib(bridge.pid)
    await asyncio.gather(*(ws.close() for ws in sockets))
    return (after - before) / count


async def bench(args: argparse.Namespace) -> int:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    bridge_cpu: int | None = None
    if len(cpus) >= 2 and not args.no_pin:
        bridge_cpu = cpus[0] if args.bridge_cpu is None else args.bridge_cpu
        if bridge_cpu not in cpus:
            print(f"personaplex-bridge-bench: CPU {bridge_cpu} is not available ({cpus})", file=sys.stderr)
            return 2
        os.sched_setaffinity(0, set(cpus) - {bridge_cpu})
    gc.collect()
    peer, peer_port = await start_peer()
    bridge = await start_bridge(peer_port, args.sessions, args.idle_sessions, bridge_cpu)
    connector = aiohttp.TCPConnector(limit=0)
    direct: list[PhaseResult] = []
    via: list[PhaseResult] = []
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            idle_kib = await measure_idle(http, bridge, args.idle_sessions)

            direct_streams = []
            for i in range(args.sessions):
                ws = await http.ws_connect(f"ws://127.0.0.1:{peer_port}/api/chat?slot=direct{i}", compress=0)
                first = await ws.receive()
                if first.type is not aiohttp.WSMsgType.BINARY or first.data != b"\x00":
                    raise RuntimeError("the loopback peer sent no handshake")
                direct_streams.append(Stream(ws, args.frame_bytes))
            via_streams = []
            for _ in range(args.sessions):
                ws = await http.ws_connect(f"ws://127.0.0.1:{bridge.port}/ws", compress=0)
                await _expect(ws, "ready")
                await ws.send_str('{"type":"voice_start"}')
                await _expect(ws, "voice_ready")
                via_streams.append(Stream(ws, args.frame_bytes))
            streams = direct_streams + via_streams
            receivers = [asyncio.create_task(s.receive_loop()) for s in streams]
            try:
                # Alternate the modes so that both see the same machine noise.
                for r in range(args.rounds):
                    direct.append(
                        await run_phase(direct_streams, args.seconds, args.warmup, None, r, bridge_cpu)
                    )
                    via.append(
                        await run_phase(via_streams, args.seconds, args.warmup, bridge.pid, r, bridge_cpu)
                    )
            finally:
                await asyncio.gather(*(s.ws.close() for s in streams))
                await asyncio.gather(*receivers, return_exceptions=True)
    finally:
        await bridge.stop()
        await peer.cleanup()
    report(args, direct, via, idle_kib, bridge_cpu)
    return 0


def report(
    args: argparse.Namespace,
    rounds_direct: list[PhaseResult],
    rounds_via: list[PhaseResult],
    idle_kib: float,
    bridge_cpu: int | None,
) -> None:
    direct, via = PhaseResult.pool(rounds_direct), PhaseResult.pool(rounds_via)
    cpu_ms = 1000.0 * via.bridge_cpu_s / (args.sessions * via.window_s)
    add50 = via.p(0.50) - direct.p(0.50)
    add99 = via.p(0.99) - direct.p(0.99)
    pin = (
        f"bridge pinned to CPU {bridge_cpu}, clients and peer on the other CPUs"
        if bridge_cpu is not None
        else ""
    )
    print("PersonaPlex bridge benchmark")
    print(
        f"{args.sessions} voice sessions, one {args.frame_bytes}-byte frame per 80 ms each; "
        f"{args.rounds} round(s) of {args.seconds:g} s per mode (after {args.warmup:g} s warm-up), "
        f"modes alternating"
    )
    print(
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {os.cpu_count()} CPUs"
        + (f"; {pin}" if pin else "; not pinned")
    )
    print()
    print("| measure | direct to peer | via bridge | added by bridge | ratio (bridge / direct) |")
    print("|---|---|---|---|---|")
    for name, q, added in (("round trip p50", 0.50, add50), ("round trip p99", 0.99, add99)):
        d, v = direct.p(q), via.p(q)
        share = added / (FRAME_S * 1000) * 100
        print(
            f"| {name} | {d:.3f} ms | {v:.3f} ms | {added:+.3f} ms ({share:.2f} % of a frame) | {v / d:.2f} |"
        )
    print(f"| round trip max | {direct.rtts_ms[-1]:.3f} ms | {via.rtts_ms[-1]:.3f} ms | | |")
    print(f"| frames echoed / sent | {direct.received} / {direct.sent} | {via.received} / {via.sent} | | |")
    print(f"| bridge CPU per session-second | | {cpu_ms:.3f} ms ({cpu_ms / 10:.3f} % of a core) | | |")
    print(
        f"| bridge memory per idle session | | {idle_kib:.1f} KiB (over {args.idle_sessions} sessions) | | |"
    )
    if bridge_cpu is not None or len(rounds_via) > 1:
        print()
        print("| round | p99 direct | p99 via bridge | p99 added | other processes on the bridge's CPU |")
        print("|---|---|---|---|---|")
        for i, (rd, rv) in enumerate(zip(rounds_direct, rounds_via, strict=True), 1):
            load = "n/a" if math.isnan(rv.other_load) else f"{rv.other_load * 100:.0f} %"
            added = rv.p(0.99) - rd.p(0.99)
            print(f"| {i} | {rd.p(0.99):.3f} ms | {rv.p(0.99):.3f} ms | {added:+.3f} ms | {load} |")
    busy_rounds = [i for i, rv in enumerate(rounds_via, 1) if rv.other_load > 0.2]
    if busy_rounds:
        print()
        print(
            f"note: other processes used over 20 % of the bridge's CPU in round(s) {busy_rounds}; their p99 "
            "measures the scheduler more than the bridge."
        )
    print()
    ok99 = add99 <= TARGET_P99_ADDED_MS
    okmem = idle_kib <= TARGET_IDLE_KIB
    print(f"target p99 added <= {TARGET_P99_ADDED_MS:g} ms: {'met' if ok99 else 'MISSED'} ({add99:+.3f} ms)")
    print(
        f"target idle session <= {TARGET_IDLE_KIB:g} KiB: {'met' if okmem else 'MISSED'} ({idle_kib:.1f} KiB)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="personaplex-bridge-bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=64, help="concurrent voice sessions (64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode (10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct/bridge rounds (3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each mode (1)")
    parser.add_argument("--idle-sessions", type=int, default=200, help="idle sessions for the memory figure")
    parser.add_argument("--frame-bytes", type=int, default=160, help="bytes per frame, kind byte included")
    parser.add_argument("--bridge-cpu", type=int, default=None, help="CPU for the bridge (the first one)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the bridge to its own CPU")
    args = parser.parse_args(argv)
    if (
        args.rounds < 1
        or args.sessions < 1
        or args.seconds <= 0
        or args.idle_sessions < 1
        or args.frame_bytes < 9
    ):
        parser.error(
            "--rounds, --sessions and --idle-sessions must be >= 1, --seconds > 0, --frame-bytes >= 9"
        )
    if not os.path.exists("/proc/self/stat"):
        print("personaplex-bridge-bench: needs Linux /proc", file=sys.stderr)
        return 2
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
