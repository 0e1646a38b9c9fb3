"""The docs say what the code does: generated table in sync, every role variable documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc", ["README.md", "docs/hardware.md"])
def test_hardware_table_matches_the_decision_plugin(doc: str):
    hardware_table = load_script("hardware_table")
    text = (ROOT / doc).read_text(encoding="utf-8")
    assert hardware_table.embed(text) == text, f"run: python scripts/hardware_table.py --write {doc}"
    assert "| GTX 1080 Ti (gpu01) | 6.1 | 11 GiB | cpu |" in text


def role_options(role: str) -> dict:
    specs = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    return specs["argument_specs"]["main"]["options"]


@pytest.mark.parametrize("role", ["moshi_server", "personaplex_bridge", "nvidia_runtime"])
def test_every_role_variable_is_prefixed_specified_and_in_the_readme(role: str):
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text())
    options = role_options(role)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert set(defaults) <= set(options), set(defaults) - set(options)
    for name, spec in options.items():
        assert name.startswith(f"{role}_"), name
        assert spec.get("description"), name
        assert f"`{name}`" in readme, f"{name} is missing from README.md"
