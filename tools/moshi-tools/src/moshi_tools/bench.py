"""Measure how fast this host runs Moshi, frame by frame, the way ``moshi.server`` does.

It loads the host's model (``--model-dir``, resolved like the service does) or random weights of
the full 7B architecture (``--random-7b``; nothing is downloaded), then runs the server's per-frame
path: Mimi encode, LM step, Mimi decode, in streaming mode, after the server's own 4-frame warmup.
It prints the median and p90 milliseconds per 80 ms frame, the real-time factor, the peak GPU
memory and the flags in force (torch.compile, CUDA graphs, precision, device).

Usage::

    python -m moshi_tools.bench --env-file /etc/moshi-server/moshi-server.env \\
        --model-dir /opt/moshi/model --device cuda [--half] [--frames 200] [--json]
    python -m moshi_tools.bench --random-7b --precision bf16|fp16|q8 --device cuda

``--env-file`` reads the service's environment file (systemd ``EnvironmentFile=`` syntax) into the
environment *before* torch and moshi are imported, so ``NO_TORCH_COMPILE``, ``NO_CUDA_GRAPH``,
``OMP_NUM_THREADS`` and the rest act exactly as they do in the service. Its values win over the
calling shell's, as they do under systemd.

For ``--precision q8`` the random model is saved as a safetensors checkpoint and loaded back through
``moshi.models.loaders.get_moshi_lm`` in the server's dtype, so an unpatched loader fails here with
the field error (see :mod:`moshi_tools.q8_patch`). ``--random-tiny`` runs the same code paths with
the tiny architecture of :mod:`moshi_tools.tiny_model`, for tests.

Exit 0 after a measurement; exit 1 with one ``moshi bench FAILED: ...`` line on stderr (and, with
``--json``, one JSON object with ``"ok": false`` on stdout) when anything fails; 2 for bad usage.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FRAME_MS = 80.0  # one model step per 80 ms of audio (24 kHz, 1920 samples)
SERVER_WARMUP_FRAMES = 4  # moshi.server's ServerState.warmup
SERVER_SEED = 42424242  # moshi.server's seed_all
# Environment variables that change what the server does; reported as they are in force.
REPORTED_ENV = (
    "NO_TORCH_COMPILE",
    "TORCHDYNAMO_DISABLE",
    "TORCH_COMPILE_DISABLE",
    "NO_CUDA_GRAPH",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)
GIB = 1024**3
MIB = 1024**2


class BenchError(Exception):
    """A problem the bench reports as one line."""


@dataclass
class Flags:
    """What is in force for this run, as the server would see it."""

    compile: bool
    compile_reason: str
    cuda_graphs: bool
    cuda_graphs_reason: str
    env: dict[str, str]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Result:
    ok: bool = True
    model: str = ""
    precision: str = ""
    dtype: str = ""
    device: str = ""
    lm_params: int = 0
    gpu: str | None = None
    gpu_cc: str | None = None
    torch: str = ""
    torch_cuda: str | None = None
    moshi: str = ""
    bitsandbytes: str | None = None
    q8_loader: str = ""
    compile: bool = False
    compile_reason: str = ""
    cuda_graphs: bool = False
    cuda_graphs_reason: str = ""
    env: dict[str, str] = field(default_factory=dict)
    env_file: str | None = None
    env_file_keys: list[str] = field(default_factory=list)
    threads: int = 0
    warmup_frames: int = 0
    frames: int = 0
    load_s: float = 0.0
    warmup_s: float = 0.0
    median_ms: float = 0.0
    p90_ms: float = 0.0
    mean_ms: float = 0.0
    min_ms: float = 0.0
    max_ms: float = 0.0
    realtime_factor: float = 0.0
    realtime: bool = False
    weights_gpu_gib: float | None = None
    peak_gpu_gib: float | None = None
    peak_rss_gib: float | None = None
    warnings: list[str] = field(default_factory=list)


# --- environment file -------------------------------------------------------------------------


def _unquote(value: str, where: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        if value[0] == '"':
            out, escaped = [], False
            for char in inner:
                if escaped:
                    out.append(char)
                    escaped = False
                elif char == "\\":
                    escaped = True
                else:
                    out.append(char)
            return "".join(out)
        return inner
    if value and value[0] in "\"'":
        raise BenchError(f"{where}: unterminated quote")
    return value


def parse_env_file(text: str, name: str = "env file") -> dict[str, str]:
    """Parse systemd ``EnvironmentFile=`` content: ``KEY=VALUE`` lines, ``#``/``;`` comments."""
    env: dict[str, str] = {}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        number = index + 1
        line = lines[index].strip()
        index += 1
        while line.endswith("\\") and index < len(lines):  # line continuation
            line = line[:-1] + lines[index].strip()
            index += 1
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or not (key[0].isalpha() or key[0] == "_"):
            raise BenchError(f"{name}, line {number}: not KEY=VALUE: {line!r}")
        if not all(char.isalnum() or char == "_" for char in key):
            raise BenchError(f"{name}, line {number}: bad variable name {key!r}")
        env[key] = _unquote(value.strip(), f"{name}, line {number}")
    return env


