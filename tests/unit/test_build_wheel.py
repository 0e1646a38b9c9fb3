"""The wheel build on the controller (roles/service_release/files/build_wheel.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "roles" / "service_release" / "files" / "build_wheel.py"
BRIDGE = Path(__file__).resolve().parents[2] / "bridge"


def build(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(source), str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    copy = tmp_path / "bridge"
    shutil.copytree(BRIDGE, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return copy


def test_same_source_is_built_once_and_a_change_is_built_again(source, tmp_path):
    out = tmp_path / "wheels"
    first = build(source, out)
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert one["built"] is True
    assert Path(one["wheel"]).name.startswith("personaplex_bridge-")
    assert any(r.startswith("aiohttp") for r in one["requires"])
    again = json.loads(build(source, out).stdout)
    assert again == {**one, "built": False}  # the build output left in the source is not "a change"
    (source / "src" / "personaplex_bridge" / "__init__.py").open("a").write("# changed\n")
    changed = json.loads(build(source, out).stdout)
    assert changed["built"] is True
    assert changed["sha256"] != one["sha256"]
    assert changed["requires"] == one["requires"]


def test_same_source_gives_the_same_bytes_in_another_build_dir(source, tmp_path):
    one = json.loads(build(source, tmp_path / "a").stdout)
    two = json.loads(build(source, tmp_path / "b").stdout)
    assert one["sha256"] == two["sha256"]


def test_a_broken_source_fails_with_pips_message(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text("[project\n")
    result = build(broken, tmp_path / "wheels")
    assert result.returncode == 1
    assert result.stderr.startswith("wheel build failed: pip wheel")
    assert "Traceback (most recent call last)" not in result.stderr.splitlines()[0]
    assert not list((tmp_path / "wheels").glob("*/*.whl"))
