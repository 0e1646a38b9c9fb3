"""The hardware decision table (plugins/filter/moshi_profile.py), case by case."""

from __future__ import annotations

import pytest
from moshi_profile import INDEX_CPU, INDEX_CU126, INDEX_PYPI, FilterModule, moshi_profile, moshi_resolve_mode

GTX_1080_TI = {"gpu_cc": "6.1", "gpu_memory_mib": 11264}
RTX_5090 = {"gpu_cc": "12.0", "gpu_memory_mib": 32607}
RTX_5090_LAPTOP = {"gpu_cc": "12.0", "gpu_memory_mib": 24463}
RTX_2080_TI = {"gpu_cc": "7.5", "gpu_memory_mib": 11264}
V100_32GB = {"gpu_cc": "7.0", "gpu_memory_mib": 32768}
H100 = {"gpu_cc": "9.0", "gpu_memory_mib": 81559}

# (mode, precision, gpu, expected torch index, expected env, expected extra args, problem fragments)
CASES = [
    ("cpu", "bf16", {}, INDEX_CPU, {"NO_TORCH_COMPILE": "1"}, [], []),
    ("cpu", "q8", {}, INDEX_CPU, {"NO_TORCH_COMPILE": "1"}, [], []),
    ("cpu", "fp16", {}, INDEX_CPU, {"NO_TORCH_COMPILE": "1"}, ["--half"], []),
    # gpu01: nothing fits or works on the GPU for the 7B model.
    (
        "gpu",
        "bf16",
        GTX_1080_TI,
        INDEX_CU126,
        {"NO_TORCH_COMPILE": "1"},
        [],
        ["bf16 needs compute capability >= 8.0", "set moshi_server_precision=fp16", "16.3 GiB"],
    ),
    (
        "gpu",
        "fp16",
        GTX_1080_TI,
        INDEX_CU126,
        {"NO_TORCH_COMPILE": "1"},
        ["--half"],
        ["16.3 GiB at peak in fp16", "moshi_server_mode=cpu"],
    ),
    (
        "gpu",
        "q8",
        GTX_1080_TI,
        INDEX_CU126,
        {"NO_TORCH_COMPILE": "1"},
        [],
        ["q8 (bitsandbytes LLM.int8) needs compute capability >= 7.5"],
    ),
    # The WSL2 PC: bf16 fits and is fast.
    ("gpu", "bf16", RTX_5090, INDEX_PYPI, {}, [], []),
    ("gpu", "q8", RTX_5090, INDEX_PYPI, {}, [], []),
    ("gpu", "bf16", RTX_5090_LAPTOP, INDEX_PYPI, {}, [], []),
    ("gpu", "q8", RTX_2080_TI, INDEX_PYPI, {}, [], []),
    ("gpu", "bf16", RTX_2080_TI, INDEX_PYPI, {}, [], ["bf16 needs compute capability >= 8.0"]),
    ("gpu", "fp16", V100_32GB, INDEX_PYPI, {}, ["--half"], []),
    ("gpu", "q8", V100_32GB, INDEX_PYPI, {}, [], ["needs compute capability >= 7.5"]),
    ("gpu", "bf16", H100, INDEX_PYPI, {}, [], []),
    ("gpu", "bf16", {}, INDEX_CPU, {}, [], ["no GPU is known on this host", "moshi_server_mode=cpu"]),
    ("gpu", "fp16", {"gpu_cc": "5.2"}, INDEX_CPU, {}, ["--half"], ["older than Pascal"]),
    ("tpu", "bf16", {}, INDEX_CPU, {}, [], ["moshi_server_mode='tpu' is unknown: set one of cpu, gpu"]),
    (
        "cpu",
        "int4",
        {},
        INDEX_CPU,
        {"NO_TORCH_COMPILE": "1"},
        [],
        ["moshi_server_precision='int4' is unknown: set one of bf16, fp16, q8"],
    ),
    ("gpu", "bf16", {"gpu_cc": "eight"}, INDEX_CPU, {}, [], ["moshi_server_gpu_compute_capability='eight'"]),
]