def load_env_file(path: Path) -> dict[str, str]:
    """Read ``path`` into ``os.environ`` (its values win); return what it set."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot read the environment file {path}: {exc.strerror or exc}") from exc
    env = parse_env_file(text, str(path))
    os.environ.update(env)
    return env


# --- flags --------------------------------------------------------------------------------------


def compile_state(env: Mapping[str, str]) -> tuple[bool, str]:
    """Whether moshi's ``torch.compile`` runs, and why not.

    moshi (utils/compile.py): any non-empty ``NO_TORCH_COMPILE`` returns the plain function.
    PyTorch: ``TORCHDYNAMO_DISABLE=1`` or ``TORCH_COMPILE_DISABLE=1`` (exactly ``1``) turn it off.
    """
    value = env.get("NO_TORCH_COMPILE", "")
    if value:
        return False, f"NO_TORCH_COMPILE={value}"
    for name in ("TORCHDYNAMO_DISABLE", "TORCH_COMPILE_DISABLE"):
        if env.get(name, "") == "1":
            return False, f"{name}=1"
    return True, ""


def cuda_graph_env_allows(env: Mapping[str, str]) -> bool:
    """moshi's rule (utils/compile.py): graphs stay on only if NO_CUDA_GRAPH is '', 0, no or n."""
    return env.get("NO_CUDA_GRAPH", "").lower() in {"0", "no", "n", ""}


def flags_in_force(device_type: str, env: Mapping[str, str] | None = None) -> Flags:
    env = os.environ if env is None else env
    compiled, compile_reason = compile_state(env)
    graphs_allowed = cuda_graph_env_allows(env)
    if device_type != "cuda":
        graphs, graphs_reason = False, f"device is {device_type}"
    elif not graphs_allowed:
        graphs, graphs_reason = False, f"NO_CUDA_GRAPH={env.get('NO_CUDA_GRAPH', '')}"
    else:
        graphs, graphs_reason = True, ""
    warnings = []
    if not graphs_allowed:
        warnings.append(
            f"NO_CUDA_GRAPH={env.get('NO_CUDA_GRAPH', '')} is set: it makes a GPU 6-10x slower than "
            "real time; never set it for the service"
        )
    return Flags(
        compile=compiled,
        compile_reason=compile_reason,
        cuda_graphs=graphs,
        cuda_graphs_reason=graphs_reason,
        env={name: env[name] for name in REPORTED_ENV if name in env},
        warnings=warnings,
    )


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile (``fraction`` in [0, 1]) of a non-empty list."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(frame_ms: list[float], result: Result) -> None:
    result.frames = len(frame_ms)
    result.median_ms = round(statistics.median(frame_ms), 2)
    result.p90_ms = round(percentile(frame_ms, 0.9), 2)
    result.mean_ms = round(statistics.fmean(frame_ms), 2)
    result.min_ms = round(min(frame_ms), 2)
    result.max_ms = round(max(frame_ms), 2)
    result.realtime_factor = round(result.median_ms / FRAME_MS, 3)
    result.realtime = result.p90_ms <= FRAME_MS


# --- models -------------------------------------------------------------------------------------


@dataclass
class Loaded:
    mimi: Any
    lm: Any
    lm_gen_config: dict[str, Any]
    model_type: str = "moshi"


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _save_checkpoint(lm: Any, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in lm.state_dict().items()}, str(path))


