"""``voice-engine bench --kind chat``: conversations per GPU through the real engine server and websockets.

For each concurrency level B, a fresh ``voice-engine serve`` process with a ``chat`` module of B slots
(the model set of ``--model-dir``), then B websocket clients at once, as PersonaPlex's web client:
``/api/chat?voice_prompt=...&text_prompt=...&seed=i``, wait for the ``0x00`` handshake (the prefill of
the voice and text prompts: the handshake time), start at a random phase within one frame, and stream
``--seconds`` of Ogg/Opus audio in real time, one 80 ms frame every 80 ms. Each client times every
frame from its send to the arrival of the agent's audio for it (client-observed frame time; the first
second is left out). The server's own step times (``step_ms_p50`` / ``step_ms_p99`` of ``/status``, the
last minute: the prefill and streaming steps of the level) and its peak GPU memory (``gpu_memory_gib``)
are read from ``/status`` at the end. Printed per B: p50/p99 of both, handshake p50/max, peak memory;
then the largest B whose p99 stays under the 80 ms frame, by the server's steps and by the clients.

``--write-set DIR`` (with ``--kind chat``) writes the full-size PersonaPlex-shaped set instead: moshi's
built-in 7B LM settings with ``dep_q = 16`` in ``config.json`` (the engine serves it with 8), random
bf16 weights, the real Mimi shape (unseeded codebooks: its codes carry nothing, speed is unaffected), a
32000-piece tokenizer with ``<system>`` made here, and a ``voices/`` folder with ``BENCHF0.wav`` (5 s,
synthetic) and ``BENCHF0.pt`` (what NVIDIA's fork stores for it, computed by ``models/chat_prompt.py``).
Random weights: the figures are speed and memory only; the words are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

# Imported only by ``voice-engine bench --kind chat``: the model code is no concern of ``serve`` here.
import aiohttp
import numpy as np
import sphn
import torch
from moshi.models import loaders
from safetensors.torch import save_file

from .models import chat_prompt, loading
from .models.chat import ChatParams, ChatStepper
from .models.sampling import SamplingParams
from .tiny import chat as tiny_chat
from .tiny import tokenizer as tiny_tokenizer
from .wav import write_wav

FRAME_MS = 80.0
FRAME = 1920
RATE = 24000
VOICE_NAME = "BENCHF0"
VOICE_SECONDS = 5.0
TEXT_PROMPT = (
    "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way."
)
KEY = "bench_token"
SKIP_S = 1.0  # the first second of each stream is not timed


# --- the full-size set ---


def write_full_chat_set(out: Path, device: str = "cuda") -> Path:
    """The PersonaPlex-shaped 7B set (see the module docstring); the LM is initialised on ``device``."""
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = copy.deepcopy(loaders._lm_kwargs) | {"dep_q": 16}
    vocab = int(kwargs["text_card"])
    fillers = tuple(f"<w{i}>" for i in range(vocab - tiny_tokenizer.DEFAULT_VOCAB_SIZE - 1))
    symbols = (chat_prompt.SYSTEM_TAG, *fillers)  # room for every id the text head can emit
    (out / tiny_tokenizer.TOKENIZER_NAME).write_bytes(tiny_tokenizer.tokenizer_bytes(0, vocab, symbols))
    dev = device if device == "cpu" or torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(kwargs), device=dev, dtype=torch.bfloat16)
    lm.eval()
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in lm.state_dict().items()}, str(out / "model.safetensors")
    )
    mimi = loaders.get_mimi(None, device="cpu", num_codebooks=8)
    save_file(
        {k: v.detach().contiguous() for k, v in mimi.state_dict().items()}, str(out / "mimi.safetensors")
    )
    voices = out / "voices"
    voices.mkdir(exist_ok=True)
    wav = voices / f"{VOICE_NAME}.wav"
    write_wav(wav, tiny_chat.voice_audio(220.0, 0, VOICE_SECONDS), tiny_chat.VOICE_RATE)
    layout = chat_prompt.Layout(
        delays=tuple(int(d) for d in lm.delays),
        dep_q=8,
        dim=int(lm.dim),
        silence=chat_prompt.REAL_SILENCE_TOKENS,
        sine=chat_prompt.REAL_SINE_TOKENS,
    )
    codes = chat_prompt.encode_voice(mimi, chat_prompt.read_voice_audio(wav), torch.device("cpu"))
    with torch.no_grad():
        pt = chat_prompt.voice_pt_from_codes(lm, layout, codes)
    torch.save(pt, str(voices / f"{VOICE_NAME}.pt"))
    config = {
        **kwargs,
        "model_type": "moshi",
        "model_id": {"sig": "bench-personaplex-7b", "epoch": 0},
        "lm_gen_config": {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25},
        "moshi_name": "model.safetensors",
        "mimi_name": "mimi.safetensors",
        "tokenizer_name": tiny_tokenizer.TOKENIZER_NAME,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


# --- one level: a server of B slots, B clients ---


def user_pages(seconds: float, seed: int = 0) -> list[bytes]:
    """A voiced user signal as Ogg/Opus pages, one per 80 ms frame (the same bytes for every client)."""
    frames = math.ceil(seconds * 1000 / FRAME_MS)
    rng = np.random.default_rng(seed)
    t = np.arange(frames * FRAME) / RATE
    f0 = 140.0 * (1 + 0.05 * np.sin(2 * math.pi * 0.7 * t))
    signal = sum(np.sin(h * 2 * math.pi * np.cumsum(f0) / RATE) / h for h in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * math.pi * 2.5 * t) ** 2
    pcm = (0.2 * envelope * signal + 0.01 * rng.standard_normal(t.shape[0])).astype(np.float32)
    writer = sphn.OpusStreamWriter(RATE)
    pages = [bytes(writer.append_pcm(pcm[i * FRAME : (i + 1) * FRAME])) for i in range(frames)]
    if not all(pages):
        raise RuntimeError("the Opus writer gave an empty page: the client cannot map replies to frames")
    return pages


@dataclass
class ClientResult:
    handshake_s: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    replies: int = 0
    error: str | None = None


@dataclass
class Start:
    """Every client waits here after its handshake, so that the streaming is timed apart from prefills."""

    clients: int
    arrived: int = 0
    go: asyncio.Event = field(default_factory=asyncio.Event)
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.clients:
            self.all_in.set()


async def _client(
    base: str,
    seed: int,
    pages: list[bytes],
    phase_s: float,
    timeout_s: float,
    voice: str,
    text: str,
    start: Start,
) -> ClientResult:
    result = ClientResult()
    query = {"auth_id": KEY, "seed": seed, "voice_prompt": voice, "text_prompt": text}
    sent: list[float] = []
    skip = int(SKIP_S * 1000 / FRAME_MS)
    arrived = False
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
            started = time.perf_counter()
            async with http.ws_connect(f"{base}/api/chat?{urlencode(query)}", max_msg_size=0) as ws:
                while True:
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        raise RuntimeError(f"before the handshake: {msg.type} {msg.data!r:.200}")
                    if msg.data[:1] == b"\x00":
                        break
                    if msg.data[:1] == b"\x05":
                        raise RuntimeError(f"engine error: {msg.data[1:].decode(errors='replace')}")
                result.handshake_s = time.perf_counter() - started
                start.arrive()
                arrived = True
                await start.go.wait()
                await asyncio.sleep(phase_s)

                async def send() -> None:
                    t0 = time.perf_counter()
                    for i, page in enumerate(pages):
                        delay = t0 + i * FRAME_MS / 1000 - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        sent.append(time.perf_counter())
                        await ws.send_bytes(b"\x01" + page)

                sender = asyncio.create_task(send())
                while result.replies < len(pages):
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        raise RuntimeError(f"after {result.replies} replies: {msg.type} {msg.data!r:.200}")
                    kind = msg.data[:1]
                    if kind == b"\x05":
                        raise RuntimeError(f"engine error: {msg.data[1:].decode(errors='replace')}")
                    if kind == b"\x01":
                        now = time.perf_counter()
                        if result.replies >= skip and result.replies < len(sent):
                            result.latencies_ms.append((now - sent[result.replies]) * 1000)
                        result.replies += 1
                await sender
    except (TimeoutError, RuntimeError, OSError, aiohttp.ClientError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if not arrived:
            start.arrive()
    return result


def step_counters(http: str) -> tuple[float, float]:
    """The chat module's ``voice_engine_steps_total`` and ``voice_engine_step_seconds_total``."""
    with urllib.request.urlopen(http + "/metrics", timeout=10) as resp:  # noqa: S310 - our own server
        text = resp.read().decode()
    values = {"voice_engine_steps_total": 0.0, "voice_engine_step_seconds_total": 0.0}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in values and 'module="chat"' in rest:
            values[name] = float(line.rsplit(" ", 1)[1])
    return values["voice_engine_steps_total"], values["voice_engine_step_seconds_total"]


