"""``voice-engine bench``: how many streams a module's stepper holds in real time, ramping the slot count.

For each slot count B, one stepper with B slots, all busy: STT slots get a fresh 80 ms frame of noise
every step; TTS slots speak a long text. After warm-up steps (CUDA graphs captured), ``--steps`` steps
are timed one by one (each step ends with the outputs on the host, so the time is wall time).
Printed per B: median, p90 and p99 step time, p99 / 80 ms, peak GPU memory; then the largest B whose
p99 stays under the 80 ms frame.

``--size full`` builds randomly initialised models of the real architectures in memory (no download):

* STT-1B: Kyutai's ``stt-1b-en_fr`` shape as its Rust server describes it (``asr_v0_1_1b``: d_model
  2048, 16 layers, 16 heads, feed-forward 8192, context 750, 32 Mimi codebooks in, text vocabulary
  8000, no depformer) with four semantic-VAD extra heads;
* TTS-1.6B: a DSM TTS shape sized to the published 1.84 B parameters (1.853 B here: d_model 2048, 20
  layers, 16 heads, cross-attention on the speaker embedding, a depformer of 4 layers for 32 codebooks
  with 5 weight sets shared by a schedule, context 500). The real ``config.json`` was not available
  offline; the parameter count printed says how close the shape is.

Both with the full-size Mimi. ``--size tiny`` uses the tiny test sets (a smoke test of the command,
meaningless figures). Random weights make the words noise: the figures are speed and memory only.

``--kind chat`` (PersonaPlex conversations through the real server, websocket clients, ``--write-set``
of the 7B set, ``--stepper``) is in ``bench_chat.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FRAME_MS = 80.0

STT_1B: dict[str, Any] = {
    "dim": 2048,
    "num_heads": 16,
    "num_layers": 16,
    "hidden_scale": 4,
    "context": 750,
    "max_period": 100000,
    "card": 2048,
    "n_q": 32,
    "dep_q": 0,
    "delays": [0] * 33,
    "text_card": 8000,
    "existing_text_padding_id": 3,
    "causal": True,
    "layer_scale": None,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 1024,
    "depformer_num_heads": 16,
    "depformer_num_layers": 1,
    "depformer_dim_feedforward": None,
    "depformer_multi_linear": True,
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "extra_heads_num_heads": 4,
    "extra_heads_dim": 6,
}

TTS_1_6B_OVERRIDES: dict[str, Any] = {
    "dim": 2048,
    "num_heads": 16,
    "num_layers": 20,
    "hidden_scale": 4,
    "context": 500,
    "card": 2048,
    "n_q": 32,
    "dep_q": 32,
    "delays": [0, 0] + [2] * 31,
    "text_card": 8000,
    "depformer_dim": 1024,
    "depformer_num_heads": 16,
    "depformer_num_layers": 4,
    "depformer_dim_feedforward": 4096,
    "depformer_weights_per_step_schedule": [0, 1, 2, 3] + [4] * 28,
    "depformer_low_rank_embeddings": 128,
}
SPEAKER_DIM_FULL = 512
SPEAKER_FRAMES_FULL = 125


def tts_full_kwargs() -> dict[str, Any]:
    """The TTS-1.6B-sized LM kwargs: the tiny TTS set's structure with the full-size dimensions."""
    from .tiny import tts as tiny_tts

    kwargs = copy.deepcopy(tiny_tts.LM_KWARGS)
    kwargs.update(copy.deepcopy(TTS_1_6B_OVERRIDES))
    kwargs["conditioners"]["speaker_wavs"]["tensor"]["dim"] = SPEAKER_DIM_FULL
    kwargs["conditioners"]["control"]["lut"]["dim"] = kwargs["dim"]
    kwargs["conditioners"]["cfg"]["lut"]["dim"] = 16
    return kwargs


