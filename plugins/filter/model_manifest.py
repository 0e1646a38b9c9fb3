"""Quick check of a copied directory (the Moshi model set): is the host's copy what the controller has?

Reading 15 GB of weights on both sides every run (what ``ansible.builtin.copy`` does to compare) is
slow; this compares names, sizes and modification times instead, like rsync's quick check:

- ``{{ dir | model_manifest }}`` (controller): ``{relative path: [size, mtime_ns]}``;
- the module ``model_manifest_host`` (roles/service_release/library/, on the host): ``{"files": {path:
  size}, "stamp": text of STAMP or null}``; STAMP is written after each copy and holds the controller's
  manifest as JSON;
- ``{{ host | model_manifest_current(manifest) }}``: true when the stamp is the controller's manifest
  and every file on the host has its size. Anything else means copy (the copy itself still compares
  contents and changes only what differs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def model_manifest(path: str) -> dict[str, list[int]]:
    """Every file under ``path`` (the controller's model set): size and mtime in nanoseconds."""
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory on the controller")
    out: dict[str, list[int]] = {}
    for base, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(base, name)
            info = os.stat(full)
            out[os.path.relpath(full, path)] = [info.st_size, info.st_mtime_ns]
    return dict(sorted(out.items()))


def model_manifest_stamp(manifest: Mapping[str, Any]) -> str:
    """What the host's stamp file holds after a copy of ``manifest``."""
    return json.dumps(manifest, sort_keys=True)


def model_manifest_current(host: Mapping[str, Any], manifest: Mapping[str, Any]) -> bool:
    """True when the host holds the controller's set: same stamp, same names and sizes."""
    if host.get("stamp") != model_manifest_stamp(manifest):
        return False
    sizes = host.get("files", {})
    return all(sizes.get(name) == entry[0] for name, entry in manifest.items())


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "model_manifest": model_manifest,
            "model_manifest_stamp": model_manifest_stamp,
            "model_manifest_current": model_manifest_current,
        }
