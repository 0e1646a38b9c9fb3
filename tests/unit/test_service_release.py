"""Release ids, fingerprints, plans, pruning and rollback targets (plugins/filter/service_release.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from service_release import (
    STATE_SCRIPT,
    FilterModule,
    service_release_fingerprint,
    service_release_id,
    service_release_plan,
    service_release_previous,
    service_release_prune,
)

A, B, C, D = (f"2026112{i}T074500Z-b122b75" for i in range(4))


def rel(id_: str, fingerprint: str | None = "f", failed: bool = False) -> dict:
    return {"id": id_, "fingerprint": fingerprint, "failed": failed}


def test_ids_are_utc_sortable_and_name_the_revision():
    moment = datetime(2026, 11, 27, 8, 45, 0, tzinfo=timezone(timedelta(hours=1)))
    assert service_release_id(moment, "b122b75\n") == "20261127T074500Z-b122b75"
    assert service_release_id(moment, "") == "20261127T074500Z-nogit"
    later = service_release_id(moment + timedelta(seconds=1), "0000000")
    assert later > service_release_id(moment, "fffffff")


def test_fingerprint_ignores_key_order_and_sees_every_change():
    assert service_release_fingerprint({"a": 1, "b": "x"}) == service_release_fingerprint({"b": "x", "a": 1})
    assert service_release_fingerprint({"a": 1}) != service_release_fingerprint({"a": 2})


def test_first_deploy_builds_a_release():
    plan = service_release_plan({"current": None, "releases": []}, "f1", A, 3, "/opt/x")
    assert plan["needed"] and plan["id"] == A and plan["dir"] == f"/opt/x/releases/{A}"
    assert plan["current"] is None and plan["prune"] == []


def test_unchanged_inputs_build_nothing():
    state = {"current": A, "releases": [rel(A, "f1")]}
    plan = service_release_plan(state, "f1", B, 3, "/opt/x")
    assert not plan["needed"] and plan["id"] == A and plan["prune"] == []


def test_changed_inputs_build_next_to_the_live_release_and_keep_it():
    state = {"current": B, "releases": [rel(A), rel(B, "f1")]}
    plan = service_release_plan(state, "f2", C, 2, "/opt/x")
    assert plan["needed"] and plan["id"] == C and plan["current"] == B
    assert plan["prune"] == [A]  # keep 2: C and B (the rollback target)


def test_an_existing_id_is_refused():
    with pytest.raises(ValueError, match="already exists"):
        service_release_plan({"current": A, "releases": [rel(A, "f1"), rel(B)]}, "f2", B, 3, "/x")


def test_prune_drops_failed_and_incomplete_releases_and_keeps_the_previous_live_one():
    state = {"releases": [rel(A), rel(B), rel(C, failed=True), rel(D, None)]}
    # After a rollback to A, a new release E replaces A: keep E and A, not the newer B.
    e = "20261128T000000Z-b122b75"
    state["releases"].append(rel(e))
    assert service_release_prune(state, e, 2, [A]) == [B, C, D]
    assert service_release_prune(state, e, 3, [A]) == [C, D]
    with pytest.raises(ValueError):
        service_release_prune(state, e, 0)


def test_rollback_target_is_the_newest_healthy_older_release():
    state = {"current": C, "releases": [rel(A), rel(B, failed=True), rel(C), rel(D)]}
    assert service_release_previous(state) == A
    assert service_release_previous({"current": A, "releases": [rel(A)]}) is None


def test_state_script_reads_a_release_tree(tmp_path):
    for name, files in ((A, {"FINGERPRINT": "f1"}), (B, {"FINGERPRINT": "f2", "FAILED": "x"}), (C, {})):
        (tmp_path / "releases" / name).mkdir(parents=True)
        for file, text in files.items():
            (tmp_path / "releases" / name / file).write_text(text + "\n")
    (tmp_path / "current").symlink_to(f"releases/{A}")
    (tmp_path / "venv").mkdir()  # a pre-release layout left a real directory at a stable path
    out = subprocess.run(
        [sys.executable, "-c", STATE_SCRIPT, str(tmp_path), str(tmp_path / "venv"), str(tmp_path / "lib")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    state = json.loads(out.stdout)
    assert state["current"] == A
    assert state["releases"] == [rel(A, "f1"), rel(B, "f2", failed=True), rel(C, None)]
    assert state["legacy"] == [str(tmp_path / "venv")]


def test_filters_are_registered():
    assert set(FilterModule().filters()) >= {"service_release_plan", "service_release_id"}