async def _clients(
    http: str, slots: int, pages: list[bytes], timeout_s: float, voice: str, text: str
) -> tuple[list[ClientResult], float | None, int]:
    """Run the clients; also the server's mean step (ms) and its step count while they streamed."""
    rng = random.Random(slots)  # noqa: S311 - phases, not secrets
    start = Start(slots)
    base = http.replace("http://", "ws://")
    tasks = [
        asyncio.create_task(
            _client(base, i, pages, rng.uniform(0, FRAME_MS / 1000), timeout_s, voice, text, start)
        )
        for i in range(slots)
    ]
    async with asyncio.timeout(timeout_s):
        await start.all_in.wait()
    before = await asyncio.to_thread(step_counters, http)
    start.go.set()
    results = list(await asyncio.gather(*tasks))
    after = await asyncio.to_thread(step_counters, http)
    steps = int(after[0] - before[0])
    mean = (after[1] - before[1]) / steps * 1000 if steps else None
    return results, mean, steps


def prefill_steps(model_dir: Path, voice: str, text: str) -> int:
    """The prefill's steps for ``voice`` (a ``.pt`` in ``voices/``) and ``text`` with the set's tokenizer:
    the voice frames, 6 silent ones, the wrapped text's tokens, 6 silent ones."""
    tokenizer = loading.load_tokenizer(loading.open_model_dir(model_dir))
    pt = torch.load(str(model_dir / "voices" / voice), map_location="cpu", weights_only=True)
    frames = int(pt["embeddings"].shape[0]) + 1
    return frames + 2 * chat_prompt.SILENCE_FRAMES + len(chat_prompt.text_prompt_tokens(tokenizer, text))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - our own local server
        return json.loads(resp.read())


