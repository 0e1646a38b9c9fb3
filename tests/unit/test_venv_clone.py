"""A seeded release venv (roles/service_release/library/venv_clone.py, run by ansible) on real venvs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from role_module import run_module


def clone(seed: Path, dest: Path, check: bool = True) -> dict:
    return run_module("service_release", "venv_clone", {"seed": str(seed), "dest": str(dest)}, check=check)


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with a package, a console script and bytecode, like a release's."""
    venv = tmp_path_factory.mktemp("releases") / "A" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "hello").mkdir()
    (site / "hello" / "__init__.py").write_text("def where():\n    return __file__\n")
    script = venv / "bin" / "hello"
    script.write_text(f"#!{venv}/bin/python\nimport hello\nprint(hello.where())\n")
    script.chmod(0o755)
    subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", str(site)], check=True)
    # Like torch/testing/_internal/py312_intrinsics.py: source for a newer Python, never compiled.
    (site / "hello" / "future_syntax.py").write_text(
        "def f[T](a):\n    return a\n" if sys.version_info < (3, 12) else "x = (\n"
    )
    return venv


def test_clone_runs_from_its_own_path_with_fresh_bytecode(seed, tmp_path):
    dest = tmp_path / "B" / "venv"
    result = clone(seed, dest)
    assert result["changed"] is True
    assert result["msg"].startswith(f"cloned {seed} to {dest}")
    assert "1 file(s) do not compile on this Python, as with pip" in result["msg"]
    # The console script and the module both resolve inside the clone, not the seed.
    out = subprocess.run([str(dest / "bin" / "hello")], capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith(str(dest))
    assert str(seed) not in (dest / "bin" / "activate").read_text()
    assert str(seed) not in (dest / "pyvenv.cfg").read_text()
    # Bytecode was compiled for the clone: it names the clone's sources.
    (pyc,) = dest.glob("lib/python3*/site-packages/hello/__pycache__/*.pyc")
    assert str(dest).encode() in pyc.read_bytes()
    assert str(seed).encode() not in pyc.read_bytes()
    # The seed is untouched.
    assert (seed / "bin" / "hello").read_text().startswith(f"#!{seed}/bin/python")


def test_refusals_are_one_line_and_leave_nothing_behind(seed, tmp_path):
    missing = clone(tmp_path / "missing", tmp_path / "dest", check=False)
    assert missing["failed"] and "is not a venv" in missing["msg"]
    assert not (tmp_path / "dest").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    refused = clone(seed, taken, check=False)
    assert refused["failed"] and "already exists" in refused["msg"]
    assert list(taken.iterdir()) == []


def test_a_venv_already_in_place_is_left_alone(seed, tmp_path):
    dest = tmp_path / "B" / "venv"
    assert clone(seed, dest)["changed"] is True
    again = clone(seed, dest)
    assert (again["changed"], again["msg"]) == (False, f"{dest} is a venv already")
