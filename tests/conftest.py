"""Shared fixtures: tiny model sets and a patched copy of the installed moshi package."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from moshi_tools import q8_patch, tiny_model

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools" / "moshi-tools" / "src"


def tools_env(*extra_paths: Path) -> dict[str, str]:
    """Environment for a subprocess that runs moshi_tools (optionally with a moshi copy first)."""
    return os.environ | {"PYTHONPATH": os.pathsep.join(map(str, [*extra_paths, TOOLS_DIR]))}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {variant: tiny_model.write_model_set(root / variant, variant) for variant in ("bf16", "q8")}


def _moshi_copy(root: Path, patched: bool) -> Path:
    import moshi

    shutil.copytree(Path(moshi.__file__).parent, root / "moshi")
    loader = root / "moshi" / "models" / "loaders.py"
    source = loader.read_text(encoding="utf-8").replace(q8_patch.PATCHED, q8_patch.UNPATCHED)
    loader.write_text(q8_patch.patched_source(source) if patched else source, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def unpatched_moshi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory to put first on PYTHONPATH: moshi exactly as released (loader unpatched)."""
    return _moshi_copy(tmp_path_factory.mktemp("moshi-unpatched"), patched=False)


@pytest.fixture(scope="session")
def patched_moshi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, with our q8 loader fix applied."""
    return _moshi_copy(tmp_path_factory.mktemp("moshi-patched"), patched=True)
