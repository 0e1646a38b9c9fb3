"""Fix moshi's q8 loader bug in the installed package, losslessly and idempotently.

``moshi.models.loaders.get_moshi_lm`` casts every floating tensor of a safetensors checkpoint to
the LM dtype, except keys starting with ``condition_provider.`` or ``fuser.``. That includes the
float32 ``*_scb`` per-row scales of a q8 checkpoint, and ``QLinear.forward`` then raises
``Expected `weight_scb` to have type float, but got bfloat16`` (moshi >= 0.2.4, upstream issue
#271). The fix keeps keys ending in ``_scb`` in float32, like the two exempt prefixes.

Usage::

    python -m moshi_tools.q8_patch --check   # exit 0: nothing to do, 1: patch needed, 2: error
    python -m moshi_tools.q8_patch --apply   # prints "patched" or "already fixed"

The check fails loudly (exit 2) when the loader no longer has the shape this patch expects and is
not fixed either: a new moshi release must be looked at by a person, never patched blindly.
"""

from __future__ import annotations

import argparse
import importlib.util
import py_compile
import sys
from enum import Enum
from pathlib import Path

MARKER = "# moshi_tools.q8_patch: keep float32 *_scb scales"
UNPATCHED = "if key.startswith('condition_provider.') or key.startswith('fuser.'):"
PATCHED = (
    f"if key.startswith('condition_provider.') or key.startswith('fuser.') or key.endswith('_scb'):  {MARKER}"
)


class State(Enum):
    PATCHED = "patched by moshi_tools"
    FIXED_UPSTREAM = "fixed upstream"
    NEEDS_PATCH = "needs the patch"


class PatchError(Exception):
    """The loader has a shape this patch does not know."""


def loader_path() -> Path:
    spec = importlib.util.find_spec("moshi.models.loaders")
    if spec is None or spec.origin is None:
        raise PatchError("moshi is not installed in this Python")
    return Path(spec.origin)


def state_of(source: str) -> State:
    """Classify the loader source."""
    if MARKER in source:
        return State.PATCHED
    if UNPATCHED in source:
        return State.NEEDS_PATCH
    # An upstream fix would exempt the scales by name somewhere in the loader's cast loop.
    if "_scb" in source:
        return State.FIXED_UPSTREAM
    raise PatchError(
        "moshi/models/loaders.py has changed shape: the dtype-cast line this patch edits is gone "
        "and no '_scb' handling is visible. Check the new moshi release by hand."
    )


def patched_source(source: str) -> str:
    if source.count(UNPATCHED) != 1:
        raise PatchError(f"expected the cast line exactly once, found it {source.count(UNPATCHED)} times")
    return source.replace(UNPATCHED, PATCHED)


def apply(path: Path) -> State:
    """Patch ``path`` if needed; return the state it was in before."""
    source = path.read_text(encoding="utf-8")
    state = state_of(source)
    if state is State.NEEDS_PATCH:
        path.write_text(patched_source(source), encoding="utf-8")
        # Refresh the bytecode now, so no stale .pyc can hide the change.
        py_compile.compile(str(path), doraise=True)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moshi-q8-patch")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report only; exit 1 if a patch is needed")
    mode.add_argument("--apply", action="store_true", help="patch if needed")
    parser.add_argument("--path", type=Path, help="loaders.py to work on (default: the installed one)")
    args = parser.parse_args(argv)
    try:
        path = args.path or loader_path()
        if args.check:
            state = state_of(path.read_text(encoding="utf-8"))
            print(f"{path}: {state.value}")
            return 1 if state is State.NEEDS_PATCH else 0
        before = apply(path)
    except (PatchError, OSError) as exc:
        print(f"moshi-q8-patch: {exc}", file=sys.stderr)
        return 2
    print("patched" if before is State.NEEDS_PATCH else f"already {before.value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
