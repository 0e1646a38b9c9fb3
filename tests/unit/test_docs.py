"""The docs say what the code does.

- Generated parts are in sync: the hardware table (from plugins/filter/moshi_profile.py) and the role
  variable tables (from each role's meta/argument_specs.yml, the one home of a variable's docs).
- Every documented command works as written: each `ansible-playbook ...` line of README.md and
  docs/*.md names its inventory, asks for the vault password where the vault is loaded, and passes
  --syntax-check and --list-hosts against that inventory; each `make X` in the README exists; each
  `voice-engine ...` and `python -m ...` command of ours answers --help.
- Every relative link points at a file; the README stays a landing page.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INVENTORY_ROLES = ["moshi_server", "personaplex_bridge", "nvidia_runtime", "voice_engine"]
# Placeholders in documented commands, and what the test puts in their place.
PLACEHOLDERS = {"INVENTORY": "inventory/production", "HOST": "gpu01"}
OUR_MODULES = ("moshi_tools", "voice_engine", "personaplex_bridge")


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# --- generated parts ---------------------------------------------------------------------------


def test_hardware_table_matches_the_decision_plugin() -> None:
    hardware_table = load_script("hardware_table")
    text = (ROOT / "docs/hardware.md").read_text(encoding="utf-8")
    assert hardware_table.embed(text) == text, (
        "run: python scripts/hardware_table.py --write docs/hardware.md"
    )
    assert "| GTX 1080 Ti (gpu01) | 6.1 | 11 GiB | cpu |" in text
    # The project's own bench figures (docs/benchmarks.md), not older ones.
    assert "~950 ms (16 CPU threads): 11.88x" in text and "20.3 ms on an H200" in text
    assert "820 ms" not in text and "| 17 ms" not in text
    # The user's RTX 5090 as the write-up gives it, and the desktop card, each saying which it is.
    assert "| RTX 5090, the user's WSL2 PC (24 GB, see the note) | 12.0 | 24 GiB | gpu | bf16 |" in text
    assert "| RTX 5090 desktop card (32 GB) | 12.0 | 32 GiB | gpu | bf16 |" in text


def test_the_hardware_table_has_one_home() -> None:
    for doc in DOCS:
        if doc.name != "hardware.md":
            assert "hardware-table:start" not in doc.read_text(encoding="utf-8"), doc


def role_options(role: str) -> dict[str, dict[str, object]]:
    specs = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    return specs["argument_specs"]["main"]["options"]


def test_role_variable_tables_match_the_argument_specs() -> None:
    role_docs = load_script("role_docs")
    text = (ROOT / "docs/roles.md").read_text(encoding="utf-8")
    assert role_docs.embed(text) == text, "run: python scripts/role_docs.py --write"
    assert sorted(role_docs.roles_in(text)) == sorted(INVENTORY_ROLES)


def test_role_docs_render_name_type_default_description(tmp_path: Path) -> None:
    role_docs = load_script("role_docs")
    specs = tmp_path / "roles" / "demo_role" / "meta"
    specs.mkdir(parents=True)
    (specs / "argument_specs.yml").write_text(
        "argument_specs:\n  main:\n    options:\n"
        "      demo_role_a: {type: str, default: '', description: [Empty means off., 'Pipes | escaped.']}\n"
        "      demo_role_b: {type: list, elements: str, required: true, description: Needed.}\n"
        "      demo_role_c: {type: str, choices: [x, y], default: x, no_log: true, description: A secret.}\n"
        "  extra:\n    options:\n      demo_role_a: {type: str, description: Again.}\n"
    )
    doc = "head\n<!-- role-vars:demo_role:start -->\nstale\n<!-- role-vars:demo_role:end -->\ntail\n"
    rendered = role_docs.embed(doc, tmp_path)
    assert '| `demo_role_a` | str | `""` | Empty means off. Pipes \\| escaped. |' in rendered
    assert "| `demo_role_b` | list of str | (required) | Needed. |" in rendered
    assert "| `demo_role_c` | str: `x`, `y` | `x` | A secret. Secret: never logged. |" in rendered
    assert "Entry point `extra` (`tasks_from: extra.yml`) takes: `demo_role_a`." in rendered
    assert rendered.startswith("head\n") and rendered.endswith("tail\n") and "stale" not in rendered
    assert role_docs.embed(rendered, tmp_path) == rendered


@pytest.mark.parametrize("role", INVENTORY_ROLES)
def test_every_role_variable_is_prefixed_specified_and_documented(role: str) -> None:
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text())
    options = role_options(role)
    roles_md = (ROOT / "docs/roles.md").read_text(encoding="utf-8")
    assert set(defaults) <= set(options), set(defaults) - set(options)
    for name, spec in options.items():
        assert name.startswith(f"{role}_"), name
        assert spec.get("description"), name
        assert f"| `{name}` |" in roles_md, f"{name} is missing from docs/roles.md"


def test_role_variables_are_documented_once() -> None:
    """The tables live in docs/roles.md only: no other page lists a variable as a table row."""
    names = {name for role in INVENTORY_ROLES for name in role_options(role)}
    for doc in DOCS:
        if doc.name == "roles.md":
            continue
        rows = re.findall(r"^\| `([a-z_]+)` \|", doc.read_text(encoding="utf-8"), re.M)
        assert not names & set(rows), f"{doc.name} repeats variable rows: {sorted(names & set(rows))}"


# --- documented commands -----------------------------------------------------------------------


def code_lines(doc: Path) -> list[str]:
    """Lines inside fenced code blocks and the contents of inline code spans."""
    found, fenced = [], False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            found.append(line.strip())
        else:
            found.extend(span.strip() for span in re.findall(r"`([^`]+)`", line))
    return found


def commands(prefix: str) -> list[tuple[str, str]]:
    """(doc, command) for every code line of README.md and docs/*.md that starts with prefix."""
    found = []
    for doc in DOCS:
        for line in code_lines(doc):
            if line.startswith(prefix):
                command = re.split(r"\s+#\s", line)[0].replace("\\|", "|").strip()
                found.append((doc.relative_to(ROOT).as_posix(), command))
    return found


def concrete(command: str) -> list[str]:
    """The command as a test runs it: optional [...] parts kept, the first of a|b|c, placeholders set."""
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)
    command = re.sub(r"(\S+?)\|\S+", r"\1", command)
    argv = shlex.split(command)
    return [PLACEHOLDERS.get(arg, arg) for arg in argv]


PLAYBOOK_COMMANDS = sorted(set(commands("ansible-playbook ")))


def test_the_docs_have_playbook_commands() -> None:
    docs = {doc for doc, _ in PLAYBOOK_COMMANDS}
    assert {"docs/production.md", "docs/oncall.md", "docs/diagnose.md", "docs/wsl2.md"} <= docs
    assert len(PLAYBOOK_COMMANDS) >= 8


@cache
def syntax_check(playbook: str, inventory: str) -> tuple[int, str]:
    result = run(["ansible-playbook", playbook, "-i", inventory, "--syntax-check"])
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(("doc", "command"), PLAYBOOK_COMMANDS, ids=[c for _, c in PLAYBOOK_COMMANDS])
def test_documented_playbook_command_is_complete_and_parses(doc: str, command: str, tmp_path: Path) -> None:
    argv = concrete(command)
    assert "-i" in argv or "--inventory" in argv, f"{doc}: `{command}` does not name its inventory (-i)"
    inventory = argv[argv.index("-i" if "-i" in argv else "--inventory") + 1]
    assert (ROOT / inventory).exists(), f"{doc}: `{command}`: no inventory {inventory}"
    if "production" in inventory:
        # group_vars/all/vault.yml is loaded for every host of the production inventory.
        assert "--ask-vault-pass" in argv or "--vault-password-file" in argv, (
            f"{doc}: `{command}` targets the production inventory without --ask-vault-pass"
        )
    playbook = next(arg for arg in argv[1:] if arg.endswith(".yml"))
    code, output = syntax_check(playbook, inventory)
    assert code == 0, f"{doc}: `{command}`: --syntax-check failed:\n{output}"
    # No prompt can be answered here: a dummy vault password file instead of --ask-vault-pass, and
    # -K dropped (--list-hosts never connects). --list-hosts checks the options, the inventory and
    # that --limit matches a host.
    runnable = []
    for arg in argv:
        if arg == "--ask-vault-pass":
            dummy = tmp_path / "vault-password"
            dummy.write_text("not-the-vault-password\n")
            runnable += ["--vault-password-file", str(dummy)]
        elif arg not in ("-K", "--ask-become-pass"):
            runnable.append(arg)
    result = run([*runnable, "--list-hosts"])
    assert result.returncode == 0, f"{doc}: `{command}` fails:\n{result.stdout}{result.stderr}"


def test_production_commands_that_become_root_ask_for_the_sudo_password() -> None:
    text = (ROOT / "docs/production.md").read_text(encoding="utf-8")
    assert "-K" in text and "passwordless sudo" in text  # when -K can be left out
    for doc, command in PLAYBOOK_COMMANDS:
        if "inventory/production" in command and "diagnose.yml" not in command:
            assert " -K" in command, f"{doc}: `{command}` becomes root: add -K (docs/production.md says when)"


def make_targets(docs: list[Path]) -> list[str]:
    """Every target of a `make X` that the docs show (inline or in a code block)."""
    return sorted(
        {
            line.split()[1]
            for doc in docs
            for line in code_lines(doc)
            if re.match(r"make [a-z][a-z-]*( |$)", line)
        }
    )


README_MAKE_TARGETS = make_targets([ROOT / "README.md"])
MAKE_TARGETS = make_targets(DOCS)


def test_the_readme_opens_with_the_two_commands() -> None:
    lines = [line for line in code_lines(ROOT / "README.md")[:3]]
    assert lines[0].startswith("apt-get install -y make")
    assert lines[1].startswith("make demo") and lines[2].startswith("make test")
    assert {"demo", "test", "controller"} <= set(README_MAKE_TARGETS)


@pytest.mark.parametrize("target", MAKE_TARGETS)
def test_make_target_named_in_the_docs_exists(target: str) -> None:
    result = run(["make", "-n", target])
    assert result.returncode == 0, f"make -n {target}:\n{result.stdout}{result.stderr}"
    assert "No rule to make target" not in result.stderr


def help_commands() -> list[tuple[str, tuple[str, ...]]]:
    """(the docs naming it, argv) for each distinct command of ours that the docs show."""
    found: dict[tuple[str, ...], set[str]] = {}
    for doc, command in commands("voice-engine "):
        words = command.split()
        if len(words) > 1 and re.fullmatch(r"[a-z][a-z-]*", words[1]):
            found.setdefault((str(VENV_BIN / "voice-engine"), words[1]), set()).add(doc)
    for prefix in ("python -m ", "python3 -m ", ".venv/bin/python -m "):
        for doc, command in commands(prefix):
            words = command.split()
            module = words[2]
            if module.split(".")[0] not in OUR_MODULES:
                continue  # python -m venv, pip: not ours
            sub = words[3:4] if len(words) > 3 and re.fullmatch(r"[a-z][a-z-]*", words[3]) else []
            found.setdefault((sys.executable, "-m", module, *sub), set()).add(doc)
    return sorted((", ".join(sorted(docs)), argv) for argv, docs in found.items())


HELP_COMMANDS = help_commands()


def test_the_docs_have_help_commands() -> None:
    modules = {argv[-1] if "voice-engine" in argv[0] else argv[2] for _, argv in HELP_COMMANDS}
    assert {"serve", "tiny-model", "bench", "moshi_tools.bench", "voice_engine.probe"} <= modules


@pytest.mark.parametrize(
    ("doc", "argv"),
    HELP_COMMANDS,
    ids=[" ".join(Path(a[0]).name.split() + list(a[1:])) for _, a in HELP_COMMANDS],
)
def test_documented_command_answers_help(doc: str, argv: tuple[str, ...]) -> None:
    result = run([*argv, "--help"])
    assert result.returncode == 0, f"{doc}: {' '.join(argv)} --help:\n{result.stdout}{result.stderr}"
    assert "usage:" in result.stdout


# --- links and shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_relative_links_point_at_files(doc: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"


def test_the_readme_is_a_landing_page() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for page in (
        "architecture",
        "hardware",
        "voice-engine",
        "bridge-protocol",
        "oncall",
        "diagnose",
        "benchmarks",
        "controller",
        "wsl2",
        "roles",
        "production",
        "testing",
    ):
        assert f"(docs/{page}.md)" in text, f"README.md does not link docs/{page}.md"
    for port, service in (("8998", "moshi-server"), ("8080", "voice-engine"), ("8999", "personaplex-bridge")):
        assert re.search(rf"`{service}` \| {port}", text), (service, port)


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if d.name not in ("bridge-protocol.md", "benchmarks.md")], ids=lambda d: d.name
)
def test_reference_docs_cite_nothing_outside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for needle in ("../shared", "field notes", "field-notes"):
        assert needle not in text.lower(), (
            f"{doc.name} cites {needle!r}: the commit log or docs/CHANGELOG.md holds history"
        )
