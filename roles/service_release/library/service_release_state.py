#!/usr/bin/python
"""Ansible module: which releases of a service this host holds, and what its stable paths are.

Read-only. roles/service_release (tasks/release.yml) judges the result on the controller with
plugins/filter/service_release.py (``service_release_plan``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: service_release_state
short_description: Read a service's releases, current link, stable paths and leftovers on the host
options:
  root: {type: path, required: true, description: The service's install dir (releases/ID, current).}
  stable: {type: list, elements: path, default: [], description: Paths that must be symlinks into current.}
  obsolete: {type: list, elements: path, default: [], description: Paths left by the layout before releases.}
"""


def _lines(path: str) -> list[str | None]:
    try:
        with open(path, encoding="utf-8") as handle:
            return list(handle.read().strip().splitlines()) or [""]
    except OSError:
        return [None]


def read_state(root: str, stable: list[str], obsolete: list[str]) -> dict[str, Any]:
    """current (an id or None), releases ({id, fingerprint, venv_key, failed}, sorted), legacy (stable paths
    that are not symlinks), links (stable path -> target), obsolete (those that exist), python ("3.11")."""
    releases = os.path.join(root, "releases")
    current = os.path.join(root, "current")
    state: dict[str, Any] = {
        "current": os.path.basename(os.readlink(current)) if os.path.islink(current) else None,
        "releases": [],
        "legacy": [p for p in stable if os.path.lexists(p) and not os.path.islink(p)],
        "links": {p: os.readlink(p) for p in stable if os.path.islink(p)},
        "obsolete": [p for p in obsolete if os.path.lexists(p)],
        "python": "{}.{}".format(*sys.version_info[:2]),
    }
    for name in sorted(os.listdir(releases)) if os.path.isdir(releases) else []:
        path = os.path.join(releases, name)
        fingerprint = [*_lines(os.path.join(path, "FINGERPRINT")), None]
        state["releases"].append(
            {
                "id": name,
                "fingerprint": fingerprint[0],
                "venv_key": fingerprint[1],
                "failed": os.path.exists(os.path.join(path, "FAILED")),
            }
        )
    return state


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "root": {"type": "path", "required": True},
            "stable": {"type": "list", "elements": "path", "default": []},
            "obsolete": {"type": "list", "elements": "path", "default": []},
        },
        supports_check_mode=True,
    )
    params = module.params
    module.exit_json(changed=False, state=read_state(params["root"], params["stable"], params["obsolete"]))


if __name__ == "__main__":
    main()
