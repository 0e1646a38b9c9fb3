"""``voice-engine selftest --say`` through a running engine (``--url``, ``--config --running``): real engine
processes on the tiny sets, the chat module's say channel and the engine's own asr module (or another
engine's), and the one-line errors for an engine that is not there or has no chat module.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from asr_helpers import stt_model_dir
from chat_helpers import chat_module, tiny_chat_dir, url
from conftest import EngineProcess, free_port, start_engine

SENTENCES = (
    "hello this is a test of the voice",
    "the weather is nice this morning",
)  # as the tiny set spells them
TAIL_S = 12 * 0.08


def asr_module(models_root: Path) -> dict[str, Any]:
    return {
        "asr": {
            "kind": "asr",
            "model_dir": str(stt_model_dir(models_root)),
            "slots": 1,
            "precision": "fp32",
            "device": "cpu",
        }
    }


@pytest.fixture(scope="module")
def engines(
    tmp_path_factory: pytest.TempPathFactory, models_root: Path
) -> Iterator[dict[str, EngineProcess]]:
    """``both``: PersonaPlex-shaped chat (default voice) and asr; ``asr``: asr alone; ``moshi``: a
    Moshi-shaped chat module with one slot (no prefill), nothing else."""
    tmp = tmp_path_factory.mktemp("selftest-engines")
    chat = chat_module(tiny_chat_dir(models_root, "personaplex"), 2, default_voice="TINYF0.pt")
    started = {"both": start_engine(tmp, {**chat, **asr_module(models_root)})}
    try:
        started["asr"] = start_engine(tmp, asr_module(models_root))
        started["moshi"] = start_engine(tmp, chat_module(tiny_chat_dir(models_root, "moshi"), 1))
        yield started
    finally:
        for engine in started.values():
            engine.stop()


def selftest(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The command, in a process of its own; the snippet also reports whether it imported torch."""
    code = (
        "import sys; from voice_engine.__main__ import main; rc = main(sys.argv[1:]); "
        "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "selftest", "--say", "--sentences", "2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def check_report(out: Path, stt: str | None, engine: str) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    assert report["tiny_model"] is True and report["stt"] == stt and report["engine"] == engine
    assert "ahead of real time" in report["rtf_measures"]
    for policy in ("constrained", "fixed"):
        entry = report["policies"][policy]
        assert (entry["wer"] is not None) == (stt is not None) and entry["rtf"] > 0 and entry["step_ms"] > 0
        assert [s["forced"] for s in entry["sentences"]] == list(SENTENCES)
        for index, s in enumerate(entry["sentences"]):
            assert s["end"] == "done" and (s["transcript"] is not None) == (stt is not None)
            assert s["dropped"] in (",.", ".")
            # The clip runs from say_start to the tail after say_end: a step per word at least, then the tail.
            words = len(SENTENCES[index].split())
            assert s["seconds"] >= words * 0.08 + TAIL_S
            wav = out / f"{policy}-{index}.wav"
            assert wav.stat().st_size == 44 + 2 * round(s["seconds"] * 24000 / 1920) * 1920
    return report


def test_through_the_engine_with_its_own_asr(engines: dict[str, EngineProcess], tmp_path: Path) -> None:
    engine = engines["both"]
    done = selftest("--url", engine.http, "--key", "public_token", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "mean nothing" in done.stdout and "no torch" in done.stdout  # no model loaded here
    assert "say constrained: WER" in done.stdout and "say fixed: WER" in done.stdout
    assert "real-time factor: wall time of the session's steps" in done.stdout
    check_report(tmp_path / "out", engine.http, engine.http)
    # Two real sessions of the engine's chat module, one per policy, and the slots are free again.
    metrics = _metrics(engine)
    assert 'voice_engine_sessions_total{module="chat",outcome="served"} 2' in metrics
    deadline = time.monotonic() + 10
    while engine.status()["modules"]["chat"]["slots_used"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.status()["modules"]["chat"]["slots_used"] == 0


def test_from_the_configuration_with_a_voice_and_another_stt(
    engines: dict[str, EngineProcess], tmp_path: Path
) -> None:
    engine, stt = engines["both"], engines["asr"]
    done = selftest(
        "--config",
        str(engine.config_path),
        "--running",
        "--voice",
        "TINYM0.wav",
        "--text-prompt",
        "you are a tiny model",
        "--asr-url",
        stt.http,
        "--out",
        str(tmp_path / "out"),
    )
    assert done.returncode == 0, done.stderr
    assert "no torch" in done.stdout
    check_report(tmp_path / "out", stt.http, engine.http)
    assert 'voice_engine_sessions_total{module="asr",outcome="served"} 4' in _metrics(stt)


def test_a_moshi_model_with_one_slot_and_no_stt(engines: dict[str, EngineProcess], tmp_path: Path) -> None:
    """No prefill (the first frame gives no audio), the two sessions back to back on one slot."""
    engine = engines["moshi"]
    done = selftest("--url", engine.http, "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "say constrained: WER not measured (no STT)" in done.stdout
    check_report(tmp_path / "out", None, engine.http)


def test_a_full_engine_is_a_failure_not_a_usage_error(
    engines: dict[str, EngineProcess], tmp_path: Path
) -> None:
    engine = engines["moshi"]

    async def while_the_slot_is_taken() -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.ws_connect(url(engine.ws)) as ws:
            assert (await ws.receive(timeout=30)).data == b"\x00"
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "voice_engine",
                "selftest",
                "--say",
                "--url",
                engine.http,
                "--timeout",
                "1",
                "--out",
                str(tmp_path / "out"),
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            return int(proc.returncode or 0), err.decode()

    rc, err = asyncio.run(while_the_slot_is_taken())
    assert rc == 1 and err.strip().splitlines() == [
        f"voice-engine selftest: {engine.http}/api/chat refused the session (HTTP 503): "
        "no free slots: every conversation slot is taken"
    ]


@pytest.mark.parametrize(
    "case", ["unreachable", "no chat module", "bad key", "bad voice", "voice in process"]
)
def test_clear_errors(engines: dict[str, EngineProcess], tmp_path: Path, case: str) -> None:
    both = engines["both"]
    args, expected = {
        "unreachable": (
            ["--url", f"http://127.0.0.1:{free_port()}"],
            "cannot reach the engine at http://127.0.0.1:",
        ),
        "no chat module": (["--url", engines["asr"].http], "has no chat module (its modules: asr (asr))"),
        "bad key": (["--url", both.http, "--key", "wrong"], "refused the session (HTTP 401): unauthorized"),
        "bad voice": (
            ["--url", both.http, "--voice", "NOPE.pt"],
            "refused the session (HTTP 400): voice_prompt",
        ),
        "voice in process": (["--config", str(both.config_path), "--voice", "x"], "need a running engine"),
    }[case]
    done = selftest(*args, "--out", str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voice-engine selftest: ") and expected in lines[0], lines
    assert not (tmp_path / "out" / "report.json").exists()


def _metrics(engine: EngineProcess) -> str:
    with urllib.request.urlopen(engine.http + "/metrics", timeout=5) as r:
        return r.read().decode()
