"""Releases of a service: ids, fingerprints, the plan (build or not), what to prune, what to roll back to.

Layout on the host (roles/service_release): ``ROOT/releases/ID/`` holds one release (venv, code,
rendered config) and ``ROOT/current`` points at the live one. A release is complete once its
``FINGERPRINT`` file is written (last step of a build); ``FAILED`` marks one that failed its health
gate. FINGERPRINT's first line is the sha256 of the release's inputs; its second line, the venv key,
names what the release's venv holds (third-party packages and the host's Python), so a new release
whose venv would hold the same starts from a copy of the live one (``seed``) instead of reinstalling.
The host's state is read by the role's module (roles/service_release/library/service_release_state.py)
and judged here:

    {{ state | service_release_plan(fingerprint, new_id, keep, root, links=..., venv_key=...) }}

Ids are ``YYYYMMDDTHHMMSSZ-REV`` (UTC, then the git short revision of this repository): they sort in
time order as plain strings and say which commit built them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9A-Za-z]+$")


def service_release_id(moment: datetime | str, revision: str) -> str:
    """``20261127T074500Z-b122b75`` from a datetime (made UTC) and a git revision."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    rev = re.sub(r"[^0-9A-Za-z]", "", str(revision).strip()) or "nogit"
    return f"{moment:%Y%m%dT%H%M%SZ}-{rev}"


def service_release_fingerprint(inputs: Any) -> str:
    """sha256 of the canonical JSON of everything that goes into a release."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _complete(release: Mapping[str, Any]) -> bool:
    return bool(release.get("fingerprint"))


def service_release_previous(state: Mapping[str, Any], current: str | None = None) -> str | None:
    """The newest complete, healthy release older than ``current`` (what a rollback restores)."""
    current = current if current is not None else state.get("current")
    older = [
        r["id"]
        for r in state.get("releases", [])
        if _complete(r) and not r.get("failed") and (current is None or r["id"] < current)
    ]
    return max(older) if older else None


def service_release_prune(
    state: Mapping[str, Any], current: str | None, keep: int, also: Sequence[str | None] = ()
) -> list[str]:
    """Ids to delete: all but ``current``, ``also`` (the release that was live before: the rollback
    target) and the newest complete healthy releases, ``keep`` in all.

    Failed and incomplete releases go at the first prune after them (they are kept until the next
    successful deploy, for diagnosis).
    """
    if int(keep) < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    healthy = sorted(
        (r["id"] for r in state.get("releases", []) if _complete(r) and not r.get("failed")), reverse=True
    )
    ordered = [i for i in (current, *also, *healthy) if i]
    kept = list(dict.fromkeys(ordered))[: max(int(keep), 1)]
    return sorted(r["id"] for r in state.get("releases", []) if r["id"] not in kept)


def service_release_venv_key(state: Mapping[str, Any], venv_key: str) -> str:
    """The venv key a release records (FINGERPRINT's second line): the caller's key and the host's
    Python (``3.11``)."""
    return f"{venv_key} python{state.get('python', '?')}" if venv_key else ""


def service_release_links_to_fix(
    state: Mapping[str, Any], links: Sequence[Mapping[str, str]]
) -> list[dict[str, str]]:
    """The stable paths that are not yet the symlink they should be (``{path, src}`` items)."""
    found = state.get("links", {})
    return [dict(link) for link in links if found.get(link["path"]) != link["src"]]


def service_release_plan(
    state: Mapping[str, Any],
    fingerprint: str,
    new_id: str,
    keep: int,
    root: str,
    links: Sequence[Mapping[str, str]] = (),
    venv_key: str = "",
) -> dict[str, Any]:
    """Build a new release or keep the current one; what the play does next, in one dict.

    ``seed`` is the live release's directory when a new release is needed and its venv holds what the
    new one would (same ``venv_key`` and the same host Python): the new venv starts as a copy of it.
    """
    if not ID_RE.match(new_id):
        raise ValueError(f"not a release id: {new_id!r}")
    releases = list(state.get("releases", []))
    by_id = {r["id"]: r for r in releases}
    current = state.get("current")
    live = by_id.get(current) if current else None
    needed = live is None or live.get("fingerprint") != fingerprint
    if needed and new_id in by_id:
        raise ValueError(f"release {new_id} already exists under {root}/releases: retry in a second")
    target = new_id if needed else current
    after = {"releases": [*releases, {"id": new_id, "fingerprint": fingerprint, "failed": False}]}
    key = service_release_venv_key(state, venv_key)
    seed = needed and live is not None and bool(key) and live.get("venv_key") == key
    return {
        "needed": needed,
        "id": target,
        "dir": f"{root}/releases/{target}",
        "current": current,
        "current_dir": f"{root}/releases/{current}" if current else None,
        "previous": service_release_previous(state, current),
        "prune": service_release_prune(after if needed else state, target, keep, [current] if needed else []),
        "legacy": list(state.get("legacy", [])),
        "obsolete": list(state.get("obsolete", [])),
        "releases": [r["id"] for r in releases],
        "fingerprint": fingerprint,
        "venv_key": key,
        "seed": f"{root}/releases/{current}" if seed else None,
        "links_to_fix": service_release_links_to_fix(state, links),
        "present": sorted([*state.get("links", {}), *state.get("legacy", [])]),
    }


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "service_release_id": service_release_id,
            "service_release_fingerprint": service_release_fingerprint,
            "service_release_plan": service_release_plan,
            "service_release_prune": service_release_prune,
            "service_release_previous": service_release_previous,
            "service_release_links_to_fix": service_release_links_to_fix,
        }
