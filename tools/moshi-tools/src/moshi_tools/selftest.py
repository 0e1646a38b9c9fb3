"""Prove on this host that moshi loads and runs a q8 checkpoint.

It writes a tiny q8 checkpoint (int8 weights, float32 ``*_scb`` scales) to a temporary directory,
loads it through moshi's own loader in bf16, exactly as ``moshi.server`` does, and runs LM steps.
Without the loader fix (:mod:`moshi_tools.q8_patch`) this fails with the user's error
``Expected `weight_scb` to have type float, but got bfloat16``.

Usage::

    python -m moshi_tools.selftest [--device cpu|cuda] [--dtype bf16|fp16]

Exit 0 and one ``q8 self-test passed`` line, or exit 1 and one ``q8 self-test FAILED`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from moshi_tools import tiny_model


def run(device: str, dtype_name: str, steps: int = 3) -> str:
    """Load a tiny q8 checkpoint in ``dtype_name`` and run ``steps`` LM steps; return a summary."""
    import torch
    from moshi.models import loaders
    from moshi.models.lm import LMGen

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    with tempfile.TemporaryDirectory(prefix="moshi-q8-selftest-") as tmp:
        out = tiny_model.write_model_set(Path(tmp), variant="q8", seed=0)
        config = json.loads((out / tiny_model.CONFIG_NAME).read_text(encoding="utf-8"))
        lm_kwargs = {k: v for k, v in config.items() if k in tiny_model.LM_CONFIG or k == "quantize"}
        lm = loaders.get_moshi_lm(out / tiny_model.LM_NAME, lm_kwargs=lm_kwargs, device=device, dtype=dtype)
    scales = {str(p.dtype) for name, p in lm.named_parameters() if name.endswith("_scb")}
    if not scales:
        raise RuntimeError("the checkpoint loaded without any *_scb scales: not a q8 model")
    gen = LMGen(
        lm, top_k=tiny_model.LM_GEN_CONFIG["top_k"], top_k_text=tiny_model.LM_GEN_CONFIG["top_k_text"]
    )
    n_q = tiny_model.LM_CONFIG["n_q"]
    with torch.no_grad(), gen.streaming(1):
        for _ in range(steps):
            codes = torch.zeros(1, n_q, 1, dtype=torch.long, device=device)
            gen.step(codes)
    return f"scales {', '.join(sorted(scales))}; {steps} steps on {device} in {dtype_name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moshi-q8-selftest")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = parser.parse_args(argv)
    try:
        summary = run(args.device, args.dtype)
    except Exception as exc:  # report any failure as one line: this runs in playbooks and on-call
        print(f"q8 self-test FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"q8 self-test passed: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
