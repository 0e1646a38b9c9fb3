"""Render each role's variables from its ``meta/argument_specs.yml`` (the one home) into the docs.

A docs file holds one generated block per role, between ``<!-- role-vars:ROLE:start -->`` and
``<!-- role-vars:ROLE:end -->``: a table of name, type, default and description for the role's
``main`` entry point, then one line per other entry point naming the options it takes. A unit test
(tests/unit/test_docs.py) fails when a block differs from what this script renders.
Usage: python scripts/role_docs.py [--write docs/roles.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "roles.md"
MARKER = re.compile(r"<!-- role-vars:(?P<role>[a-z_]+):start -->\n.*?<!-- role-vars:(?P=role):end -->", re.S)


def load_specs(role: str, root: Path = ROOT) -> dict[str, Any]:
    path = root / "roles" / role / "meta" / "argument_specs.yml"
    if not path.is_file():
        raise SystemExit(f"role_docs: {path} does not exist (a marker names role {role!r})")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    specs = data.get("argument_specs") if isinstance(data, dict) else None
    if not isinstance(specs, dict) or "main" not in specs:
        raise SystemExit(f"role_docs: {path} has no argument_specs.main")
    return specs


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def type_of(spec: dict[str, Any]) -> str:
    kind = str(spec.get("type", "str"))
    if "elements" in spec:
        kind = f"{kind} of {spec['elements']}"
    if "choices" in spec:
        kind += ": " + ", ".join(f"`{choice}`" for choice in spec["choices"])
    return kind


def default_of(spec: dict[str, Any]) -> str:
    if spec.get("required"):
        return "(required)"
    if "default" not in spec or spec["default"] is None:
        return "null"
    value = spec["default"]
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return f"`{text}`" if text != "" else '`""`'


def description_of(spec: dict[str, Any]) -> str:
    description = spec.get("description", "")
    text = " ".join(description) if isinstance(description, list) else str(description)
    if spec.get("no_log"):
        text += " Secret: never logged."
    return cell(text)


def render(role: str, root: Path = ROOT) -> str:
    specs = load_specs(role, root)
    main = specs["main"].get("options") or {}
    rows = [
        f"Generated from `roles/{role}/meta/argument_specs.yml` by `python scripts/role_docs.py --write`.",
        "",
        "| variable | type | default | description |",
        "|---|---|---|---|",
    ]
    for name, spec in main.items():
        rows.append(
            f"| `{name}` | {cell(type_of(spec))} | {cell(default_of(spec))} | {description_of(spec)} |"
        )
    for entry, entry_spec in specs.items():
        if entry == "main":
            continue
        names = ", ".join(f"`{name}`" for name in (entry_spec.get("options") or {}))
        rows.append("")
        rows.append(f"Entry point `{entry}` (`tasks_from: {entry}.yml`) takes: {names}.")
    return "\n".join(rows)


def embed(text: str, root: Path = ROOT) -> str:
    def block(match: re.Match[str]) -> str:
        role = match.group("role")
        return f"<!-- role-vars:{role}:start -->\n{render(role, root)}\n<!-- role-vars:{role}:end -->"

    return MARKER.sub(block, text)


def roles_in(text: str) -> list[str]:
    return [match.group("role") for match in MARKER.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--write", nargs="*", type=Path, default=None, help=f"files to update (default {DOC})"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a file is not up to date")
    args = parser.parse_args(argv)
    paths = args.write if args.write else [DOC]
    stale = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        new = embed(text)
        if args.check:
            if new != text:
                stale.append(str(path))
        elif args.write is not None:
            path.write_text(new, encoding="utf-8")
        else:
            print("\n\n".join(render(role) for role in roles_in(text)))
    if stale:
        print(
            f"role_docs: out of date: {', '.join(stale)}; run: python scripts/role_docs.py --write",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
