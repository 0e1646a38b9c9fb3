"""Fetch a Hugging Face model repo once into a local model directory (deploy time only).

Usage::

    HF_TOKEN=... python -m moshi_tools.fetch_model --repo kyutai/moshika-pytorch-bf16 --dest DIR \\
        [--revision main]

Prints ``fetched`` when files were downloaded and ``present`` when ``DIR/.fetched`` already names
the same repo and revision. The token is read from the environment and never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Only what moshi.server reads; skips other formats that some repos carry.
PATTERNS = ["*.json", "*.safetensors", "*.model"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moshi-fetch-model")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--revision", default="main")
    args = parser.parse_args(argv)
    stamp = args.dest / ".fetched"
    wanted = f"{args.repo}@{args.revision}\n"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        print("present")
        return 0
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        snapshot_download(
            args.repo,
            revision=args.revision,
            local_dir=args.dest,
            allow_patterns=PATTERNS,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        print(f"moshi-fetch-model: could not fetch {args.repo}@{args.revision}: {exc}", file=sys.stderr)
        return 1
    stamp.write_text(wanted, encoding="utf-8")
    print("fetched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
