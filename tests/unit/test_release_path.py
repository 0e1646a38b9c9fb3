"""The release path stays short (issue 16): a bridge redeploy passes through at most 6 task files, includes
nest at most 3 deep, and no sequence of tasks is written twice in the service roles.

The includes are followed statically from playbooks/redeploy.yml, with service_release_action=redeploy:
an include whose ``when`` names another action is not followed (it is skipped at run time).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = ["service_release", "moshi_server", "personaplex_bridge", "voice_engine"]
SERVICE_ROLES = {"bridge": "personaplex_bridge", "moshi": "moshi_server", "engine": "voice_engine"}
INCLUDES = ("ansible.builtin.import_tasks", "ansible.builtin.include_tasks")
ROLE_INCLUDES = ("ansible.builtin.import_role", "ansible.builtin.include_role")


def render(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)[^}]*\}\}", lambda m: values.get(m.group(1), m.group(0)), text)


def skipped(task: dict[str, Any], action: str) -> bool:
    when = str(task.get("when", ""))
    other = re.search(r"service_release_action[^=!]*== '(\w+)'", when)
    return bool(other and other.group(1) != action and " or " not in when) or f"!= '{action}'" in when


def follow(path: Path, values: dict[str, str], depth: int, seen: list[tuple[str, int]]) -> None:
    seen.append((str(path.relative_to(ROOT)), depth))
    tasks = yaml.safe_load(path.read_text()) or []
    walk(tasks, path.parent, values, depth, seen)


def walk(tasks: list[dict[str, Any]], base: Path, values: dict[str, str], depth: int, seen: list) -> None:
    for task in tasks:
        if skipped(task, values["service_release_action"]):
            continue
        for key in ("block", "rescue", "always"):
            walk(task.get(key, []), base, values, depth, seen)
        for key in INCLUDES:
            if key in task:
                spec = task[key]
                file = spec["file"] if isinstance(spec, dict) else spec
                follow(base / render(file, values), values, depth + 1, seen)
        for key in ROLE_INCLUDES:
            if key in task:
                name = render(task[key]["name"], values)
                tasks_from = render(task[key].get("tasks_from", "main.yml"), values)
                follow(ROOT / "roles" / name / "tasks" / tasks_from, values, depth + 1, seen)


def redeploy_path(tag: str) -> list[tuple[str, int]]:
    values = {"service_release_action": "redeploy", "service_release_role": SERVICE_ROLES[tag]}
    seen: list[tuple[str, int]] = []
    for play in yaml.safe_load((ROOT / "playbooks" / "redeploy.yml").read_text()):
        if tag in play.get("tags", []):
            walk(play.get("pre_tasks", []), ROOT / "playbooks", values, 0, seen)
            for role in play.get("roles", []):
                name = role["role"] if isinstance(role, dict) else role
                follow(ROOT / "roles" / name / "tasks" / "main.yml", values, 1, seen)
    return seen


def test_a_bridge_redeploy_passes_through_at_most_six_task_files_three_deep():
    path = redeploy_path("bridge")
    files = {name for name, _ in path}
    assert len(files) <= 6, sorted(files)
    assert max(depth for _, depth in path) <= 3, path
    assert "roles/personaplex_bridge/tasks/build.yml" in files  # the service's own part, by convention


@pytest.mark.parametrize("tag", ["moshi", "engine"])
def test_every_service_redeploys_the_same_way(tag: str):
    def shared(path: list[tuple[str, int]]) -> list[str]:
        return [name for name, _ in path if name.startswith("roles/service_release/")]

    path = redeploy_path(tag)
    assert shared(path) == shared(redeploy_path("bridge"))
    assert max(depth for _, depth in path) <= 3, path


def normalise(task: dict[str, Any]) -> str:
    body = {key: value for key, value in task.items() if key != "name"}
    text = json.dumps(body, sort_keys=True)
    return re.sub(r"_{1,2}(moshi_server|personaplex_bridge|voice_engine)_", "_ROLE_", text)


def test_no_task_sequence_is_written_twice():
    places: dict[tuple[str, ...], list[str]] = defaultdict(list)

    def sequences(tasks: list[dict[str, Any]], where: str) -> None:
        flat = [normalise(task) for task in tasks]
        for size in range(2, len(flat) + 1):
            for start in range(len(flat) - size + 1):
                places[tuple(flat[start : start + size])].append(f"{where}[{start}]")
        for task in tasks:
            for key in ("block", "rescue"):
                sequences(task.get(key, []), f"{where}/{key}")

    for role in ROLES:
        for path in sorted((ROOT / "roles" / role / "tasks").glob("*.yml")):
            sequences(yaml.safe_load(path.read_text()) or [], str(path.relative_to(ROOT)))
    twice = {places_: where for places_, where in places.items() if len(where) > 1}
    assert not twice, list(twice.values())
