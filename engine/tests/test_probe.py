"""``python -m voice_engine.probe`` (the role's health gate and Molecule client) against a real engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from asr_helpers import stt_model_dir
from chat_helpers import chat_module, tiny_chat_dir
from tts_helpers import tiny_tts_dir, tts_module


def run_probe(*args: str) -> tuple[int, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "voice_engine.probe", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, json.loads(result.stdout) if result.stdout else {"stderr": result.stderr}


def test_probe_runs_a_real_stt_and_tts_session_and_refuses_a_wrong_key(engine_process, models_root: Path):
    modules = {
        "asr": {"kind": "asr", "model_dir": str(stt_model_dir(models_root)), "slots": 1, "precision": "fp32"},
        **tts_module(tiny_tts_dir(models_root), slots=1),
    }
    engine = engine_process(modules)

    rc, report = run_probe("--config", str(engine.config_path), "--seconds", "0.8")
    assert rc == 0, report
    assert report["healthz"] == 200
    assert report["asr"]["ready"]
    assert report["asr"]["marker"]
    assert report["asr"]["frames_sent"] == 10
    assert report["asr"]["steps"] >= 10
    assert report["tts"]["samples"] > 0
    assert report["tts"]["closed"]

    rc, report = run_probe("--url", engine.http, "--key", "wrong", "--asr", "--tts")
    assert rc == 1
    assert "401" in report["asr"]["error"]
    assert "401" in report["tts"]["error"]


def test_probe_says_what_is_wrong_without_a_traceback(tmp_path: Path):
    rc, report = run_probe("--url", "http://127.0.0.1:9", "--asr")
    assert rc == 1
    assert report["ok"] is False
    assert "GET /healthz" in report["error"]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = subprocess.run(
        [sys.executable, "-m", "voice_engine.probe", "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_probe_runs_a_real_personaplex_chat_session_with_prompts(engine_process, models_root: Path):
    """The health gate of a chat host: the prefill with a voice and text prompt, handshake, audio back."""
    engine = engine_process(
        chat_module(tiny_chat_dir(models_root, "personaplex"), 1, default_voice="TINYF0.pt")
    )
    rc, report = run_probe("--config", str(engine.config_path), "--seconds", "0.8")
    assert rc == 0, report
    assert report["chat"]["handshake"]
    assert report["chat"]["frames_sent"] == 10
    assert report["chat"]["audio_messages"] >= 5

    args = ("--url", engine.http, "--chat", "--chat-voice", "TINYM0.wav", "--chat-text", "You are kind.")
    rc, report = run_probe(*args)
    assert rc == 0, report
    rc, report = run_probe("--url", engine.http, "--chat", "--chat-voice", "../etc/passwd")
    assert rc == 1
    assert "400" in report["chat"]["error"]
