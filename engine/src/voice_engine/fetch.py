"""``python -m voice_engine.fetch``: fetch a Hugging Face repo once into a local directory (deploy time only).

    HF_TOKEN=... python -m voice_engine.fetch --repo kyutai/stt-1b-en_fr --dest DIR [--revision main]
        [--pattern '*.safetensors' ...] [--extract voices.tgz ...]

Run by the ``voice_engine`` role when a model set's source is ``hf``; the engine itself never calls the
hub (it loads local directories only). Prints ``fetched`` when files were downloaded and ``present``
when ``DIR/.fetched`` already names the same repo, revision and patterns. The token is read from the
environment and never printed (it is removed from every message). Exits 1 with one line on stderr that
starts with ``voice-engine-fetch:`` and gives the reason; the role shows that line while it hides the
task's other output.

``--extract NAME`` unpacks a fetched tar archive (``.tgz``, ``.tar.gz``, ``.tar``) into DIR after the
download, as NVIDIA's PersonaPlex repository ships its voices (``voices.tgz`` holding ``voices/``).
Only regular files and directories inside DIR are unpacked; a link, a device or a path that leaves
DIR is refused with its name, and nothing is unpacked.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tarfile
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
    parser.add_argument("--extract", action="append", default=[], help="tar archive to unpack (repeatable)")
    args = parser.parse_args(argv)
    patterns = sorted(args.pattern or DEFAULT_PATTERNS)
    stamp = args.dest / ".fetched"
    wanted = f"{args.repo}@{args.revision} {' '.join(patterns)}"
    wanted += f" extract {' '.join(sorted(args.extract))}\n" if args.extract else "\n"
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
    for name in args.extract:
        problem = extract(args.dest, name)
        if problem:
            print(f"{PREFIX} {args.repo}@{args.revision}: {problem}", file=sys.stderr)
            return 1
    stamp.write_text(wanted, encoding="utf-8")
    print("fetched")
    return 0


def extract(dest: Path, name: str) -> str | None:
    """Unpack ``dest/name`` into ``dest``; the reason it cannot be, or None."""
    archive = dest / name
    if Path(name).name != name or not archive.is_file():
        return f"--extract {name}: no such file was fetched into {dest}"
    root = dest.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                inside = (root / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not inside.is_relative_to(root):
                    return f"{name}: refused to unpack {member.name!r} (only files and folders inside {dest})"
            for member in members:
                # Checked above: plain files and folders inside dest (the same rule as tarfile's data
                # filter, which older Pythons lack); modes are reset to the defaults.
                member.mode = 0o755 if member.isdir() else 0o644
                tar.extract(member, dest)
    except (tarfile.TarError, OSError) as exc:
        return f"{name}: not a readable tar archive ({exc})"
    return None


if __name__ == "__main__":
    sys.exit(main())