class Server:
    """``voice-engine serve`` with one chat module of ``slots`` slots, in a child process."""

    def __init__(
        self,
        work: Path,
        model_dir: Path,
        slots: int,
        precision: str,
        device: str,
        batch_wait_ms: float = 0.0,
        opus_workers: int | None = None,
    ) -> None:
        self.port = _free_port()
        module: dict[str, Any] = {
            "kind": "chat",
            "model_dir": str(model_dir),
            "slots": slots,
            "precision": precision,
            "device": device,
            "options": {"idle_timeout_s": 60.0, "prefill_timeout_s": 600.0, "batch_wait_ms": batch_wait_ms},
        }
        if opus_workers is not None:
            module["options"]["opus_workers"] = opus_workers
        if (model_dir / "voices").is_dir():
            module["voices_dir"] = str(model_dir / "voices")
        config = {"host": "127.0.0.1", "port": self.port, "api_keys": [KEY], "modules": {"chat": module}}
        self.config_path = work / f"engine-{slots}-{precision}.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = work / f"engine-{slots}-{precision}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float) -> float:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.setdefault("NO_TORCH_COMPILE", "1")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - this interpreter, our own config
                [sys.executable, "-m", "voice_engine", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        started = time.monotonic()
        while time.monotonic() - started < ready_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the engine exited with {self.proc.returncode}: {self.tail()}")
            try:
                _get_json(self.http + "/healthz")
                return time.monotonic() - started
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the engine was not healthy within {ready_timeout_s:g} s: {self.tail()}")

    def status(self) -> dict[str, Any]:
        entry: dict[str, Any] = _get_json(self.http + "/status")["modules"]["chat"]
        return entry

    def tail(self, lines: int = 8) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1])