def load_random(
    arch: str, precision: str, dtype: torch.dtype, device: torch.device, tmp_dir: Path | None
) -> Loaded:
    """Random weights of ``arch`` (``7b`` or ``tiny``); q8 goes through a checkpoint and the loader."""
    from moshi.models import loaders

    if arch == "7b":
        lm_kwargs: dict[str, Any] = dict(loaders._lm_kwargs)
        mimi_config: dict[str, Any] | None = None  # moshi's default Mimi
        lm_gen_config: dict[str, Any] = {}
    else:
        from moshi_tools import tiny_model

        lm_kwargs = dict(tiny_model.LM_CONFIG)
        mimi_config = tiny_model.MIMI_CONFIG
        lm_gen_config = dict(tiny_model.LM_GEN_CONFIG)
    num_codebooks = max(lm_kwargs["dep_q"], lm_kwargs["n_q"] - lm_kwargs["dep_q"])
    mimi = loaders.get_mimi(None, mimi_config, device=device, num_codebooks=num_codebooks)
    if precision != "q8":
        lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device=device, dtype=dtype)
        return Loaded(mimi, lm, lm_gen_config)
    lm_kwargs["quantize"] = True
    with tempfile.TemporaryDirectory(prefix="moshi-bench-q8-", dir=tmp_dir) as tmp:
        checkpoint = Path(tmp) / "model.q8.safetensors"
        _save_checkpoint(
            loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device=device, dtype=dtype), checkpoint
        )
        _free(device)
        # The server's path: the checkpoint through get_moshi_lm, in the server's dtype.
        lm = loaders.get_moshi_lm(checkpoint, lm_kwargs=lm_kwargs, device=device, dtype=dtype)
    return Loaded(mimi, lm, lm_gen_config)


def load_model_dir(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Loaded:
    """The host's model, read exactly as ``moshi_tools.launch`` makes ``moshi.server`` read it."""
    from moshi.models import loaders

    from moshi_tools.model_dir import resolve, server_args

    model_set = resolve(model_dir)
    if model_set.config is None:
        # A legacy repo without config.json: the server assumes the built-in 7B config.
        info = loaders.CheckpointInfo(model_set.lm, model_set.mimi, model_set.tokenizer)
    else:
        args = server_args(model_set)
        config_path = Path(args[args.index("--config-path") + 1])
        try:
            info = loaders.CheckpointInfo.from_hf_repo(
                loaders.DEFAULT_REPO,
                str(model_set.lm),
                str(model_set.mimi),
                str(model_set.tokenizer),
                config_path=str(config_path),
            )
        finally:
            config_path.unlink(missing_ok=True)
    info.get_text_tokenizer()  # the server loads it too: a broken tokenizer fails here, not later
    mimi = info.get_mimi(device=device)
    lm = info.get_moshi(device=device, dtype=dtype)
    return Loaded(mimi, lm, dict(info.lm_gen_config), info.model_type)


# --- the per-frame path -------------------------------------------------------------------------


def _lm_gen(loaded: Loaded) -> Any:
    from moshi.models.lm import LMGen

    lm = loaded.lm
    condition_tensors: Any = {}
    if lm.condition_provider is not None and lm.condition_provider.conditioners:
        from moshi.run_inference import get_condition_tensors

        condition_tensors = get_condition_tensors(loaded.model_type, lm, batch_size=1, cfg_coef=1.0)
    return LMGen(lm, cfg_coef=1.0, condition_tensors=condition_tensors, **loaded.lm_gen_config)


def _one_frame(mimi: Any, lm_gen: Any, chunk: torch.Tensor, device: torch.device, first: bool) -> None:
    """What moshi.server's recv_loop does with one 80 ms frame (minus the Opus coding)."""
    codes = mimi.encode(chunk.to(device=device)[None, None])
    if first:
        # The server drops the first frame of a conversation and re-pads the encoder.
        mimi.reset_streaming()
    for step in range(codes.shape[-1]):
        tokens = lm_gen.step(codes[:, :, step : step + 1])
        if tokens is None:
            continue
        pcm = mimi.decode(tokens[:, 1:]).cpu()  # decode_and_send moves the PCM to the host
        del pcm
        tokens[0, 0, 0].item()  # and reads the text token


def run_frames(loaded: Loaded, device: torch.device, warmup: int, frames: int, result: Result) -> list[float]:
    import torch

    mimi = loaded.mimi
    lm_gen = _lm_gen(loaded)
    frame_size = int(mimi.sample_rate / mimi.frame_rate)
    mimi.streaming_forever(1)
    lm_gen.streaming_forever(1)

    started = time.perf_counter()
    # ServerState.warmup: 4 frames of zeros through encode, step and decode.
    for _ in range(SERVER_WARMUP_FRAMES):
        zeros = torch.zeros(1, 1, frame_size, dtype=torch.float32, device=device)
        codes = mimi.encode(zeros)
        for step in range(codes.shape[-1]):
            tokens = lm_gen.step(codes[:, :, step : step + 1])
            if tokens is not None:
                mimi.decode(tokens[:, 1:])
    _synchronize(device)
    # handle_chat: a new conversation resets both streaming states.
    mimi.reset_streaming()
    lm_gen.reset_streaming()
    # Quiet noise as the caller's audio; the weights are random or the content does not matter.
    generator = torch.Generator().manual_seed(0)
    audio = 0.05 * torch.randn(warmup + frames, frame_size, generator=generator)
    for index in range(warmup):
        _one_frame(mimi, lm_gen, audio[index], device, first=index == 0)
    _synchronize(device)
    result.warmup_s = round(time.perf_counter() - started, 2)
    result.warmup_frames = SERVER_WARMUP_FRAMES + warmup

    timings = []
    for index in range(warmup, warmup + frames):
        begin = time.perf_counter()
        _one_frame(mimi, lm_gen, audio[index], device, first=index == 0)
        _synchronize(device)
        timings.append(1000.0 * (time.perf_counter() - begin))
    return timings


# --- the command --------------------------------------------------------------------------------


def _loader_state() -> str:
    from moshi_tools import q8_patch

    try:
        return q8_patch.state_of(q8_patch.loader_path().read_text(encoding="utf-8")).value
    except (q8_patch.PatchError, OSError) as exc:
        return f"unknown ({exc})"


def _peak_rss_gib() -> float | None:
    try:
        import resource
    except ImportError:  # not on Linux
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)


