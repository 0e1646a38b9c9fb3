"""Fixtures shared by the Molecule scenarios' testinfra tests."""

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[3]


@pytest.fixture
def run_site() -> Callable[[dict], subprocess.CompletedProcess]:
    """Run site.yml from the controller against the scenario's hosts with extra variables."""

    def run(extra_vars: dict) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "ansible-playbook",
                str(PROJECT / "site.yml"),
                "-i",
                os.environ["MOLECULE_INVENTORY_FILE"],
                "-e",
                json.dumps(extra_vars),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=os.environ
            | {
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_ROLES_PATH": str(PROJECT / "roles"),
                "ANSIBLE_FILTER_PLUGINS": str(PROJECT / "plugins/filter"),
            },
        )

    return run
