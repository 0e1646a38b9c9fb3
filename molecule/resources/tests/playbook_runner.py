"""Run a playbook from the controller against a Molecule scenario's hosts, as an operator would."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[3]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_playbook(path: Path, *args: str, extra_vars: dict | None = None) -> subprocess.CompletedProcess:
    """ansible-playbook PATH against the scenario's inventory; stdout holds stderr too, without colour."""
    command = ["ansible-playbook", str(path), "-i", os.environ["MOLECULE_INVENTORY_FILE"], *args]
    if extra_vars:
        command += ["-e", json.dumps(extra_vars)]
    result = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # failures go to stderr under Molecule's environment
        text=True,
        timeout=600,
        check=False,
        env=os.environ
        | {
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_ROLES_PATH": str(PROJECT / "roles"),
            "ANSIBLE_FILTER_PLUGINS": str(PROJECT / "plugins/filter"),
            "ANSIBLE_INJECT_FACT_VARS": "False",
        },
    )
    result.stdout = ANSI.sub("", result.stdout)
    return result