def measure(args: argparse.Namespace, env_file_keys: list[str]) -> Result:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {args.device}: CUDA is not available to this torch ({torch.__version__})")
    if args.model_dir is not None:
        from moshi_tools.model_dir import resolve

        quantized = resolve(args.model_dir).quantized
        half = args.half
        precision = "q8" if quantized else ("fp16" if half else "bf16")
        model = str(args.model_dir)
    else:
        precision = args.precision
        half = args.half or precision == "fp16"
        model = f"random {'full 7B' if args.arch == '7b' else args.arch} weights"
    dtype = torch.float16 if half else torch.bfloat16

    import moshi

    flags = flags_in_force(device.type)
    result = Result(
        model=model,
        precision=precision,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        moshi=str(getattr(moshi, "__version__", "?")),
        q8_loader=_loader_state(),
        compile=flags.compile,
        compile_reason=flags.compile_reason,
        cuda_graphs=flags.cuda_graphs,
        cuda_graphs_reason=flags.cuda_graphs_reason,
        env=flags.env,
        env_file=str(args.env_file) if args.env_file else None,
        env_file_keys=env_file_keys,
        threads=torch.get_num_threads(),
        warnings=flags.warnings,
    )
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        result.gpu = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        result.gpu_cc = f"{major}.{minor}"
    if precision == "q8":
        try:
            import bitsandbytes

            result.bitsandbytes = str(bitsandbytes.__version__)
        except ImportError as exc:
            raise BenchError(f"q8 needs bitsandbytes, which is not importable: {exc}") from exc

    torch.manual_seed(SERVER_SEED)
    with torch.no_grad():
        _free(device)
        started = time.perf_counter()
        if args.model_dir is not None:
            loaded = load_model_dir(args.model_dir, dtype, device)
        else:
            loaded = load_random(args.arch, precision, dtype, device, args.tmp_dir)
        _synchronize(device)
        result.load_s = round(time.perf_counter() - started, 2)
        result.lm_params = sum(p.numel() for p in loaded.lm.parameters())
        if device.type == "cuda":
            result.weights_gpu_gib = round(torch.cuda.memory_allocated(device) / GIB, 2)
        timings = run_frames(loaded, device, args.warmup, args.frames, result)
    summarize(timings, result)
    if device.type == "cuda":
        result.peak_gpu_gib = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
    result.peak_rss_gib = _peak_rss_gib()
    return result


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**9 else f"{n / 1e6:.2f} M"


