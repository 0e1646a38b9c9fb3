"""Start ``moshi.server`` from a local model directory, with the CPU-mode fix.

Usage::

    python -m moshi_tools.launch --model-dir DIR [moshi.server arguments ...]

Two things differ from ``python -m moshi.server``:

* the model's files are resolved from ``DIR`` (see :mod:`moshi_tools.model_dir`), so the server
  never asks the Hugging Face hub for anything;
* when CUDA is unavailable, ``torch.cuda.synchronize`` becomes a no-op. moshi's warmup calls it
  unguarded, which crashes ``--device cpu`` on hosts without an NVIDIA driver or with a CPU-only
  torch (upstream PR #193 was closed unmerged). The installed package is not edited.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from moshi_tools.model_dir import ModelDirError, resolve, server_args


def guard_cuda_synchronize() -> bool:
    """Make ``torch.cuda.synchronize`` a no-op when CUDA is unavailable. True if it did."""
    import torch

    if torch.cuda.is_available():
        return False

    def _no_cuda_synchronize(device: object = None) -> None:
        return None

    torch.cuda.synchronize = _no_cuda_synchronize
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moshi-launch", description="start moshi.server offline")
    parser.add_argument("--model-dir", type=Path, required=True)
    args, server_argv = parser.parse_known_args(argv)
    try:
        model_args = server_args(resolve(args.model_dir))
    except ModelDirError as exc:
        print(f"moshi-launch: {exc}", file=sys.stderr)
        return 2
    if guard_cuda_synchronize():
        print("moshi-launch: CUDA unavailable, torch.cuda.synchronize is a no-op", file=sys.stderr)
    sys.argv = ["moshi.server", *model_args, *server_argv]
    runpy.run_module("moshi.server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
