"""``voice-engine bench --kind chat`` on the CPU with the tiny PersonaPlex-shaped set (figures meaningless).

The real command: engine processes, websocket clients with a voice and a text prompt streaming Ogg/Opus
in real time at random phases; and the in-process stepper mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

FRAMES = 25  # --seconds 2
COMMAND = (
    sys.executable,
    "-m",
    "voice_engine",
    "bench",
    "--kind",
    "chat",
    "--size",
    "tiny",
    "--device",
    "cpu",
)


def bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*COMMAND, "--json", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return proc, rows


def test_conversations_through_the_server(tmp_path: Path) -> None:
    proc, rows = bench(tmp_path, "--precision", "fp32", "--slots", "1,3", "--seconds", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["slots"] for r in rows] == [1, 3]
    for row in rows:
        assert row["clients_ok"] == row["slots"] and not row["errors"], row
        # Every client timed its frames after the first second; the replies came for every frame.
        assert row["client_frames"] == row["slots"] * (FRAMES - 12), row
        assert 0 < row["client_ms_p50"] <= row["client_ms_p99"]
        assert row["handshake_ms_p50"] > 0 and row["prefill_steps"] > 12  # voice + 2 x 6 silent + text
        assert row["step_ms_p50"] > 0 and row["stream_steps"] >= FRAMES
    assert "max conversations with p99 < 80 ms" in proc.stdout


def test_batch_wait_gives_one_step_per_frame(tmp_path: Path) -> None:
    proc, rows = bench(
        tmp_path, "--precision", "q8", "--slots", "3", "--seconds", "2", "--batch-wait-ms", "80"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = rows
    assert row["clients_ok"] == 3 and row["batch_wait_ms"] == 80
    # Three clients at phases 19, 44 and 30 ms apart: without the wait, their frames start separate steps.
    assert FRAMES <= row["stream_steps"] <= FRAMES + 2, row


def test_stepper_mode_and_bad_precisions(tmp_path: Path) -> None:
    proc, rows = bench(
        tmp_path, "--stepper", "--precision", "nf4", "--slots", "2", "--steps", "3", "--warmup", "1"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rows[0]["mode"] == "stepper" and rows[0]["step_ms_p99"] > 0
    proc, _ = bench(tmp_path, "--precision", "int4")
    assert proc.returncode == 2 and "--precision int4" in proc.stderr
