"""Release ids, fingerprints, plans, pruning and rollback targets (plugins/filter/service_release.py)."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

import pytest
from role_module import run_module
from service_release import (
    FilterModule,
    service_release_fingerprint,
    service_release_id,
    service_release_plan,
    service_release_previous,
    service_release_prune,
)

A, B, C, D = (f"2026112{i}T074500Z-b122b75" for i in range(4))


def rel(id_: str, fingerprint: str | None = "f", failed: bool = False, venv_key: str | None = None) -> dict:
    return {"id": id_, "fingerprint": fingerprint, "venv_key": venv_key, "failed": failed}


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


def test_state_module_reads_a_release_tree(tmp_path):
    files_by_release = (
        (A, {"FINGERPRINT": "f1\nk1 python3.11"}),  # the venv key on the second line
        (B, {"FINGERPRINT": "f2", "FAILED": "x"}),  # a release from before venv keys
        (C, {}),  # incomplete
    )
    for name, files in files_by_release:
        (tmp_path / "releases" / name).mkdir(parents=True)
        for file, text in files.items():
            (tmp_path / "releases" / name / file).write_text(text + "\n")
    (tmp_path / "current").symlink_to(f"releases/{A}")
    (tmp_path / "venv").mkdir()  # a pre-release layout left a real directory at a stable path
    (tmp_path / "lib").symlink_to("current/lib")
    (tmp_path / "installed-wheel.sha256").write_text("old layout\n")
    paths = {
        "stable": [str(tmp_path / name) for name in ("venv", "lib", "unit")],
        "obsolete": [str(tmp_path / name) for name in ("installed-wheel.sha256", "wheels")],
    }
    state = run_module("service_release", "service_release_state", {"root": str(tmp_path), **paths})["state"]
    assert state["current"] == A
    assert state["releases"] == [
        rel(A, "f1", venv_key="k1 python3.11"),
        rel(B, "f2", failed=True),
        rel(C, None),
    ]
    assert state["legacy"] == [str(tmp_path / "venv")]
    assert state["links"] == {str(tmp_path / "lib"): "current/lib"}
    assert state["obsolete"] == [str(tmp_path / "installed-wheel.sha256")]
    assert service_release_plan(state, "f1", D, 3, str(tmp_path))["obsolete"] == state["obsolete"]
    assert state["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"


LINKS = [
    {"path": "/opt/x/venv", "src": "current/venv"},
    {"path": "/etc/x.env", "src": "/opt/x/current/x.env"},
]


def test_only_wrong_or_missing_links_are_fixed_and_present_paths_are_listed():
    state = {
        "current": A,
        "releases": [rel(A, "f1")],
        "links": {"/opt/x/venv": "current/venv", "/etc/x.env": "/elsewhere"},
        "legacy": ["/etc/x.service"],
    }
    plan = service_release_plan(state, "f1", B, 3, "/opt/x", links=LINKS)
    assert plan["links_to_fix"] == [LINKS[1]]
    assert plan["present"] == ["/etc/x.env", "/etc/x.service", "/opt/x/venv"]
    state["links"]["/etc/x.env"] = "/opt/x/current/x.env"
    assert service_release_plan(state, "f1", B, 3, "/opt/x", links=LINKS)["links_to_fix"] == []
    fresh = service_release_plan({"current": None, "releases": []}, "f1", A, 3, "/opt/x", links=LINKS)
    assert fresh["links_to_fix"] == LINKS
    assert fresh["present"] == []


def test_a_new_release_starts_from_the_live_venv_only_when_it_would_hold_the_same():
    live = {"current": A, "python": "3.11", "releases": [rel(A, "f1", venv_key="k1 python3.11")]}
    same = service_release_plan(live, "f2", B, 3, "/opt/x", venv_key="k1")
    assert same["needed"]
    assert same["seed"] == f"/opt/x/releases/{A}"
    assert same["venv_key"] == "k1 python3.11"
    # Other packages, another Python, no key, nothing to build, no live release: a fresh venv.
    assert service_release_plan(live, "f2", B, 3, "/opt/x", venv_key="k2")["seed"] is None
    assert (
        service_release_plan({**live, "python": "3.12"}, "f2", B, 3, "/opt/x", venv_key="k1")["seed"] is None
    )
    assert service_release_plan(live, "f2", B, 3, "/opt/x")["seed"] is None
    assert service_release_plan(live, "f1", B, 3, "/opt/x", venv_key="k1")["seed"] is None
    first = service_release_plan(
        {"current": None, "releases": [], "python": "3.11"}, "f", A, 3, "/x", venv_key="k1"
    )
    assert first["seed"] is None
    assert first["venv_key"] == "k1 python3.11"
    # A release from before venv keys is never a seed.
    old = {"current": A, "python": "3.11", "releases": [rel(A, "f1")]}
    assert service_release_plan(old, "f2", B, 3, "/opt/x", venv_key="k1")["seed"] is None


def test_filters_are_registered():
    assert set(FilterModule().filters()) >= {"service_release_plan", "service_release_id"}
