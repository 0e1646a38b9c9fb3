"""Build a service's wheel on the controller, once per distinct source; print what was built as JSON.

    python build_wheel.py SOURCE_DIR BUILD_DIR

The source tree is hashed (every file but build output and caches); the wheel lives in
BUILD_DIR/<source sha256>/, so the same source is built once and its bytes are reused: a playbook run
that finds it does no build at all. SOURCE_DATE_EPOCH pins the wheel's timestamps, so a rebuild of the
same source gives the same bytes. Output, one JSON object:

    {"wheel": PATH, "sha256": HEX, "requires": [Requires-Dist lines], "built": true|false}

``requires`` lets the role reuse a venv whose dependencies did not change. Run by
roles/service_release (tasks/wheel.yml) for every service shipped as a wheel (the bridge, the
engine). Exits 1 with pip's message when the build fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

IGNORED_DIRS = {"build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01, the oldest time a zip entry can hold


def source_files(source: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d not in IGNORED_DIRS and not d.endswith(".egg-info"))
        files.extend(Path(root) / n for n in sorted(names) if not n.endswith(".pyc"))
    return files


def source_hash(source: Path) -> str:
    digest = hashlib.sha256()
    for path in source_files(source):
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    return sorted(
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")
    )


def build(source: Path, build_dir: Path) -> dict[str, object]:
    target = build_dir / source_hash(source)
    wheels = sorted(target.glob("*.whl"))
    built = not wheels
    if built:
        partial = build_dir / f".{target.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        env = {**os.environ, "SOURCE_DATE_EPOCH": REPRODUCIBLE_EPOCH}
        result = subprocess.run(
            [*command, "--wheel-dir", str(partial), str(source)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"pip wheel {source} failed:\n{result.stdout}{result.stderr}")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        wheels = sorted(target.glob("*.whl"))
    (wheel,) = wheels
    return {
        "wheel": str(wheel),
        "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "requires": wheel_requires(wheel),
        "built": built,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: build_wheel.py SOURCE_DIR BUILD_DIR", file=sys.stderr)
        return 2
    source, build_dir = Path(argv[0]).resolve(), Path(argv[1])
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        print(json.dumps(build(source, build_dir)))
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"wheel build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
