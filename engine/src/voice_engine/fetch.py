"""``python -m voice_engine.fetch``: fetch a Hugging Face repo once into a local directory (deploy time only).

    HF_TOKEN=... python -m voice_engine.fetch --repo kyutai/stt-1b-en_fr --dest DIR [--revision main]
        [--pattern '*.safetensors' ...]

Run by the ``voice_engine`` role when a model set's source is ``hf``; the engine itself never calls the
hub (it loads local directories only). Prints ``fetched`` when files were downloaded and ``present``
when ``DIR/.fetched`` already names the same repo, revision and patterns. The token is read from the
environment and never printed (it is removed from every message). Exits 1 with one line on stderr that
starts with ``voice-engine-fetch:`` and gives the reason; the role shows that line while it hides the
task's other output.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from pathlib import Path

# What the engine reads: configs, weights, tokenizers; voices are safetensors too.
DEFAULT_PATTERNS = ("*.json", "*.safetensors", "*.model")
PREFIX = "voice-engine-fetch:"


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
    import requests  # noqa: PLC0415 - deploy time only
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url, snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import HfHubHTTPError  # noqa: PLC0415

    token = os.environ.get("HF_TOKEN") or None
    try:
        # Asked first, so that an unreachable hub, a refused token or a gated file is an error here:
        # with files of those names already in DIR, snapshot_download would fall back to them (with a
        # warning) and this would claim a fetch that never happened.
        info = HfApi(token=token).model_info(args.repo, revision=args.revision)
        names = [
            s.rfilename for s in info.siblings or [] if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)
        ]
        if not names:
            print(
                f"{PREFIX} {args.repo}@{args.revision} has no file matching {' '.join(patterns)}",
                file=sys.stderr,
            )
            return 1
        get_hf_file_metadata(hf_hub_url(args.repo, names[0], revision=info.sha), token=token)
        snapshot_download(
            args.repo, revision=args.revision, local_dir=args.dest, allow_patterns=patterns, token=token
        )
    except (HfHubHTTPError, requests.RequestException, OSError, ValueError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        detail = f"HTTP {status}: " if isinstance(status, int) else ""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        line = f"{PREFIX} could not fetch {args.repo}@{args.revision}: {detail}{first}"
        print(line.replace(token, "***") if token else line, file=sys.stderr)
        return 1
    stamp.write_text(wanted, encoding="utf-8")
    print("fetched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