@pytest.mark.parametrize(("mode", "precision", "gpu", "index", "env", "extra_args", "problems"), CASES)
def test_profile_table(mode, precision, gpu, index, env, extra_args, problems):
    profile = moshi_profile(mode, precision, **gpu)
    assert profile["torch_index_url"] == index
    assert profile["env"] == env
    assert profile["server_args"] == ["--device", "cuda" if mode == "gpu" else "cpu", *extra_args]
    for fragment in problems:
        assert any(fragment in problem for problem in profile["problems"]), (fragment, profile["problems"])
    if not problems:
        assert profile["problems"] == []
    assert profile["torch_spec"] == "torch==2.9.1"


def test_no_profile_ever_disables_cuda_graphs():
    for mode, precision, gpu, *_ in CASES:
        assert "NO_CUDA_GRAPH" not in moshi_profile(mode, precision, **gpu)["env"]


def test_pascal_profiles_disable_compile_and_use_half():
    profile = moshi_profile("gpu", "fp16", gpu_cc="6.1", gpu_memory_mib=24576, params_billion=7.69)
    assert profile["problems"] == []  # a 24 GB Pascal card (Tesla P40) fits fp16
    assert profile["env"]["NO_TORCH_COMPILE"] == "1"
    assert "--half" in profile["server_args"]
    assert profile["family"] == "pascal"


def test_only_q8_needs_bitsandbytes():
    assert moshi_profile("cpu", "q8")["needs_bitsandbytes"] is True
    assert moshi_profile("cpu", "bf16")["needs_bitsandbytes"] is False


@pytest.mark.parametrize(
    ("precision", "params", "peak"),
    [("bf16", 7.69, 16.3), ("fp16", 7.69, 16.3), ("q8", 7.69, 9.4), ("bf16", 0.001, 1.6)],
)
def test_peak_memory_matches_the_measured_7b_figures(precision, params, peak):
    assert moshi_profile("cpu", precision, params_billion=params)["peak_gib"] == peak


def test_tiny_model_fits_any_gpu_memory_check():
    profile = moshi_profile("gpu", "fp16", gpu_cc="6.1", gpu_memory_mib=11264, params_billion=0.001)
    assert profile["problems"] == []


def test_cpu_threads_become_omp_num_threads():
    assert moshi_profile("cpu", "bf16", cpu_threads=4)["env"]["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in moshi_profile("cpu", "bf16", cpu_threads=0)["env"]


def test_expected_speed_is_honest():
    cpu = moshi_profile("cpu", "bf16")
    assert cpu["realtime_factor"] == pytest.approx(11.88)
    assert cpu["realtime"].startswith("NOT real time")
    gpu = moshi_profile("gpu", "bf16", **RTX_5090)
    assert gpu["realtime_factor"] < 1


def test_filter_is_registered_for_ansible():
    assert FilterModule().filters()["moshi_profile"] is moshi_profile


@pytest.mark.parametrize(
    ("precision", "gpu", "expected"),
    [
        ("bf16", RTX_5090, "gpu"),
        ("bf16", GTX_1080_TI, "cpu"),  # gpu01: nothing works on its GPU
        ("q8", RTX_2080_TI, "gpu"),
        ("bf16", RTX_2080_TI, "cpu"),  # bf16 needs CC 8.0: auto falls back rather than fail
        ("bf16", {}, "cpu"),
    ],
)
def test_auto_mode_takes_the_gpu_only_when_it_can_run_the_precision(precision, gpu, expected):
    assert moshi_resolve_mode("auto", precision, **gpu) == expected


def test_explicit_modes_pass_through_unchanged():
    assert moshi_resolve_mode("gpu", "bf16") == "gpu"
    assert moshi_resolve_mode("cpu", "bf16", **RTX_5090) == "cpu"
