"""Run one of the roles' Ansible modules (roles/*/library) on this machine, through ansible itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_module(role: str, name: str, args: dict[str, Any], check: bool = True) -> dict[str, Any]:
    """``ansible localhost -m NAME -a ARGS`` with the role's library and module_utils; its JSON result."""
    role_dir = ROOT / "roles" / role
    command = ["ansible", "localhost", "-c", "local", "-m", name, "-a", json.dumps(args)]
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=os.environ
        | {
            "ANSIBLE_LIBRARY": str(role_dir / "library"),
            "ANSIBLE_MODULE_UTILS": str(role_dir / "module_utils"),
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_NOCOLOR": "1",
        },
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout.split("=>", 1)[1])
    result["failed"] = done.returncode != 0  # ansible prints FAILED! in front instead
    return result
