"""Fetch a Hugging Face model repo once into a local model directory (deploy time only).

Usage::

    HF_TOKEN=... [HF_ENDPOINT=https://mirror] python -m moshi_tools.fetch_model \\
        --repo kyutai/moshika-pytorch-bf16 --dest DIR [--revision main]

Prints ``fetched`` when files were downloaded and ``present`` when ``DIR/.fetched`` already names
the same repo and revision. On failure it exits 1 with one line on stderr that starts with
``moshi-fetch-model:`` and names the cause (gated repo without a token, token refused, no such repo
or revision, hub unreachable); the role shows that line while it hides the task's other output. The
token is read from the environment and never printed: it is removed from every message.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from pathlib import Path
from typing import Any

# Only what moshi.server reads; skips other formats that some repos carry.
PATTERNS = ["*.json", "*.safetensors", "*.model"]
PREFIX = "moshi-fetch-model:"
# The hub's answer to a token it does not know (huggingface_hub compares the same string).
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _header(exc: BaseException, name: str) -> str:
    response = getattr(exc, "response", None)
    headers: Any = getattr(response, "headers", None) or {}
    value = headers.get(name)
    return value if isinstance(value, str) else ""


def reason(exc: BaseException, repo: str, revision: str, endpoint: str, has_token: bool) -> str:
    """One line saying why the fetch failed and what to do, from huggingface_hub's exception."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = _status(exc)
    where = f"{repo}@{revision} from {endpoint}"
    if status == 401 and _header(exc, "X-Error-Message") == _INVALID_CREDENTIALS:
        return (
            f"the hub refused the token (HTTP 401, invalid credentials) for {where}: "
            "check moshi_server_hf_token (vault) or HF_TOKEN"
        )
    if isinstance(exc, GatedRepoError):
        if not has_token:
            return (
                f"{repo} is a gated repo and no token was given (HTTP {status}): accept its terms on the "
                "hub, then set moshi_server_hf_token (vault) or HF_TOKEN"
            )
        return (
            f"the token has no access to the gated repo {repo} (HTTP {status}): accept its terms on the "
            "hub with the token's account, or use a token that has"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r} at {endpoint} (HTTP {status})"
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if has_token else " (a private repo needs moshi_server_hf_token)"
        return f"no repo {repo} at {endpoint}, or no access to it (HTTP {status}){hint}"
    if status == 403:
        return f"the token may not read {repo} (HTTP 403): give it read access to the repo"
    if status is not None:
        return f"the hub answered HTTP {status} for {where}"
    if isinstance(exc, LocalEntryNotFoundError) or "connect" in type(exc).__name__.lower():
        return f"cannot reach the hub at {endpoint} for {where} ({type(exc).__name__})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"could not fetch {where}: {type(exc).__name__}" + (f": {first}" if first else "")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


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
    import requests
    from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    token = os.environ.get("HF_TOKEN") or None
    endpoint = constants.ENDPOINT
    try:
        # Asked first, so that an unreachable hub, a refused token or a gated file is an error here:
        # given a local directory that already holds files of those names, snapshot_download would
        # fall back to them (with a warning) instead, and this would claim a fetch that never was.
        info = HfApi(endpoint=endpoint, token=token).model_info(args.repo, revision=args.revision)
        siblings = [s.rfilename for s in info.siblings or []]
        names = [n for n in siblings if any(fnmatch.fnmatch(n, p) for p in PATTERNS)]
        if not names:
            print(
                f"{PREFIX} {args.repo}@{args.revision} has no file matching {' '.join(PATTERNS)}",
                file=sys.stderr,
            )
            return 1
        # Gating applies to every file of a repo: one HEAD request shows whether this token may read them.
        get_hf_file_metadata(
            hf_hub_url(args.repo, names[0], revision=info.sha, endpoint=endpoint), token=token
        )
        snapshot_download(
            args.repo,
            revision=args.revision,
            local_dir=args.dest,
            allow_patterns=PATTERNS,
            token=token,
        )
    except (HfHubHTTPError, requests.RequestException, OSError, ValueError) as exc:
        line = reason(exc, args.repo, args.revision, endpoint, token is not None)
        print(_scrub(f"{PREFIX} {line}", token).replace("\n", " "), file=sys.stderr)
        return 1
    stamp.write_text(wanted, encoding="utf-8")
    print("fetched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
