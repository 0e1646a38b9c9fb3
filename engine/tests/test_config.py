"""The configuration file: defaults, and one clear line for every mistake (exit 2 from the CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from voice_engine.config import ConfigError, load, parse


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "m"


def test_defaults(model_dir: Path) -> None:
    cfg = parse({"modules": {"asr": {"kind": "asr", "model_dir": str(model_dir)}}})
    assert (cfg.host, cfg.port, cfg.api_keys) == ("127.0.0.1", 8080, ("public_token",))
    (m,) = cfg.modules
    assert (m.name, m.kind, m.slots, m.precision, m.device) == ("asr", "asr", 1, "fp32", "cpu")


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ({"kind": "nope"}, "modules.x.kind: 'nope' is not one of asr, tts, chat"),
        (
            {"kind": "asr", "precision": "int4"},
            "modules.x.precision: 'int4' is not one of bf16, fp16, fp32, q8, nf4",
        ),
        ({"kind": "asr", "device": "cuda:0"}, "modules.x.device: 'cuda:0' is not one of cpu, cuda"),
        ({"kind": "asr", "precision": "fp16"}, "modules.x: fp16 is for GPUs; on the CPU use fp32 (or bf16)"),
        ({"kind": "asr", "slots": 0}, "modules.x.slots: 0 is outside 1..4096"),
        ({"kind": "asr", "slots": True}, "modules.x: 'slots' must be int, not a boolean"),
        ({"kind": "asr", "slots": "4"}, "modules.x: 'slots' must be int, got str"),
        (
            {"kind": "asr", "voices_dir": "/nonexistent"},
            "modules.x.voices_dir: /nonexistent is not a directory",
        ),
    ],
)
def test_bad_module(model_dir: Path, module: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"modules": {"x": {"model_dir": str(model_dir), **module}}})
    assert str(err.value) == message


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model_dir: .*/nope/config.json does not exist"):
        parse({"modules": {"asr": {"kind": "asr", "model_dir": str(tmp_path / "nope")}}})


def test_top_level_mistakes(model_dir: Path) -> None:
    good = {"asr": {"kind": "asr", "model_dir": str(model_dir)}}
    with pytest.raises(ConfigError, match="unknown key"):
        parse({"modules": good, "prot": 1})
    with pytest.raises(ConfigError, match="at least one module"):
        parse({"modules": {}})
    with pytest.raises(ConfigError, match="port: 70000 is outside"):
        parse({"modules": good, "port": 70000})
    with pytest.raises(ConfigError, match="api_keys"):
        parse({"modules": good, "api_keys": [""]})


def test_load_reports_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load(path)
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "absent.json")


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"modules": {"a": {"kind": "nope", "model_dir": "/"}}}))
    done = subprocess.run(
        [sys.executable, "-m", "voice_engine", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "voice-engine: configuration error: modules.a.kind: 'nope' is not one of asr, tts, chat"
    ]