def _switch(on: bool, reason: str) -> str:
    return "on" if on else f"off ({reason})" if reason else "off"


def format_text(result: Result) -> str:
    gpu = f"GPU {result.gpu} (CC {result.gpu_cc}); " if result.gpu else ""
    cuda = f" (CUDA {result.torch_cuda})" if result.torch_cuda else ""
    bnb = f"; bitsandbytes {result.bitsandbytes}" if result.bitsandbytes else ""
    lines = [
        f"moshi bench: {result.model} ({_count(result.lm_params)} LM parameters)",
        f"  precision {result.precision}, dtype {result.dtype}, device {result.device}, "
        f"{result.threads} CPU threads",
        f"  {gpu}torch {result.torch}{cuda}; moshi {result.moshi}{bnb}; q8 loader {result.q8_loader}",
        f"  flags: compile {_switch(result.compile, result.compile_reason)}; "
        f"CUDA graphs {_switch(result.cuda_graphs, result.cuda_graphs_reason)}",
    ]
    if result.env:
        lines.append("  env: " + " ".join(f"{key}={value}" for key, value in sorted(result.env.items())))
    if result.env_file:
        keys = ", ".join(result.env_file_keys) or "nothing"
        lines.append(f"  env file {result.env_file} set: {keys}")
    lines += [
        f"  load {result.load_s:.1f} s; warmup {result.warmup_frames} frames in {result.warmup_s:.1f} s",
        f"  {result.frames} frames: median {result.median_ms:.1f} ms, p90 {result.p90_ms:.1f} ms per "
        f"{FRAME_MS:.0f} ms frame (min {result.min_ms:.1f}, max {result.max_ms:.1f})",
        f"  real-time factor {result.realtime_factor:.2f} (median / {FRAME_MS:.0f} ms): "
        + ("REAL TIME (p90 within 80 ms)" if result.realtime else "NOT real time (p90 over 80 ms)"),
    ]
    if result.peak_gpu_gib is not None:
        lines.append(
            f"  peak GPU memory {result.peak_gpu_gib:.2f} GiB (weights {result.weights_gpu_gib:.2f} GiB)"
        )
    if result.peak_rss_gib is not None:
        lines.append(f"  peak host memory (RSS) {result.peak_rss_gib:.2f} GiB")
    lines += [f"  WARNING: {warning}" for warning in result.warnings]
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    if len(message) > 400:
        message = message[:397] + "..."
    if "weight_scb" in message:
        message += " [moshi's loader lacks the q8 fix: python -m moshi_tools.q8_patch --apply]"
    return f"{type(exc).__name__}: {message}" if not isinstance(exc, BenchError) else message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moshi-bench", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="the host's model directory (as the service's)")
    source.add_argument(
        "--random-7b", dest="arch", action="store_const", const="7b", help="random weights, full 7B"
    )
    source.add_argument(
        "--random-tiny", dest="arch", action="store_const", const="tiny", help="random tiny model (tests)"
    )
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp16", "q8"),
        default="bf16",
        help="random weights only (a model directory says whether it is q8); fp16 implies --half",
    )
    parser.add_argument("--device", help="cuda, cuda:N or cpu, as the server's (default: cuda if any)")
    parser.add_argument("--half", action="store_true", help="float16 instead of bfloat16, as the server's")
    parser.add_argument("--env-file", type=Path, help="the service's environment file, loaded first")
    parser.add_argument("--warmup", type=int, default=20, help="untimed frames after the server warmup")
    parser.add_argument("--frames", type=int, default=200, help="timed frames")
    parser.add_argument("--tmp-dir", type=Path, help="where the random q8 checkpoint goes (8 GB for 7B)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.frames < 1 or args.warmup < 0:
        parser.error("--frames must be >= 1 and --warmup >= 0")
    if args.model_dir is not None and args.precision != "bf16":
        parser.error("--precision applies to random weights; use --half for a model directory")
    try:
        # Before torch or moshi is imported: the env file must act as it does in the service.
        env_keys = sorted(load_env_file(args.env_file)) if args.env_file else []
        result = measure(args, env_keys)
    except KeyboardInterrupt:
        print("moshi bench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is one line: on-call reads this, not a traceback
        line = _one_line(exc)
        if args.json:
            print(json.dumps({"ok": False, "error": line}))
        print(f"moshi bench FAILED: {line}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result), indent=2) if args.json else format_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
