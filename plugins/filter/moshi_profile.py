"""The one place that decides how Moshi runs on a host: the hardware profile table.

Given a mode (cpu|gpu), a precision (bf16|fp16|q8) and the GPU's compute capability and memory,
:func:`moshi_profile` returns the torch build to install, the environment flags and server
arguments, the expected speed, and a list of problems (each naming the fix). Roles, playbooks and
docs all use this table; nothing else re-implements it.

Speeds: the project's bench (``python -m moshi_tools.bench --random-7b``, random weights of the real
7B architecture) on an NVIDIA H200 machine, GPU and 16 CPU threads; docs/benchmarks.md has the
commands and the full table, docs/hardware.md the rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("cpu", "gpu")
MODE_AUTO = "auto"  # resolved per host by moshi_resolve_mode
PRECISIONS = ("bf16", "fp16", "q8")
FLAVORS = ("kyutai",)

# torch 2.9.1 is the newest release inside moshi 0.2.13's pin (torch>=2.2,<2.10).
TORCH_SPEC = "torch==2.9.1"
INDEX_CPU = "https://download.pytorch.org/whl/cpu"
INDEX_CU126 = "https://download.pytorch.org/whl/cu126"
INDEX_PYPI = ""  # PyPI's default torch 2.9.1 is the cu128 build (sm_70 .. sm_120)

# Moshi 7B (7.69 B parameters): weights and peak memory measured on an H200 (docs/benchmarks.md).
MOSHI_7B_PARAMS_B = 7.69
WEIGHTS_GIB_7B = {"bf16": 14.7, "fp16": 14.7, "q8": 7.8}
ACTIVATION_GIB = 1.6  # peak minus weights, the same for bf16 and q8 at the server's context
FRAME_MS = 80.0  # one model step per 80 ms of audio

# Median step times for Moshi 7B (ms per 80 ms frame): `python -m moshi_tools.bench --random-7b` on an
# NVIDIA H200 machine (GPU runs on the H200, the CPU run on its 16 threads); docs/benchmarks.md.
MEASURED_STEP_MS = {
    "gpu bf16 compile+graphs": 20.3,
    "gpu bf16 graphs, no compile": 25.0,
    "gpu q8 graphs, no compile": 25.9,
    "gpu bf16, no graphs": 187.5,
    "cpu bf16, 16 threads": 950.0,
}


@dataclass(frozen=True)
class GpuFamily:
    name: str
    min_cc: float
    torch_index_url: str
    compile_ok: bool  # Triton needs CC >= 7.0


# Ordered from newest to oldest; the first whose min_cc <= cc wins.
GPU_FAMILIES = (
    GpuFamily("volta-or-newer", 7.0, INDEX_PYPI, compile_ok=True),
    GpuFamily("pascal", 6.0, INDEX_CU126, compile_ok=False),
)
BF16_MIN_CC = 8.0
Q8_MIN_CC = 7.5


@dataclass
class Profile:
    mode: str
    precision: str
    device: str
    family: str
    torch_spec: str
    torch_index_url: str
    env: dict[str, str] = field(default_factory=dict)
    server_args: list[str] = field(default_factory=list)
    needs_bitsandbytes: bool = False
    peak_gib: float = 0.0
    expected_step_ms: float | None = None
    realtime_factor: float | None = None
    realtime: str = ""
    problems: list[str] = field(default_factory=list)


def peak_memory_gib(precision: str, params_billion: float) -> float:
    """Estimated peak GPU memory: weights scaled from the measured 7B figures, plus activations."""
    weights = WEIGHTS_GIB_7B.get(precision, WEIGHTS_GIB_7B["bf16"]) * params_billion / MOSHI_7B_PARAMS_B
    return round(weights + ACTIVATION_GIB, 1)


def gpu_family(cc: float) -> GpuFamily | None:
    return next((family for family in GPU_FAMILIES if cc >= family.min_cc), None)


def _as_float(value: Any, name: str, problems: list[str]) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        problems.append(f"{name}={value!r} is not a number")
        return None


def _expected_step(mode: str, precision: str, compile_ok: bool) -> float | None:
    if mode == "cpu":
        return MEASURED_STEP_MS["cpu bf16, 16 threads"]
    if precision == "q8":
        return MEASURED_STEP_MS["gpu q8 graphs, no compile"]
    if compile_ok:
        return MEASURED_STEP_MS["gpu bf16 compile+graphs"]
    return MEASURED_STEP_MS["gpu bf16 graphs, no compile"]


def moshi_profile(
    mode: str,
    precision: str,
    gpu_cc: Any = None,
    gpu_memory_mib: Any = None,
    params_billion: Any = MOSHI_7B_PARAMS_B,
    cpu_threads: Any = 0,
    flavor: str = "kyutai",
) -> dict[str, Any]:
    """Return the profile for a host as a plain dict (see :class:`Profile`)."""
    problems: list[str] = []
    if flavor not in FLAVORS:
        problems.append(f"moshi_server_flavor={flavor!r} is unknown: set one of {', '.join(FLAVORS)}")
    if mode not in MODES:
        problems.append(f"moshi_server_mode={mode!r} is unknown: set one of {', '.join(MODES)}")
    if precision not in PRECISIONS:
        problems.append(
            f"moshi_server_precision={precision!r} is unknown: set one of {', '.join(PRECISIONS)}"
        )
    cc = _as_float(gpu_cc, "moshi_server_gpu_compute_capability", problems)
    memory_mib = _as_float(gpu_memory_mib, "moshi_server_gpu_memory_mib", problems)
    params = _as_float(params_billion, "moshi_server_model_params_billion", problems)
    threads = int(_as_float(cpu_threads, "moshi_server_cpu_threads", problems) or 0)
    params = MOSHI_7B_PARAMS_B if params is None else params

    profile = Profile(
        mode=mode,
        precision=precision,
        device="cuda" if mode == "gpu" else "cpu",
        family="cpu",
        torch_spec=TORCH_SPEC,
        torch_index_url=INDEX_CPU,
        needs_bitsandbytes=precision == "q8",
        peak_gib=peak_memory_gib(precision, params),
        problems=problems,
    )
    compile_ok = False
    if mode == "cpu":
        # Inductor would compile C++ at warmup on CPU: slow, and it needs gcc on the host.
        profile.env["NO_TORCH_COMPILE"] = "1"
        if threads > 0:
            profile.env["OMP_NUM_THREADS"] = str(threads)
    elif mode == "gpu":
        if cc is None:
            problems.append(
                "moshi_server_mode=gpu but no GPU is known on this host: set "
                "moshi_server_gpu_compute_capability (e.g. '8.9'), or set moshi_server_mode=cpu"
            )
        else:
            family = gpu_family(cc)
            if family is None:
                problems.append(
                    f"GPU compute capability {cc} is older than Pascal (6.0): no supported torch "
                    "build; set moshi_server_mode=cpu"
                )
            else:
                profile.family = family.name
                profile.torch_index_url = family.torch_index_url
                compile_ok = family.compile_ok
                if not compile_ok:
                    profile.env["NO_TORCH_COMPILE"] = "1"
            if precision == "bf16" and cc < BF16_MIN_CC:
                problems.append(
                    f"bf16 needs compute capability >= {BF16_MIN_CC}, this GPU has {cc}: "
                    "set moshi_server_precision=fp16"
                )
            if precision == "q8" and cc < Q8_MIN_CC:
                problems.append(
                    f"q8 (bitsandbytes LLM.int8) needs compute capability >= {Q8_MIN_CC}, this GPU "
                    f"has {cc}: set moshi_server_precision=fp16, or moshi_server_mode=cpu"
                )
        if memory_mib is not None and profile.peak_gib * 1024 > memory_mib:
            problems.append(
                f"the model needs about {profile.peak_gib} GiB at peak in {precision}, the GPU has "
                f"{round(memory_mib / 1024, 1)} GiB: set moshi_server_precision=q8 where the GPU "
                "supports it, or moshi_server_mode=cpu"
            )
    profile.server_args = ["--device", profile.device]
    if precision == "fp16":
        profile.server_args.append("--half")
    step = _expected_step(mode, precision, compile_ok)
    profile.expected_step_ms = step
    if step is not None:
        profile.realtime_factor = round(step / FRAME_MS, 2)
        if mode == "cpu":
            profile.realtime = (
                f"NOT real time: about {step:.0f} ms per {FRAME_MS:.0f} ms frame for Moshi 7B "
                "(moshi_tools.bench, 16 CPU threads of the H200 bench machine; docs/benchmarks.md)"
            )
        else:
            profile.realtime = (
                f"real time if the GPU keeps up: {step:.0f} ms per {FRAME_MS:.0f} ms frame for Moshi 7B "
                "on an H200 (moshi_tools.bench), a lower bound for smaller GPUs (docs/benchmarks.md)"
            )
    return asdict(profile)


# Preference when several precisions work on a GPU: bf16 is the fastest measured, fp16 the same
# size, q8 the smallest.
PREFERENCE = ("bf16", "fp16", "q8")


def moshi_recommend(
    gpu_cc: Any = None, gpu_memory_mib: Any = None, params_billion: Any = MOSHI_7B_PARAMS_B
) -> dict[str, Any]:
    """The best working mode and precision for this hardware, with its profile."""
    if gpu_cc not in (None, ""):
        for precision in PREFERENCE:
            profile = moshi_profile("gpu", precision, gpu_cc, gpu_memory_mib, params_billion)
            if not profile["problems"]:
                return profile
    return moshi_profile("cpu", "bf16", params_billion=params_billion)


# What playbooks/diagnose.yml reports per host (issue 5). Speeds are the measured medians above.
DIAGNOSE_SOURCE = (
    "docs/benchmarks.md, moshi_tools.bench on an H200 machine "
    "(Moshi 7B on the H200, the CPU run on 16 threads)"
)
_NO_GPU_PROBLEM = "moshi_server_mode=gpu but no GPU is known on this host"


def torch_build_name(profile: dict[str, Any]) -> str:
    """The torch build of a profile, e.g. "torch==2.9.1 from cu126" (PyPI's default build is cu128)."""
    index = str(profile["torch_index_url"]).rsplit("/", 1)[-1] or "PyPI (cu128)"
    return f"{profile['torch_spec']} from {index}"


NO_GPU_DETECTED = (
    "moshi_server_mode=gpu but no NVIDIA GPU was detected on this host: set moshi_server_mode=cpu"
)


def moshi_resolve_mode(
    mode: str,
    precision: str,
    gpu_cc: Any = None,
    gpu_memory_mib: Any = None,
    params_billion: Any = MOSHI_7B_PARAMS_B,
    gpu_problems: Any = None,
) -> str:
    """``auto`` becomes ``gpu`` when this GPU can run ``precision`` and nothing blocks the GPU
    (``gpu_problems``: the host's runtime problems, e.g. WSL2 without libcuda.so), else ``cpu``; other
    modes pass through."""
    if mode != MODE_AUTO:
        return mode
    if gpu_cc in (None, "") or gpu_problems:
        return "cpu"
    gpu = moshi_profile("gpu", precision, gpu_cc, gpu_memory_mib, params_billion)
    return "cpu" if gpu["problems"] else "gpu"


def _contradictions(gpu_cc: Any, gpu_memory_mib: Any, runtime: dict[str, Any]) -> list[str]:
    """moshi_server_gpu_* values that contradict what the GPU reports (nothing when either is unknown)."""
    problems: list[str] = []
    ignored: list[str] = []
    detected_cc = _as_float(runtime.get("gpu_compute_capability"), "detected cc", ignored)
    detected_mib = _as_float(runtime.get("gpu_memory_mib"), "detected memory", ignored)
    wanted_cc = _as_float(gpu_cc, "moshi_server_gpu_compute_capability", ignored)
    wanted_mib = _as_float(gpu_memory_mib, "moshi_server_gpu_memory_mib", ignored)
    if wanted_cc is not None and detected_cc is not None and wanted_cc != detected_cc:
        problems.append(
            f"moshi_server_gpu_compute_capability={gpu_cc} but the GPU reports "
            f"{runtime['gpu_compute_capability']}: fix the inventory"
        )
    if wanted_mib is not None and detected_mib is not None and wanted_mib > detected_mib * 1.02:
        problems.append(
            f"moshi_server_gpu_memory_mib={gpu_memory_mib} but the GPU has {detected_mib:.0f} MiB: "
            "fix the inventory"
        )
    return problems


def moshi_host_profile(
    mode: str,
    precision: str,
    gpu_cc: Any = None,
    gpu_memory_mib: Any = None,
    params_billion: Any = MOSHI_7B_PARAMS_B,
    cpu_threads: Any = 0,
    flavor: str = "kyutai",
    runtime: Any = None,
) -> dict[str, Any]:
    """What the moshi_server role deploys on a host, and what playbooks/diagnose.yml judges: one decision.

    ``mode`` may be ``auto``. ``gpu_cc`` / ``gpu_memory_mib`` are the host's moshi_server_gpu_* settings
    (by default the detected ones). ``runtime`` is what the nvidia_runtime role detected:
    ``{gpu_present, gpu_compute_capability, gpu_memory_mib, problems}`` (empty when no detection ran).
    Its problems (WSL2 without libcuda.so, a driver too old for the GPU, a broken driver), and a GPU
    that detection did not find, keep ``auto`` on the CPU and are problems of ``gpu`` mode; settings
    that contradict the detected GPU are problems in any mode. Returns :func:`moshi_profile`'s dict for
    the resolved mode, with every problem.
    """
    facts: dict[str, Any] = dict(runtime or {})
    blockers = [str(problem) for problem in facts.get("problems") or []]
    if facts.get("gpu_present") is False and gpu_cc not in (None, ""):
        blockers.insert(0, NO_GPU_DETECTED)
    resolved = moshi_resolve_mode(mode, precision, gpu_cc, gpu_memory_mib, params_billion, blockers)
    profile = moshi_profile(resolved, precision, gpu_cc, gpu_memory_mib, params_billion, cpu_threads, flavor)
    if resolved == "gpu":
        profile["problems"].extend(blockers)
    profile["problems"].extend(_contradictions(gpu_cc, gpu_memory_mib, facts))
    return profile


def moshi_diagnose(
    gpu_cc: Any = None,
    gpu_memory_mib: Any = None,
    inventory_mode: Any = None,
    inventory_precision: Any = None,
    params_billion: Any = MOSHI_7B_PARAMS_B,
    gpu_problems: Any = None,
    inventory_gpu_cc: Any = None,
    inventory_gpu_memory_mib: Any = None,
    gpu_present: Any = None,
) -> dict[str, Any]:
    """What a host can run, and why: the diagnose row's verdict for detected GPU facts.

    gpu_cc / gpu_memory_mib are what the host reports (None: no GPU); gpu_present what detection said
    (None: a GPU exactly when gpu_cc is known). The capability columns are for Moshi 7B; the inventory
    check (moshi_server_mode / moshi_server_precision, if either is set, the other taking the role
    default) is :func:`moshi_host_profile`, the role's own decision, with the host's model size,
    params_billion. gpu_problems are runtime problems found on the host (e.g. WSL2 without libcuda)
    that block any GPU mode. inventory_gpu_cc / inventory_gpu_memory_mib are the host's
    moshi_server_gpu_* settings (None: the detected values, as in the role).
    Keys: gpu, family, torch_build, gpu_torch_build, compile_ok, bf16_ok, q8_ok (None without GPU),
    fits (precision -> bool, None if memory unknown), largest_precision, realtime_factors
    ("gpu/bf16" -> step / 80 ms), recommended_mode, recommended_precision, recommended_realtime,
    inventory ("gpu/fp16" or None), inventory_realtime_factor, blockers, source.
    """
    ignored: list[str] = []
    cc = _as_float(gpu_cc, "gpu compute capability", ignored)
    memory_mib = _as_float(gpu_memory_mib, "gpu memory", ignored)
    runtime_problems = [str(problem) for problem in gpu_problems or []]
    has_gpu = cc is not None
    family = gpu_family(cc) if cc is not None else None

    fits: dict[str, bool] | None = None
    if has_gpu and memory_mib is not None:
        fits = {p: peak_memory_gib(p, MOSHI_7B_PARAMS_B) * 1024 <= memory_mib for p in PRECISIONS}
    working = [
        precision
        for precision in PREFERENCE
        if has_gpu and not moshi_profile("gpu", precision, gpu_cc, gpu_memory_mib)["problems"]
    ]
    factors: dict[str, float] = {}
    for precision in working:
        factors[f"gpu/{precision}"] = moshi_profile("gpu", precision, gpu_cc, gpu_memory_mib)[
            "realtime_factor"
        ]
    factors["cpu/bf16"] = moshi_profile("cpu", "bf16")["realtime_factor"]
    recommended = moshi_recommend(gpu_cc, gpu_memory_mib)

    verdict: dict[str, Any] = {
        "gpu": has_gpu,
        "family": family.name if family else None,
        "torch_build": torch_build_name(recommended),
        "gpu_torch_build": (
            torch_build_name(moshi_profile("gpu", "fp16", gpu_cc)) if family is not None else None
        ),
        "compile_ok": family.compile_ok if family else (False if has_gpu else None),
        "bf16_ok": (cc >= BF16_MIN_CC) if cc is not None else None,
        "q8_ok": (cc >= Q8_MIN_CC and (fits is None or fits["q8"])) if cc is not None else None,
        "fits": fits,
        "largest_precision": working[0] if working else None,
        "realtime_factors": factors,
        "recommended_mode": recommended["mode"],
        "recommended_precision": recommended["precision"],
        "recommended_realtime": recommended["realtime_factor"] is not None
        and recommended["realtime_factor"] < 1,
        "inventory": None,
        "inventory_realtime_factor": None,
        "blockers": [],
        "source": DIAGNOSE_SOURCE,
    }
    if inventory_mode in (None, "") and inventory_precision in (None, ""):
        return verdict

    precision = str(inventory_precision or "bf16")
    runtime = {
        "gpu_present": has_gpu if gpu_present in (None, "") else bool(gpu_present),
        "gpu_compute_capability": gpu_cc,
        "gpu_memory_mib": gpu_memory_mib,
        "problems": runtime_problems,
    }
    profile = moshi_host_profile(
        str(inventory_mode or "cpu"),
        precision,
        gpu_cc if inventory_gpu_cc in (None, "") else inventory_gpu_cc,
        gpu_memory_mib if inventory_gpu_memory_mib in (None, "") else inventory_gpu_memory_mib,
        params_billion,
        runtime=runtime,
    )
    # Diagnose reads the GPU itself: "not known" means "not detected" here.
    blockers = [
        NO_GPU_DETECTED if problem.startswith(_NO_GPU_PROBLEM) else problem for problem in profile["problems"]
    ]
    verdict["inventory"] = f"{profile['mode']}/{precision}"
    verdict["inventory_realtime_factor"] = profile["realtime_factor"]
    verdict["blockers"] = list(dict.fromkeys(blockers))
    return verdict


# --- The voice engine (engine/: streaming STT and TTS), same GPU families and torch builds as Moshi ---

ENGINE_PRECISIONS = ("bf16", "fp16", "fp32", "q8", "nf4")
# q8 (bitsandbytes LLM.int8) and nf4 (bitsandbytes 4-bit, experimental) serve the chat module only.
ENGINE_QUANTIZED = ("q8", "nf4")
ENGINE_QUANTIZED_KINDS = ("chat",)
ENGINE_DEVICES = ("cpu", "cuda")
# Weight bytes per parameter: q8 from Kyutai's q8 Moshi 7B (7.8 GiB), nf4 from NF4 Moshi 7B on the H200
# (4.38 GiB: the embeddings and output heads stay 16-bit). Activations stay 16-bit in both.
BYTES_PER_PARAM = {"bf16": 2, "fp16": 2, "fp32": 4, "q8": 1.06, "nf4": 0.6}
ACTIVATION_SCALE = {"bf16": 1, "fp16": 1, "fp32": 2, "q8": 1, "nf4": 1}
# CUDA context and allocator reserve of one process: not measured (peak figures are torch's allocations).
ENGINE_CUDA_CONTEXT_GIB = 0.5


@dataclass(frozen=True)
class EngineModel:
    """A Kyutai model the engine serves: real parameter count and memory beyond the weights."""

    label: str
    repo: str
    params_billion: float
    overhead_gib: float  # peak minus weights at one slot (Mimi, activations, caches)
    per_slot_gib: float  # each further slot
    measured: bool
    source: str


ENGINE_MODELS = {
    "asr": EngineModel(
        "STT 1B",
        "kyutai/stt-1b-en_fr",
        0.97,
        overhead_gib=0.59,  # 2.4 GiB peak at B=1 minus 1.81 GiB of bf16 weights
        per_slot_gib=0.109,  # (114 - 2.4) GiB / 1023 more streams
        measured=True,
        source="measured: STT-1B-shaped LM + Mimi encode, bf16, H200, B=1..1024 (field notes section 7)",
    ),
    "tts": EngineModel(
        "TTS 1.6B",
        "kyutai/tts-1.6b-en_fr",
        1.84,
        overhead_gib=1.0,
        per_slot_gib=0.25,
        measured=False,
        source="UNMEASURED estimate: overhead and per-slot memory not measured yet",
    ),
    "chat": EngineModel(
        "PersonaPlex/Moshi 7B",
        "nvidia/personaplex-7b-v1",
        7.89,  # served with the agent's 8 depformer steps: 14.7 GiB of bf16 weights
        overhead_gib=1.6,  # 16.3 GiB peak at B=1 minus the weights
        per_slot_gib=1.48,  # (109.7 - 16.3) GiB / 63 more conversations, mostly the 3000-step KV cache
        measured=True,
        source="measured: Moshi 7B bf16 + Mimi encode/decode per slot, H200, B=1..64 (docs/benchmarks.md)",
    ),
}
# The modules of the agent loop, which diagnose.yml sizes together.
ENGINE_AGENT_KINDS = ("asr", "tts")


def _engine_module_memory(kind: str, precision: str, slots: int) -> float:
    model = ENGINE_MODELS[kind]
    weights = model.params_billion * 1e9 * BYTES_PER_PARAM[precision] / 2**30
    scale = ACTIVATION_SCALE[precision]  # overheads were measured in 16-bit
    return weights + (model.overhead_gib + model.per_slot_gib * max(slots - 1, 0)) * scale


def engine_profile(
    modules: Any,
    gpu_cc: Any = None,
    gpu_memory_mib: Any = None,
    cpu_threads: Any = 0,
    gpu_problems: Any = None,
) -> dict[str, Any]:
    """How the voice engine runs on a host: the torch build, environment and memory of its modules.

    ``modules`` maps a module name to ``{kind, slots, precision, device}`` (kind defaults to the name;
    slots 1, precision fp32, device cpu). The torch build is Moshi's for the same hardware (a CUDA
    build as soon as one module runs on the GPU). Memory is for the full-size models (a tiny test
    model on the CPU is never checked against memory). ``gpu_problems`` are the host's runtime problems
    (nvidia_runtime_problems, e.g. WSL2 without libcuda.so), the ones diagnose.yml reports: they block
    every cuda module. Keys: device, family, torch_spec,
    torch_index_url, env, modules
    (name -> kind, model, params_billion, precision, device, slots, memory_gib, measured, source),
    gpu_memory_gib (the modules on the GPU plus the CUDA context), measured, plan, problems.
    """
    problems: list[str] = []
    cc = _as_float(gpu_cc, "voice_engine_gpu_compute_capability", problems)
    memory_mib = _as_float(gpu_memory_mib, "voice_engine_gpu_memory_mib", problems)
    threads = int(_as_float(cpu_threads, "voice_engine_cpu_threads", problems) or 0)
    if not isinstance(modules, dict) or not modules:
        problems.append("voice_engine_modules must map at least one module name to its settings (asr, tts)")
        modules = {}

    rows: dict[str, dict[str, Any]] = {}
    for name, raw in modules.items():
        where = f"voice_engine_modules.{name}"
        spec = raw if isinstance(raw, dict) else {}
        if not isinstance(raw, dict):
            problems.append(f"{where} must be a mapping (kind, slots, precision, device)")
        kind = str(spec.get("kind", name))
        precision = str(spec.get("precision", "fp32"))
        device = str(spec.get("device", "cpu"))
        slots_raw = spec.get("slots", 1)
        slots = slots_raw if isinstance(slots_raw, int) and not isinstance(slots_raw, bool) else 0
        ok = True
        if kind not in ENGINE_MODELS:
            problems.append(f"{where}.kind={kind!r} is unknown: set one of {', '.join(ENGINE_MODELS)}")
            ok = False
        if precision not in ENGINE_PRECISIONS:
            problems.append(
                f"{where}.precision={precision!r} is unknown: set one of {', '.join(ENGINE_PRECISIONS)}"
            )
            ok = False
        if device not in ENGINE_DEVICES:
            problems.append(f"{where}.device={device!r} is unknown: set one of {', '.join(ENGINE_DEVICES)}")
            ok = False
        if not 1 <= slots <= 4096:
            problems.append(f"{where}.slots={slots_raw!r} must be a whole number from 1 to 4096")
            ok = False
        if precision in ENGINE_QUANTIZED and kind not in ENGINE_QUANTIZED_KINDS and kind in ENGINE_MODELS:
            problems.append(
                f"{where}: precision {precision} is for the chat module only; set bf16, fp16 or fp32"
            )
            ok = False
        if device == "cpu" and precision == "fp16":
            problems.append(f"{where}: fp16 is for GPUs; on the CPU set precision fp32 (or bf16)")
        if device == "cuda":
            if cc is None:
                problems.append(
                    f"{where}.device=cuda but no GPU is known on this host: set device cpu "
                    "(precision fp32), or voice_engine_gpu_compute_capability"
                )
            elif precision == "q8" and cc < Q8_MIN_CC:
                problems.append(
                    f"{where}: q8 (bitsandbytes LLM.int8) needs compute capability >= {Q8_MIN_CC}, this GPU "
                    f"has {cc}: set precision nf4 (experimental) or fp16"
                )
            elif precision == "bf16" and cc < BF16_MIN_CC:
                problems.append(
                    f"{where}: bf16 needs compute capability >= {BF16_MIN_CC}, this GPU has {cc}: "
                    "set precision fp16"
                )
        if not ok:
            continue
        model = ENGINE_MODELS[kind]
        memory = _engine_module_memory(kind, precision, slots)
        rows[name] = {
            "kind": kind,
            "model": f"{model.label} ({model.repo}, {model.params_billion} B params)",
            "params_billion": model.params_billion,
            "precision": precision,
            "device": device,
            "slots": slots,
            "memory_gib": round(memory, 2),
            "measured": model.measured,
            "source": model.source,
        }

    on_gpu = [row for row in rows.values() if row["device"] == "cuda"]
    if on_gpu:
        problems.extend(
            f"{problem}: the cuda modules cannot run here; fix it, or set their device cpu (fp32)"
            for problem in gpu_problems or []
        )
    device = (
        "cuda" if any(isinstance(m, dict) and m.get("device") == "cuda" for m in modules.values()) else "cpu"
    )
    family_name, index, compile_ok = "cpu", INDEX_CPU, False
    if device == "cuda" and cc is not None:
        family = gpu_family(cc)
        if family is None:
            problems.append(
                f"GPU compute capability {cc} is older than Pascal (6.0): no supported torch build; "
                "run every module on the CPU (device cpu, precision fp32)"
            )
        else:
            family_name, index, compile_ok = family.name, family.torch_index_url, family.compile_ok
    env: dict[str, str] = {}
    if not compile_ok:
        # CPU: no inductor C++ compile at start. Pascal: Triton needs CC >= 7.0. CUDA graphs stay on.
        env["NO_TORCH_COMPILE"] = "1"
    if threads > 0 and device == "cpu":
        env["OMP_NUM_THREADS"] = str(threads)
    gpu_gib = round(sum(row["memory_gib"] for row in on_gpu) + (ENGINE_CUDA_CONTEXT_GIB if on_gpu else 0), 2)
    gpu_parts = ", ".join(f"{n} {r['memory_gib']}" for n, r in rows.items() if r["device"] == "cuda")
    if on_gpu and memory_mib is not None and gpu_gib * 1024 > memory_mib:
        problems.append(
            f"the GPU modules need about {gpu_gib} GiB ({gpu_parts} + {ENGINE_CUDA_CONTEXT_GIB} context), "
            f"the GPU has {round(memory_mib / 1024, 1)} GiB: "
            "lower the slots, or move a module to the CPU"
        )
    measured = all(row["measured"] for row in rows.values())
    parts = [
        f"{name}{'' if name == row['kind'] else ' (' + row['kind'] + ')'} "
        f"{row['device']}/{row['precision']} x{row['slots']} ~{row['memory_gib']} GiB"
        f"{' (nf4 EXPERIMENTAL: quality unmeasured)' if row['precision'] == 'nf4' else ''}"
        f"{'' if row['measured'] else ' (unmeasured)'}"
        for name, row in rows.items()
    ]
    memory_text = f"{round(memory_mib / 1024, 1)} GiB" if memory_mib is not None else "unknown memory"
    plan = ("; ".join(parts) + " (memory for the full-size models)") if parts else "no module"
    if on_gpu:
        plan += f"; GPU total ~{gpu_gib} GiB of {memory_text}"
        plan += f" (CUDA context {ENGINE_CUDA_CONTEXT_GIB} GiB unmeasured)"
        plan += "; speed on this GPU unmeasured"
    return {
        "device": device,
        "family": family_name,
        "torch_spec": TORCH_SPEC,
        "torch_index_url": index,
        "env": env,
        "modules": rows,
        "gpu_memory_gib": gpu_gib,
        "measured": measured,
        "plan": plan,
        "problems": problems,
    }


def engine_diagnose(
    gpu_cc: Any = None, gpu_memory_mib: Any = None, gpu_problems: Any = None
) -> dict[str, Any]:
    """What the engine can run on this hardware: asr and tts at one slot each, the best precision.

    Keys: precision, device, fits ({"asr", "tts", "asr+tts"} -> bool, None when memory is unknown),
    memory_gib (per module and both), max_slots (each module alone beside the other at one slot),
    line (one sentence for diagnose.yml), blockers (runtime problems of the GPU, e.g. WSL2 without
    libcuda).
    """
    ignored: list[str] = []
    cc = _as_float(gpu_cc, "gpu compute capability", ignored)
    memory_mib = _as_float(gpu_memory_mib, "gpu memory", ignored)
    runtime = [str(p) for p in gpu_problems or []]
    if cc is None or gpu_family(cc) is None or runtime:
        why = "no GPU" if cc is None else ("; ".join(runtime) or f"CC {cc} is older than Pascal")
        return {
            "precision": "fp32",
            "device": "cpu",
            "fits": None,
            "memory_gib": {},
            "max_slots": {},
            "line": f"engine: CPU only ({why}): asr and tts in fp32; speed on this CPU unmeasured",
            "blockers": runtime,
        }
    precision = "bf16" if cc >= BF16_MIN_CC else "fp16"
    one = {kind: _engine_module_memory(kind, precision, 1) for kind in ENGINE_AGENT_KINDS}
    both = sum(one.values()) + ENGINE_CUDA_CONTEXT_GIB
    fits: dict[str, bool] | None = None
    max_slots: dict[str, int] = {}
    if memory_mib is not None:
        budget = memory_mib / 1024
        fits = {kind: one[kind] + ENGINE_CUDA_CONTEXT_GIB <= budget for kind in ENGINE_AGENT_KINDS}
        fits["asr+tts"] = both <= budget
        for kind in ENGINE_AGENT_KINDS:
            model = ENGINE_MODELS[kind]
            others = sum(v for k, v in one.items() if k != kind) + ENGINE_CUDA_CONTEXT_GIB
            room = budget - others - one[kind]
            scale = ACTIVATION_SCALE[precision]
            max_slots[kind] = 1 + int(room / (model.per_slot_gib * scale)) if room >= 0 else 0
    sizes = ", ".join(
        f"{kind} {ENGINE_MODELS[kind].label} ({ENGINE_MODELS[kind].params_billion} B) ~{one[kind]:.1f} GiB"
        f"{'' if ENGINE_MODELS[kind].measured else ' (overhead unmeasured)'}"
        for kind in ENGINE_AGENT_KINDS
    )
    if fits is None or memory_mib is None:
        verdict = "GPU memory unknown"
    elif fits["asr+tts"]:
        verdict = (
            f"asr+tts fit together ({both:.1f} GiB of {memory_mib / 1024:.1f}); "
            f"at most ~{max_slots['asr']} asr slots or ~{max_slots['tts']} tts slots beside the other"
        )
    else:
        verdict = f"asr+tts do NOT fit together ({both:.1f} GiB of {memory_mib / 1024:.1f})"
    return {
        "precision": precision,
        "device": "cuda",
        "fits": fits,
        "memory_gib": {**{k: round(v, 2) for k, v in one.items()}, "asr+tts": round(both, 2)},
        "max_slots": max_slots,
        "line": f"engine: cuda/{precision}: {sizes}; {verdict}; speed on this GPU unmeasured",
        "blockers": [],
    }


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {
            "moshi_profile": moshi_profile,
            "moshi_recommend": moshi_recommend,
            "moshi_resolve_mode": moshi_resolve_mode,
            "moshi_host_profile": moshi_host_profile,
            "moshi_diagnose": moshi_diagnose,
            "engine_profile": engine_profile,
            "engine_diagnose": engine_diagnose,
        }
