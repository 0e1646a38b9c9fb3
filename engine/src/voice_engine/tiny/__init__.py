"""Tiny, randomly initialised model sets for tests and the demo, made offline and deterministically.

``voice-engine tiny-model --kind stt|tts|moshi|personaplex --out DIR [--seed N]`` writes a directory in
the layout of Kyutai's Hugging Face repositories (``config.json`` naming the LM, Mimi and tokenizer
files), so the engine loads it through the same code as a real model. The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

# kind -> "module:function(out: Path, seed: int) -> Path"
GENERATORS: dict[str, str] = {
    "stt": "voice_engine.tiny.stt:make",
    "tts": "voice_engine.tiny.tts:make",
    "moshi": "voice_engine.tiny.chat:make_moshi",
    "personaplex": "voice_engine.tiny.chat:make_personaplex",
}


def generate(kind: str, out: Path, seed: int) -> Path:
    module_name, _, func = GENERATORS[kind].partition(":")
    made: Path = getattr(importlib.import_module(module_name), func)(out, seed)
    return made


def _run(args: argparse.Namespace) -> int:
    made = generate(args.kind, Path(args.out), args.seed)
    print(made)
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tiny = sub.add_parser("tiny-model", help="write a tiny random model set (tests, demo)")
    tiny.add_argument("--kind", required=True, choices=sorted(GENERATORS))
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_run)