def run_level(
    work: Path,
    model_dir: Path,
    slots: int,
    precision: str,
    device: str,
    seconds: float,
    timeout_s: float,
    batch_wait_ms: float = 0.0,
    opus_workers: int | None = None,
) -> dict[str, Any]:
    server = Server(work, model_dir, slots, precision, device, batch_wait_ms, opus_workers)
    row: dict[str, Any] = {"slots": slots, "precision": precision, "batch_wait_ms": batch_wait_ms}
    try:
        row["load_s"] = round(server.start(timeout_s), 1)
        pages = user_pages(seconds)
        results, stream_mean, stream_steps = asyncio.run(
            _clients(server.http, slots, pages, timeout_s, f"{VOICE_NAME}.pt", TEXT_PROMPT)
        )
        status = server.status()
        row["opus_workers"] = status.get("opus_workers")
    except RuntimeError as exc:
        row["error"] = str(exc)[:500]
        return row
    finally:
        server.stop()
    errors = [r.error for r in results if r.error]
    latencies = [x for r in results for x in r.latencies_ms]
    handshakes = [r.handshake_s * 1000 for r in results if r.handshake_s is not None]
    memory = status.get("gpu_memory_gib") or {}
    row.update(
        {
            "clients_ok": len(results) - len(errors),
            "errors": errors[:3],
            "step_ms_p50": status.get("step_ms_p50"),
            "step_ms_p99": status.get("step_ms_p99"),
            "steps": status.get("steps_last_minute"),
            "stream_step_ms_mean": _round(stream_mean),
            "stream_steps": stream_steps,
            "client_ms_p50": _round(_pct(latencies, 50)),
            "client_ms_p99": _round(_pct(latencies, 99)),
            "client_frames": len(latencies),
            "handshake_ms_p50": _round(_pct(handshakes, 50)),
            "handshake_ms_max": _round(max(handshakes) if handshakes else None),
            "prefill_ms_p50": status.get("prefill_ms_p50"),
            "peak_gib": memory.get("peak"),
            "allocated_gib": memory.get("allocated"),
        }
    )
    return row


def run_stepper_level(
    model_dir: Path, slots: int, precision: str, device: str, steps: int, warmup: int
) -> dict[str, Any]:
    """The model side alone (``--stepper``): the engine's ``ChatStepper`` in this process, every slot
    given a frame of noise at every step (no server, no websocket, no Opus, no prefill)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row: dict[str, Any] = {"slots": slots, "precision": precision, "mode": "stepper"}
    started = time.monotonic()
    try:
        stepper = ChatStepper.from_model_dir(model_dir, slots, precision, device)
        stepper.warmup()
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of GPU memory"
        return row
    row["load_s"] = round(time.monotonic() - started, 1)
    rng = np.random.default_rng(0)
    sampling = {
        s: SamplingParams(seed=s, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25) for s in range(slots)
    }
    resets = {s: ChatParams(params) for s, params in sampling.items()}
    times: list[float] = []
    for i in range(warmup + steps):
        inputs = {s: [(rng.standard_normal(FRAME) * 0.1).astype(np.float32)] for s in range(slots)}
        t0 = time.perf_counter()
        stepper.step(inputs, resets if i == 0 else {})
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    del stepper
    gc.collect()
    row.update(
        {
            "step_ms_p50": _round(_pct(times, 50)),
            "step_ms_p99": _round(_pct(times, 99)),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        }
    )
    return row


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def _line(row: dict[str, Any]) -> str:
    """One level's figures on one line (server mode: all of them; stepper mode: the step and memory)."""
    g = row.get
    text = f"step p50 {_fmt(g('step_ms_p50'))} p99 {_fmt(g('step_ms_p99'))} ms  "
    if g("mode") != "stepper":
        text += (
            f"client p50 {_fmt(g('client_ms_p50'))} p99 {_fmt(g('client_ms_p99'))} ms  "
            f"streaming step mean {_fmt(g('stream_step_ms_mean'))} ms ({g('stream_steps')} steps)  "
            f"handshake p50 {_fmt(g('handshake_ms_p50'))} max {_fmt(g('handshake_ms_max'))} ms  "
        )
    text += f"peak {_fmt(g('peak_gib'), ' GiB')}  load {g('load_s')} s"
    if g("opus_workers") is not None:
        text += f"  opus workers {g('opus_workers')}"
    if g("mode") != "stepper":
        text += f"  clients ok {g('clients_ok')}/{g('slots')}" + (
            f"  errors {g('errors')}" if g("errors") else ""
        )
    return text


