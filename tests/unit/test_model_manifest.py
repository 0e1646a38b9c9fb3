"""The quick check of the copied model set: the controller's side (plugins/filter/model_manifest.py) and
the host's (roles/service_release/library/model_manifest_host.py, run by ansible)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from model_manifest import model_manifest, model_manifest_current, model_manifest_stamp
from role_module import run_module


def host_state(model: Path, stamp: Path) -> dict:
    """The registered result of the role's task, as model_manifest_current receives it."""
    return run_module("service_release", "model_manifest_host", {"path": str(model), "stamp": str(stamp)})


@pytest.fixture
def controller(tmp_path: Path) -> Path:
    src = tmp_path / "controller"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.safetensors").write_bytes(b"\0" * 1000)
    return src


def test_a_copy_is_current_until_a_side_changes(controller, tmp_path):
    host = tmp_path / "host"
    stamp = tmp_path / "model-manifest.json"
    manifest = model_manifest(str(controller))
    assert sorted(manifest) == ["config.json", os.path.join("sub", "weights.safetensors")]
    assert not model_manifest_current(host_state(host, stamp), manifest)  # never copied
    # "Copy", then write the stamp, as the role does.
    (host / "sub").mkdir(parents=True)
    (host / "config.json").write_text("{}")
    (host / "sub" / "weights.safetensors").write_bytes(b"\0" * 1000)
    stamp.write_text(model_manifest_stamp(manifest))
    assert model_manifest_current(host_state(host, stamp), manifest)
    # A truncated file on the host, or a new file on the controller: copy again.
    (host / "sub" / "weights.safetensors").write_bytes(b"\0" * 10)
    assert not model_manifest_current(host_state(host, stamp), manifest)
    (host / "sub" / "weights.safetensors").write_bytes(b"\0" * 1000)
    (controller / "tokenizer.model").write_text("t")
    assert not model_manifest_current(host_state(host, stamp), model_manifest(str(controller)))


def test_a_touched_controller_file_counts_as_changed(controller, tmp_path):
    manifest = model_manifest(str(controller))
    os.utime(controller / "config.json", ns=(1, 1))
    assert model_manifest(str(controller)) != manifest


def test_a_missing_controller_dir_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a directory on the controller"):
        model_manifest(str(tmp_path / "nope"))
