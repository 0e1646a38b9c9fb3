#!/usr/bin/python
"""Ansible module: make a venv at DEST that holds what the venv at SEED holds, without downloading or
reinstalling.

Used by roles/service_release (tasks/release.yml) when a new release's venv would hold the same packages
as the live release's (same venv key in FINGERPRINT): copying takes seconds where pip takes minutes for torch.

A venv is tied to its path only through text: the shebang lines and activate scripts in ``bin/`` and
the ``command`` line of ``pyvenv.cfg``. Those are rewritten from SEED to DEST; the rest is copied as
is, except the bytecode caches, which name their source path: they are compiled again for DEST, as pip
does on install, so tracebacks point into DEST even after SEED is pruned. Like pip, files this Python
cannot compile are counted, not fatal (torch ships a few written for newer Pythons). DEST's
interpreter must report DEST as its prefix. A DEST that is already a venv is left alone (not changed);
a failure says why in one line and leaves no DEST behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: venv_clone
short_description: Clone a release's venv to a new path (nothing downloaded or reinstalled)
options:
  seed: {type: path, required: true, description: The venv to copy (the live release's).}
  dest: {type: path, required: true, description: The new venv (left alone when it holds a pyvenv.cfg).}
"""


class CloneError(Exception):
    """Why the venv could not be cloned (one line for the operator)."""


def path_texts(venv: Path) -> list[Path]:
    """The files that may name the venv's own path: pyvenv.cfg and the regular files of bin/."""
    candidates = [venv / "pyvenv.cfg", *sorted((venv / "bin").iterdir())]
    return [p for p in candidates if p.is_file() and not p.is_symlink()]


def rewrite_paths(venv: Path, old: str, new: str) -> int:
    """Replace ``old`` by ``new`` in the venv's path-bearing files; how many files changed."""
    changed = 0
    for path in path_texts(venv):
        data = path.read_bytes()
        if old.encode() in data:
            path.write_bytes(data.replace(old.encode(), new.encode()))
            changed += 1
    return changed


def clone(seed: Path, dest: Path) -> str:
    if not (seed / "pyvenv.cfg").is_file():
        raise CloneError(f"{seed} is not a venv (no pyvenv.cfg)")
    if os.path.lexists(dest):
        raise CloneError(f"{dest} already exists; a clone never overwrites")
    try:
        shutil.copytree(seed, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        rewritten = rewrite_paths(dest, str(seed), str(dest))
        python = dest / "bin" / "python"
        prefix = subprocess.run(
            [str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=False
        )
        if prefix.returncode != 0 or prefix.stdout.strip() != str(dest):
            raise CloneError(
                f"{python} does not run as the venv {dest}: {prefix.stdout}{prefix.stderr}".strip()
            )
        compiled = subprocess.run(
            [str(python), "-m", "compileall", "-q", "-j", "0", str(dest / "lib")],
            capture_output=True,
            text=True,
            check=False,
        )
        skipped = compiled.stdout.count("*** Error compiling")
        if compiled.returncode != 0 and not skipped:
            raise CloneError(f"compiling {dest}/lib failed: {compiled.stdout}{compiled.stderr}".strip())
    except (OSError, CloneError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise CloneError(str(exc)) from exc
    note = f"; {skipped} file(s) do not compile on this Python, as with pip" if skipped else ""
    return f"cloned {seed} to {dest} ({rewritten} path-bearing files rewritten, bytecode compiled{note})"


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "seed": {"type": "path", "required": True},
            "dest": {"type": "path", "required": True},
        },
    )
    seed, dest = Path(module.params["seed"]), Path(module.params["dest"])
    if (dest / "pyvenv.cfg").is_file():
        module.exit_json(changed=False, msg=f"{dest} is a venv already")
    try:
        module.exit_json(changed=True, msg=clone(seed, dest))
    except CloneError as exc:
        module.fail_json(msg=f"venv clone failed: {exc}")


if __name__ == "__main__":
    main()
