"""The q8 loader fix on copies of moshi's real loader source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tools_env
from moshi_tools import q8_patch


@pytest.fixture
def loader(unpatched_moshi: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "loaders.py"
    copy.write_text(
        (unpatched_moshi / "moshi/models/loaders.py").read_text(encoding="utf-8"), encoding="utf-8"
    )
    return copy


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moshi_tools.q8_patch", *args],
        capture_output=True,
        text=True,
        check=False,
        env=tools_env(),
    )


def test_released_loader_needs_the_patch(loader: Path):
    assert q8_patch.state_of(loader.read_text(encoding="utf-8")) is q8_patch.State.NEEDS_PATCH
    assert cli("--check", "--path", str(loader)).returncode == 1


def test_apply_patches_once_and_is_idempotent(loader: Path):
    first = cli("--apply", "--path", str(loader))
    assert (first.returncode, first.stdout.strip()) == (0, "patched")
    patched = loader.read_text(encoding="utf-8")
    assert "or key.endswith('_scb')" in patched
    second = cli("--apply", "--path", str(loader))
    assert (second.returncode, second.stdout.strip()) == (0, "already patched by moshi_tools")
    assert loader.read_text(encoding="utf-8") == patched
    assert cli("--check", "--path", str(loader)).returncode == 0


def test_patch_changes_only_the_cast_line(loader: Path):
    before = loader.read_text(encoding="utf-8").splitlines()
    q8_patch.apply(loader)
    after = loader.read_text(encoding="utf-8").splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1
    assert changed[0][0].strip() == q8_patch.UNPATCHED


def test_loader_fixed_upstream_is_left_alone(loader: Path):
    fixed = loader.read_text(encoding="utf-8").replace(
        q8_patch.UNPATCHED, "if key.startswith(('condition_provider.', 'fuser.')) or key.endswith('_scb'):"
    )
    loader.write_text(fixed, encoding="utf-8")
    result = cli("--apply", "--path", str(loader))
    assert (result.returncode, result.stdout.strip()) == (0, "already fixed upstream")
    assert loader.read_text(encoding="utf-8") == fixed


def test_loader_of_unknown_shape_fails_loudly_in_one_line(loader: Path):
    loader.write_text("def get_moshi_lm():\n    pass\n", encoding="utf-8")
    result = cli("--check", "--path", str(loader))
    assert result.returncode == 2
    assert result.stderr.startswith("moshi-q8-patch: moshi/models/loaders.py has changed shape")
    assert "Traceback" not in result.stderr
    assert loader.read_text(encoding="utf-8") == "def get_moshi_lm():\n    pass\n"


def test_missing_file_is_a_clear_error(tmp_path: Path):
    result = cli("--apply", "--path", str(tmp_path / "nope.py"))
    assert result.returncode == 2
    assert "No such file" in result.stderr and "Traceback" not in result.stderr
