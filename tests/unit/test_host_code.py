"""One way to ship code that runs on hosts (issue 16): our packages as wheels in the release's venv, and the
roles' Ansible modules (roles/*/library). No filter returns a script, no task runs `python3 -c` with
code from the controller, and nothing copies Python files onto a host one by one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TASK_FILES = sorted([*ROOT.glob("roles/*/tasks/*.yml"), *ROOT.glob("playbooks/*.yml"), ROOT / "site.yml"])


def tasks(node: object) -> list[dict]:
    found: list[dict] = []
    if isinstance(node, list):
        for item in node:
            found.extend(tasks(item))
    elif isinstance(node, dict):
        found.append(node)
        for key in ("block", "rescue", "always", "tasks", "pre_tasks", "post_tasks", "handlers"):
            found.extend(tasks(node.get(key, [])))
    return found


def test_no_filter_plugin_holds_a_script():
    for path in sorted((ROOT / "plugins" / "filter").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.search(r"\bsys\.argv\b|^\s*import \w", node.value, re.MULTILINE), (
                    f"{path.name} holds host code in a string"
                )


def test_no_task_runs_controller_code_with_python_c_or_copies_python_files():
    for path in TASK_FILES:
        for task in tasks(yaml.safe_load(path.read_text(encoding="utf-8"))):
            text = yaml.safe_dump(task)
            command = task.get("ansible.builtin.command") or {}
            argv = command.get("argv", []) if isinstance(command, dict) else []
            if "-c" in argv:
                code = str(argv[argv.index("-c") + 1])
                assert "{{" not in code, f"{path}: {task.get('name')}: python -c with templated code"
            assert not re.search(r"lookup\('(ansible\.builtin\.)?file', [^)]*\.py'\)", text), (
                f"{path}: {task.get('name')}: reads a Python file to run it on the host"
            )
            assert not re.search(r"fileglob.*\.py", text), f"{path}: {task.get('name')}: copies Python files"


def test_moshi_tools_is_a_package_built_into_the_release():
    tools = ROOT / "tools" / "moshi-tools"
    assert (tools / "pyproject.toml").is_file() and (tools / "src" / "moshi_tools" / "launch.py").is_file()
    assert not (ROOT / "roles" / "moshi_server" / "files" / "moshi_tools").exists()
    spec = yaml.safe_load((ROOT / "roles" / "moshi_server" / "vars" / "main.yml").read_text(encoding="utf-8"))
    assert spec["_moshi_server_release_spec"]["wheel_source"] == "{{ _moshi_server_tools_source }}"
    assert spec["_moshi_server_tools_source"].endswith("/tools/moshi-tools")
    assert spec["_moshi_server_release_inputs"]["wheel"] == "{{ service_release_wheel['sha256'] }}"
