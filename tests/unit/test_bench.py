"""The bench command (moshi_tools.bench) on CPU, with the tiny model: figures, JSON, env file, q8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import tools_env
from moshi_tools import bench

FIELD_ERROR = "Expected `weight_scb` to have type float, but got bfloat16"
FAST = ["--device", "cpu", "--warmup", "1", "--frames", "4"]


def run_bench(*args: str, moshi_copy: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    base = tools_env(moshi_copy) if moshi_copy is not None else tools_env()
    # The service's CPU profile: no inductor compile (it would need gcc and take minutes).
    environment = base | {"NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "2"} | env
    return subprocess.run(
        [sys.executable, "-m", "moshi_tools.bench", *args],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
        timeout=120,
    )


def as_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def run_inline(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """bench.main in this process (torch is already imported here, so no env file)."""
    code = bench.main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    # moshi decided at import whether to compile; TORCHDYNAMO_DISABLE=1 still stops PyTorch at the
    # first call, and the bench must report exactly that.
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    monkeypatch.delenv("NO_TORCH_COMPILE", raising=False)
    monkeypatch.delenv("NO_CUDA_GRAPH", raising=False)


@pytest.mark.usefixtures("no_compile")
def test_prints_the_figures_for_a_model_dir(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    code, out, err = run_inline(capsys, "--model-dir", str(tiny_models["bf16"]), *FAST)
    assert code == 0, err
    assert f"moshi bench: {tiny_models['bf16']} (" in out and " M LM parameters)" in out
    assert "precision bf16, dtype bfloat16, device cpu" in out
    assert "flags: compile off (TORCHDYNAMO_DISABLE=1); CUDA graphs off (device is cpu)" in out
    assert "4 frames: median " in out and " ms, p90 " in out and "per 80 ms frame" in out
    assert "real-time factor " in out
    assert "peak host memory (RSS)" in out
    assert "peak GPU memory" not in out  # no GPU here


@pytest.mark.usefixtures("no_compile")
def test_json_output_is_consistent(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    code, out, err = run_inline(capsys, "--model-dir", str(tiny_models["bf16"]), *FAST, "--half", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["ok"] is True
    assert (data["precision"], data["dtype"], data["device"]) == ("fp16", "float16", "cpu")
    assert data["bitsandbytes"] is None
    assert data["frames"] == 4 and data["warmup_frames"] == bench.SERVER_WARMUP_FRAMES + 1
    assert 0 < data["min_ms"] <= data["median_ms"] <= data["p90_ms"] <= data["max_ms"]
    assert data["realtime_factor"] == pytest.approx(data["median_ms"] / 80, abs=1e-3)
    assert data["realtime"] is (data["p90_ms"] <= 80)
    assert data["lm_params"] > 0
    assert data["peak_gpu_gib"] is None and data["peak_rss_gib"] > 0
    assert (data["compile"], data["compile_reason"]) == (False, "TORCHDYNAMO_DISABLE=1")
    assert data["cuda_graphs"] is False and data["env"]["TORCHDYNAMO_DISABLE"] == "1"


@pytest.mark.usefixtures("no_compile")
def test_failures_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "nope"
    code, out, err = run_inline(capsys, "--model-dir", str(missing), *FAST)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"moshi bench FAILED: ModelDirError: model directory {missing} does not exist"
    ]
    code, out, err = run_inline(capsys, "--model-dir", str(missing), *FAST, "--json")
    assert code == 1 and json.loads(out) == {"ok": False, "error": err.strip().split("FAILED: ", 1)[1]}
    bad = tmp_path / "bad.env"
    bad.write_text("NO_TORCH_COMPILE=1\nthis is not an assignment\n", encoding="utf-8")
    code, out, err = run_inline(capsys, "--random-tiny", *FAST, "--env-file", str(bad))
    assert code == 1
    assert err.splitlines() == [
        f"moshi bench FAILED: {bad}, line 2: not KEY=VALUE: 'this is not an assignment'"
    ]


def test_env_file_is_loaded_before_torch_and_wins(tiny_models: dict[str, Path], tmp_path: Path):
    env_file = tmp_path / "moshi-server.env"
    env_file.write_text(
        "#\n# Ansible managed\n#\nHF_HUB_OFFLINE=1\nNO_TORCH_COMPILE=1\nOMP_NUM_THREADS=1\n"
        'NO_CUDA_GRAPH="1"\n',
        encoding="utf-8",
    )
    # The caller's shell says 2 threads; the service's file says 1, and the file wins, as under
    # systemd. torch reads OMP_NUM_THREADS once, at import: 1 thread proves the order.
    proc = run_bench("--model-dir", str(tiny_models["bf16"]), *FAST, "--env-file", str(env_file), "--json")
    data = as_json(proc)
    assert data["threads"] == 1
    assert data["env_file"] == str(env_file)
    assert data["env_file_keys"] == ["HF_HUB_OFFLINE", "NO_CUDA_GRAPH", "NO_TORCH_COMPILE", "OMP_NUM_THREADS"]
    assert data["env"]["NO_CUDA_GRAPH"] == "1" and data["env"]["OMP_NUM_THREADS"] == "1"
    assert (data["compile"], data["compile_reason"]) == (False, "NO_TORCH_COMPILE=1")
    assert any("NO_CUDA_GRAPH=1 is set" in warning for warning in data["warnings"])
    text = bench.format_text(bench.Result(**data))
    assert f"env file {env_file} set: HF_HUB_OFFLINE, NO_CUDA_GRAPH, NO_TORCH_COMPILE" in text
    assert "WARNING: NO_CUDA_GRAPH=1 is set" in text


def test_unpatched_q8_fails_with_one_clean_line(unpatched_moshi: Path):
    # Random q8 weights go through a checkpoint and moshi's own loader, as the server's do.
    proc = run_bench("--random-tiny", "--precision", "q8", *FAST, moshi_copy=unpatched_moshi)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    failures = [line for line in proc.stderr.splitlines() if line.startswith("moshi bench FAILED:")]
    assert len(failures) == 1
    assert failures[0].startswith(f"moshi bench FAILED: RuntimeError: {FIELD_ERROR}")


def test_patched_q8_model_dir_runs(patched_moshi: Path, tiny_models: dict[str, Path]):
    data = as_json(
        run_bench(
            "--model-dir",
            str(tiny_models["q8"]),
            "--device",
            "cpu",
            "--warmup",
            "0",
            "--frames",
            "1",
            "--json",
            moshi_copy=patched_moshi,
        )
    )
    assert data["q8_loader"] == "patched by moshi_tools"
    assert (data["precision"], data["dtype"]) == ("q8", "bfloat16")
    assert data["bitsandbytes"] and data["frames"] == 1


# --- pure functions (no subprocess) -----------------------------------------------------------


def test_parse_env_file_follows_systemd_syntax():
    text = (
        '# comment\n; also a comment\n\nA=1\nB = two words \nC="quoted \\"x\\""\nD=\'single\'\n'
        "E=\nF=con\\\ntinued\n"
    )
    assert bench.parse_env_file(text) == {
        "A": "1",
        "B": "two words",
        "C": 'quoted "x"',
        "D": "single",
        "E": "",
        "F": "continued",
    }
    with pytest.raises(bench.BenchError, match="line 1: bad variable name"):
        bench.parse_env_file("A-B=1\n")
    with pytest.raises(bench.BenchError, match="unterminated quote"):
        bench.parse_env_file('A="open\n')


@pytest.mark.parametrize(
    ("value", "graphs"),
    [("", True), ("0", True), ("no", True), ("N", True), ("1", False), ("yes", False), ("false", False)],
)
def test_cuda_graph_rule_is_moshis(value: str, graphs: bool):
    from moshi.utils import compile as moshi_compile

    flags = bench.flags_in_force("cuda", {"NO_CUDA_GRAPH": value})
    assert flags.cuda_graphs is graphs
    assert bool(flags.warnings) is not graphs
    # The same answer as moshi's own check, read from the live environment.
    saved = os.environ.get("NO_CUDA_GRAPH")
    os.environ["NO_CUDA_GRAPH"] = value
    try:
        assert moshi_compile._is_cuda_graph_enabled() is graphs
    finally:
        if saved is None:
            del os.environ["NO_CUDA_GRAPH"]
        else:
            os.environ["NO_CUDA_GRAPH"] = saved


def test_compile_state_rules():
    assert bench.compile_state({}) == (True, "")
    assert bench.compile_state({"NO_TORCH_COMPILE": "0"}) == (False, "NO_TORCH_COMPILE=0")  # non-empty
    assert bench.compile_state({"TORCHDYNAMO_DISABLE": "true"}) == (True, "")  # torch wants exactly 1
    assert bench.compile_state({"TORCH_COMPILE_DISABLE": "1"}) == (False, "TORCH_COMPILE_DISABLE=1")


def test_percentile_and_summary():
    values = [float(v) for v in range(1, 11)]
    assert bench.percentile(values, 0.5) == 5.5
    assert bench.percentile(values, 0.9) == pytest.approx(9.1)
    result = bench.Result()
    bench.summarize([10.0, 20.0, 90.0], result)
    assert (result.median_ms, result.realtime_factor) == (20.0, 0.25)
    assert result.p90_ms == pytest.approx(76.0) and result.realtime is True