def write_full_set(kind: str, out: Path, precision: str) -> Path:
    """A full-size random model directory in the Kyutai layout, for the end-to-end latency bench.

    The engine loads it through its real loading path. The text vocabulary is the tiny tokenizer's (64
    pieces instead of 8000: the STT's random text head must only emit ids the tokenizer can decode);
    everything else has the full-size shapes above.
    """
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    from .models import loading
    from .tiny import tokenizer as tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    dtype = loading.dtype_of(precision)
    tiny_tokenizer.write_tokenizer(out, 0)
    names = {
        "moshi_name": "model.safetensors",
        "mimi_name": "mimi.safetensors",
        "tokenizer_name": tiny_tokenizer.TOKENIZER_NAME,
    }
    if kind == "stt":
        kwargs = {**copy.deepcopy(STT_1B), "text_card": tiny_tokenizer.DEFAULT_VOCAB_SIZE}
        extra: dict[str, Any] = {
            "model_type": "stt",
            "lm_gen_config": {"temp": 0.0, "temp_text": 0.0},
            "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
        }
    else:
        kwargs = tts_full_kwargs()
        extra = {
            "model_type": "tts",
            "model_id": {"sig": "bench", "epoch": 0},
            "lm_gen_config": {"temp": 0.6, "text_temp": 0.6},
            "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2},
        }
        _tts_voices(out, ".bench@0.safetensors", folder="voices")
    config = {**copy.deepcopy(kwargs), **extra, **names}
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device="cpu", dtype=dtype)
    save_file(
        {k: v.detach().contiguous() for k, v in lm.state_dict().items()}, str(out / names["moshi_name"])
    )
    del lm
    mimi = loaders.get_mimi(None, device="cpu")
    save_file(
        {k: v.detach().contiguous() for k, v in mimi.state_dict().items()}, str(out / names["mimi_name"])
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


class _AnyVocab:
    """Stands in for the tokenizer when decoding random ids of a full-size vocabulary (speed only)."""

    def decode(self, ids: list[int]) -> str:
        return "w" * len(ids)


def _torch() -> Any:
    import torch

    return torch


def _stt_stepper(size: str, slots: int, device: str, precision: str, work: Path) -> Any:
    from moshi.models import loaders

    from .models import loading
    from .models.asr import AsrStepper

    if size == "tiny":
        from .tiny import stt

        model_dir = work / "stt"
        if not (model_dir / "config.json").exists():
            stt.make(model_dir, 0)
        return AsrStepper.from_model_dir(model_dir, slots, precision, device)
    torch = _torch()
    dev = loading.device_of(device)
    lm = loaders.get_moshi_lm(
        None, lm_kwargs=copy.deepcopy(STT_1B), device=dev, dtype=loading.dtype_of(precision)
    )
    lm.eval()
    mimi = loaders.get_mimi(None, device=dev)
    mimi.set_num_codebooks(32)
    del torch
    return AsrStepper(lm, mimi, _AnyVocab(), slots, dev, asr_delay_in_tokens=6)


def _tts_voices(work: Path, suffix: str, folder: str = "voices-full") -> Path:
    import torch
    from safetensors.torch import save_file

    voices = work / folder
    voices.mkdir(parents=True, exist_ok=True)
    emb = torch.randn(1, SPEAKER_DIM_FULL, SPEAKER_FRAMES_FULL, generator=torch.Generator().manual_seed(1))
    save_file({"speaker_wavs": emb}, str(voices / ("bench.wav" + suffix)))
    return voices


def _tts_stepper(size: str, slots: int, device: str, precision: str, work: Path) -> Any:
    from moshi.models import loaders
    from moshi.models.tts import StateMachine, TokenIds, TTSModel

    from .models import loading
    from .models.tts import TtsSettings, TtsStepper
    from .tiny import tokenizer as tiny_tokenizer
    from .tiny import tts as tiny_tts

    settings = TtsSettings()
    if size == "tiny":
        model_dir = work / "tts"
        if not (model_dir / "config.json").exists():
            tiny_tts.make(model_dir, 0)
        return TtsStepper.load(
            model_dir,
            slots=slots,
            device=device,
            precision=precision,
            voices_dir=model_dir / tiny_tts.VOICES_DIR_NAME,
            settings=settings,
        )
    dev = loading.device_of(device)
    lm = loaders.get_moshi_lm(
        None, lm_kwargs=tts_full_kwargs(), device=dev, dtype=loading.dtype_of(precision)
    )
    lm.eval()
    mimi = loaders.get_mimi(None, device=dev)
    mimi.set_num_codebooks(32)
    tok_path = tiny_tokenizer.write_tokenizer(work, 0)
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(str(tok_path))
    machine = StateMachine(
        TokenIds(lm.text_card + 1), second_stream_ahead=2, max_padding=8, initial_padding=2
    )
    suffix = ".bench@0.safetensors"
    tts_model = TTSModel(
        lm=lm,
        mimi=mimi,
        tokenizer=tokenizer,
        voice_suffix=suffix,
        voice_repo="local",
        machine=machine,
        delay_steps=16,
        n_q=32,
        temp=0.6,
    )
    return TtsStepper(tts_model, slots, _tts_voices(work, suffix), settings)


def _params(stepper: Any) -> int:
    lm = getattr(stepper, "lm", None) or stepper._lm
    return sum(p.numel() for p in lm.parameters())


def _run_stt(stepper: Any, steps: int, warmup: int, rng: Any) -> list[float]:
    import numpy as np

    slots = stepper.slots
    times: list[float] = []
    resets: dict[int, Any] = dict.fromkeys(range(slots))
    for i in range(warmup + steps):
        inputs = {s: [rng.standard_normal(1920).astype(np.float32) * 0.1] for s in range(slots)}
        started = time.perf_counter()
        stepper.step(inputs, resets)
        elapsed = time.perf_counter() - started
        resets = {}
        if i >= warmup:
            times.append(elapsed)
    return times


def _run_tts(stepper: Any, steps: int, warmup: int) -> list[float]:
    from .models.tts import TtsEos, TtsParams, TtsText

    slots = stepper.slots
    text = " ".join(["hello there this is a long reply spoken by the engine"] * 40)
    voice = stepper.default_voice
    resets = {s: TtsParams(voice=voice, seed=s) for s in range(slots)}
    inputs: dict[int, list[Any]] = {s: [TtsText(text), TtsEos()] for s in range(slots)}
    times: list[float] = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        stepper.step(inputs, resets)
        elapsed = time.perf_counter() - started
        resets, inputs = {}, {s: [] for s in range(slots)}
        if i >= warmup:
            times.append(elapsed)
    return times


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run(args: argparse.Namespace) -> int:
    import numpy as np

    precisions = args.precision.split(",")
    allowed = ("bf16", "fp16", "fp32", "q8", "nf4") if args.kind == "chat" else ("bf16", "fp16", "fp32")
    if not all(p in allowed for p in precisions) or (args.kind != "chat" and len(precisions) != 1):
        print(
            f"voice-engine bench: FAILED: --precision {args.precision}: --kind {args.kind} takes "
            f"{'a comma-separated list of ' if args.kind == 'chat' else 'one of '}{', '.join(allowed)}",
            file=sys.stderr,
        )
        return 2
    if args.kind == "chat":
        from .bench_chat import run as run_chat

        return run_chat(args)
    if args.write_set:
        print(write_full_set(args.kind, Path(args.write_set), args.precision))
        return 0
    torch = _torch()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("voice-engine bench: FAILED: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"# voice-engine bench --kind {args.kind} --size {args.size} on {name}, {args.precision}, "
        f"torch {torch.__version__}, {args.steps} timed steps after {args.warmup} warm-up steps"
    )
    rows = []
    best = 0
    with tempfile.TemporaryDirectory() as tmp:
        for slots in [int(x) for x in args.slots.split(",")]:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                make = _stt_stepper if args.kind == "stt" else _tts_stepper
                stepper = make(args.size, slots, device, args.precision, Path(tmp))
                if args.kind == "stt":
                    times = _run_stt(stepper, args.steps, args.warmup, np.random.default_rng(0))
                else:
                    times = _run_tts(stepper, args.steps, args.warmup)
            except torch.cuda.OutOfMemoryError:
                print(f"B={slots}: out of GPU memory")
                break
            params = _params(stepper)
            del stepper
            ms = [t * 1000 for t in times]
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            row = {
                "slots": slots,
                "params": params,
                "p50_ms": round(statistics.median(ms), 2),
                "p90_ms": round(_percentile(ms, 90), 2),
                "p99_ms": round(_percentile(ms, 99), 2),
                "peak_gib": round(peak, 2),
            }
            row["p99_over_frame"] = round(row["p99_ms"] / FRAME_MS, 3)
            rows.append(row)
            real_time = row["p99_ms"] < FRAME_MS
            if real_time:
                best = max(best, slots)
            print(
                f"B={slots:5d}  median {row['p50_ms']:7.2f} ms  p90 {row['p90_ms']:7.2f}  "
                f"p99 {row['p99_ms']:7.2f}  p99/80ms {row['p99_over_frame']:.3f}  peak {peak:6.2f} GiB  "
                f"params {params / 1e9:.3f} B  {'real time' if real_time else 'NOT real time'}",
                flush=True,
            )
            if not real_time and args.stop_when_late:
                break
    print(f"max real-time streams (p99 < {FRAME_MS:.0f} ms): {best}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": name,
                    "kind": args.kind,
                    "size": args.size,
                    "precision": args.precision,
                    "rows": rows,
                    "max_real_time": best,
                },
                indent=2,
            )
        )
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="streams per module in real time (prints figures)")
    bench.add_argument("--kind", required=True, choices=["stt", "tts", "chat"])
    bench.add_argument("--size", default="full", choices=["full", "tiny"])
    bench.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    bench.add_argument(
        "--precision",
        default="bf16",
        help="bf16, fp16 or fp32; chat: also q8 and nf4, and a comma-separated list (each in turn)",
    )
    bench.add_argument("--slots", default="1,8,32,64,128,256")
    bench.add_argument("--steps", type=int, default=50)
    bench.add_argument(
        "--warmup",
        type=int,
        default=30,
        help="untimed steps first (TTS: past its audio delay, so that every CUDA graph is captured)",
    )
    bench.add_argument("--stop-when-late", action="store_true")
    chat = bench.add_argument_group("chat (through the real server: voice_engine/bench_chat.py)")
    chat.add_argument("--model-dir", default="", help="a chat model set (default: --size tiny or a full one)")
    chat.add_argument("--seconds", type=float, default=8.0, help="real-time streaming per client and level")
    chat.add_argument("--timeout-s", type=float, default=600.0, help="each level's engine start and clients")
    chat.add_argument("--budget-s", type=float, default=0.0, help="skip the levels left after this long")
    chat.add_argument(
        "--stepper",
        action="store_true",
        help="time the ChatStepper in this process instead (--steps after --warmup; no server)",
    )
    chat.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="the chat module's batch_wait_ms option (0: its default)",
    )
    chat.add_argument(
        "--opus-workers",
        type=int,
        default=-1,
        help="the chat module's opus_workers option (-1: its default, one per 8 slots)",
    )
    bench.add_argument("--json", default="")
    bench.add_argument(
        "--write-set",
        default="",
        metavar="DIR",
        help="instead: write a full-size random model directory of --kind (stt, tts: "
        "scripts/bench_agent_latency.py; chat: the PersonaPlex-shaped 7B set)",
    )
    bench.set_defaults(func=run)
