#!/usr/bin/python
"""Ansible module: the host's side of the quick check of a copied model set (names and sizes, and the
stamp of the last copy); plugins/filter/model_manifest.py compares it with the controller's manifest.

Read-only; it reads no weights. Shared by the service roles' model tasks (moshi_server, voice_engine),
which roles/service_release runs (their tasks/build.yml is included from it, so this role's library is
loaded).
"""

from __future__ import annotations

import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: model_manifest_host
short_description: Sizes of the files under a model directory, and the text of its stamp file
options:
  path: {type: path, required: true, description: The model directory on the host (may not exist yet).}
  stamp: {type: path, required: true, description: Written after each copy (the controller's manifest).}
"""


def host_state(root: str, stamp: str) -> dict[str, Any]:
    """``{"files": {relative path: size}, "stamp": text of the stamp file or None}``."""
    files: dict[str, int] = {}
    for base, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            files[os.path.relpath(path, root)] = os.path.getsize(path)
    try:
        with open(stamp, encoding="utf-8") as handle:
            text: str | None = handle.read()
    except OSError:
        text = None
    return {"files": files, "stamp": text}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "stamp": {"type": "path", "required": True},
        },
        supports_check_mode=True,
    )
    module.exit_json(changed=False, **host_state(module.params["path"], module.params["stamp"]))


if __name__ == "__main__":
    main()