def real_time(row: dict[str, Any], key: str) -> bool:
    value = row.get(key)
    return not row.get("error") and not row.get("errors") and value is not None and value < FRAME_MS


def run(args: argparse.Namespace) -> int:
    if args.write_set:
        print(write_full_chat_set(Path(args.write_set), args.device))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("voice-engine bench: FAILED: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    precisions = [p for p in args.precision.split(",") if p]
    levels = [int(x) for x in args.slots.split(",") if x]
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    deadline = time.monotonic() + args.budget_s if args.budget_s else math.inf
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model_dir:
            model_dir = Path(args.model_dir)
        elif args.size == "tiny":
            model_dir = tiny_chat.make(work / "tiny-personaplex", 0, "personaplex")
            (model_dir / "voices" / f"{VOICE_NAME}.pt").write_bytes(
                (model_dir / "voices" / "TINYF0.pt").read_bytes()
            )
        else:
            model_dir = write_full_chat_set(work / "personaplex-7b", args.device)
        steps = prefill_steps(model_dir, f"{VOICE_NAME}.pt", TEXT_PROMPT)
        print(
            f"# voice-engine bench --kind chat: {model_dir} on {name}, torch {torch.__version__}, "
            f"{args.seconds:g} s of real-time streaming per client (first {SKIP_S:g} s untimed), "
            f"voice {VOICE_NAME}.pt and a text prompt of {len(TEXT_PROMPT)} characters: "
            f"{steps} prefill steps; the chat module's batch_wait_ms {args.batch_wait_ms:g}, opus_workers "
            f"{'its default' if args.opus_workers < 0 else args.opus_workers}",
            flush=True,
        )
        for precision in precisions:
            best = {"step_ms_p99": 0, "client_ms_p99": 0}
            for slots in levels:
                if time.monotonic() > deadline:
                    print(f"{precision} B={slots}: skipped (--budget-s spent)", flush=True)
                    continue
                if args.stepper:
                    row = run_stepper_level(model_dir, slots, precision, args.device, args.steps, args.warmup)
                else:
                    row = run_level(
                        work,
                        model_dir,
                        slots,
                        precision,
                        args.device,
                        args.seconds,
                        args.timeout_s,
                        args.batch_wait_ms,
                        None if args.opus_workers < 0 else args.opus_workers,
                    )
                row["prefill_steps"] = steps
                rows.append(row)
                if args.json:
                    with Path(args.json).open("a", encoding="utf-8") as out:
                        out.write(json.dumps({"device": name, **row}) + "\n")
                if row.get("error"):
                    print(f"{precision} B={slots}: FAILED: {row['error']}", flush=True)
                    if "out of memory" in row["error"].lower() or "OutOfMemory" in row["error"]:
                        break
                    continue
                best = {k: max(v, slots) if real_time(row, k) else v for k, v in best.items()}
                print(f"{precision} B={slots:3d}  " + _line(row), flush=True)
                late = not real_time(row, "step_ms_p99")
                if late and args.stop_when_late:
                    break
            print(
                f"{precision}: max conversations with p99 < {FRAME_MS:.0f} ms: {best['step_ms_p99']} by the "
                f"server's steps, {best['client_ms_p99']} by the clients' frame times",
                flush=True,
            )
    return 0 if rows and not all(r.get("error") for r in rows) else 1
