"""Releases of a service: ids, fingerprints, the plan (build or not), what to prune, what to roll back to.

Layout on the host (roles/service_release): ``ROOT/releases/ID/`` holds one release (venv, code,
rendered config) and ``ROOT/current`` points at the live one. A release is complete once its
``FINGERPRINT`` file is written (last step of a build); ``FAILED`` marks one that failed its health
gate. The host's state is read by one command (``STATE_SCRIPT``) and judged here:

    {{ state | service_release_plan(fingerprint, new_id, keep, root) }}

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

# Run on the host as ``python3 -c STATE_SCRIPT ROOT [STABLE_PATH ...]``; prints one JSON object.
STATE_SCRIPT = """
import json, os, sys
root, stable = sys.argv[1], sys.argv[2:]
releases = os.path.join(root, "releases")
current = os.path.join(root, "current")
def read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None
out = {"current": os.path.basename(os.readlink(current)) if os.path.islink(current) else None,
       "releases": [], "legacy": [p for p in stable if os.path.lexists(p) and not os.path.islink(p)]}
for name in sorted(os.listdir(releases)) if os.path.isdir(releases) else []:
    path = os.path.join(releases, name)
    out["releases"].append({"id": name, "fingerprint": read(os.path.join(path, "FINGERPRINT")),
                            "failed": os.path.exists(os.path.join(path, "FAILED"))})
print(json.dumps(out))
"""


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


def service_release_plan(
    state: Mapping[str, Any], fingerprint: str, new_id: str, keep: int, root: str
) -> dict[str, Any]:
    """Build a new release or keep the current one; what the play does next, in one dict."""
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
    return {
        "needed": needed,
        "id": target,
        "dir": f"{root}/releases/{target}",
        "current": current,
        "current_dir": f"{root}/releases/{current}" if current else None,
        "previous": service_release_previous(state, current),
        "prune": service_release_prune(after if needed else state, target, keep, [current] if needed else []),
        "legacy": list(state.get("legacy", [])),
        "releases": [r["id"] for r in releases],
        "fingerprint": fingerprint,
    }


def service_release_state_script(_: Any = None) -> str:
    return STATE_SCRIPT


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "service_release_id": service_release_id,
            "service_release_fingerprint": service_release_fingerprint,
            "service_release_plan": service_release_plan,
            "service_release_prune": service_release_prune,
            "service_release_previous": service_release_previous,
            "service_release_state_script": service_release_state_script,
        }
