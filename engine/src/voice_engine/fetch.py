"""``python -m voice_engine.fetch``: fetch a Hugging Face repo once into a local directory (deploy time only).

    HF_TOKEN=... python -m voice_engine.fetch --repo kyutai/stt-1b-en_fr --dest DIR [--revision main]
        [--pattern '*.safetensors' ...]

Run by the ``voice_engine`` role when a model set's source is ``hf``; the engine itself never calls the
hub (it loads local directories only). Prints ``fetched`` when files were downloaded and ``present``
when ``DIR/.fetched`` already names the same repo, revision and patterns. The token is read from the
environment and never printed. Exits 1 with the reason when the download fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# What the engine reads: configs, weights, tokenizers; voices are safetensors too.
DEFAULT_PATTERNS = ("*.json", "*.safetensors", "*.model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voice_engine.fetch", description=__doc__)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--revision", default="main")
    parser.add_argument("--pattern", action="append", default=None, help="allow pattern (repeatable)")
    args = parser.parse_args(argv)
    patterns = sorted(args.pattern or DEFAULT_PATTERNS)
    stamp = args.dest / ".fetched"
    wanted = f"{args.repo}@{args.revision} {' '.join(patterns)}\n"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        print("present")
        return 0
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - deploy time only
    from huggingface_hub.errors import HfHubHTTPError  # noqa: PLC0415

    try:
        snapshot_download(
            args.repo,
            revision=args.revision,
            local_dir=args.dest,
            allow_patterns=patterns,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        print(f"voice_engine.fetch: could not fetch {args.repo}@{args.revision}: {exc}", file=sys.stderr)
        return 1
    stamp.write_text(wanted, encoding="utf-8")
    print("fetched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
