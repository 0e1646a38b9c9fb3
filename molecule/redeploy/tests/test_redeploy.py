"""On-call redeploy, step by step, on one host (tests run in file order and build on each other).

A: site.yml's release (converge). B: a changed bridge, redeployed. C: a broken bridge (its entry point
exits 1), rolled back to B automatically. Then rollback.yml (B -> A), then D (pruning to 2).
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

from playbook_runner import PROJECT, run_playbook

testinfra_hosts = ["ansible://redeploy-host"]

BRIDGE = "/opt/personaplex-bridge"
MOSHI = "/opt/moshi"
ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{7,}$")
READY = (
    f"{BRIDGE}/venv/bin/python -m personaplex_bridge.ready_check "
    "/etc/personaplex-bridge/personaplex-bridge.env ws://127.0.0.1:8999/ws"
)
PROBE = (
    f"PYTHONPATH={MOSHI}/lib {MOSHI}/venv/bin/python -m moshi_tools.probe --url ws://127.0.0.1:8998/api/chat"
)
# What must survive every step: configuration, model, state.
KEPT = (
    "sha256sum /etc/personaplex-bridge/personaplex-bridge.env /etc/moshi-server/moshi-server.env "
    "$(find /opt/moshi/model -type f | sort); stat -c %n /var/lib/moshi-server"
)

seen: dict = {}


def playbook(name: str, *args: str) -> subprocess.CompletedProcess:
    return run_playbook(PROJECT / "playbooks" / name, *args)


def bridge_copy(tmp_path_factory, name: str, edit) -> Path:
    src = tmp_path_factory.mktemp(name) / "bridge"
    shutil.copytree(
        PROJECT / "bridge", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    edit(src / "src" / "personaplex_bridge")
    return src


def releases(host, root: str) -> list[str]:
    return sorted(host.check_output(f"ls {root}/releases").split())


def current(host, root: str) -> str:
    return host.check_output(f"readlink {root}/current").removeprefix("releases/")


def main_pid(host, service: str) -> int:
    return int(host.check_output(f"systemctl show -p MainPID --value {service}"))


def ready(host) -> dict:
    out = host.run(READY)
    assert out.rc == 0, out.stderr
    return json.loads(out.stdout)


def task_status(stdout: str, task: str) -> str:
    """The first result word after a task's header in the playbook output (ok, changed, skipping...)."""
    after = stdout.split(task, 1)[1].splitlines()[1:]
    return next(line.split(":")[0] for line in after if line.strip() and not line.startswith("*"))


def redeploy_bridge(source: Path) -> subprocess.CompletedProcess:
    extra = json.dumps({"personaplex_bridge_source_dir": str(source)})
    return playbook("redeploy.yml", "-l", "redeploy-host", "-t", "bridge", "-e", extra)


def test_release_a_is_live_from_current_and_healthy(host):
    revision = subprocess.check_output(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"], text=True)
    for root in (BRIDGE, MOSHI):
        (release,) = releases(host, root)  # converge + idempotence: one release, not two
        assert ID.match(release) and release.endswith(revision.strip()), release
        assert current(host, root) == release
        assert host.check_output(f"cat {root}/releases/{release}/FINGERPRINT")
    seen["A"] = current(host, BRIDGE)
    seen["moshi_release"] = current(host, MOSHI)
    # The units run the release through current: the processes map the release's files.
    bridge_cmd = host.check_output(f"tr '\\0' ' ' < /proc/{main_pid(host, 'personaplex-bridge')}/cmdline")
    assert f"{BRIDGE}/releases/{seen['A']}/venv/bin/python" in bridge_cmd
    moshi_pid = main_pid(host, "moshi-server")
    assert host.run(f"grep -q {MOSHI}/releases/{seen['moshi_release']}/venv/ /proc/{moshi_pid}/maps").rc == 0
    assert host.check_output(f"readlink {MOSHI}/venv") == "current/venv"
    assert host.check_output("readlink -f /etc/personaplex-bridge/personaplex-bridge.env").startswith(BRIDGE)
    assert host.file("/etc/personaplex-bridge/personaplex-bridge.env").mode == 0o600
    # Health: the roles' checks and the protocol (bridge ready event, Moshi handshake).
    assert ready(host)["type"] == "ready"
    probe = host.run(PROBE)
    assert probe.rc == 0 and json.loads(probe.stdout)["handshake"] is True, probe.stdout + probe.stderr
    seen["moshi_pid"] = moshi_pid
    seen["kept"] = host.check_output(KEPT)


def test_changed_bridge_b_is_redeployed_without_touching_moshi(host, tmp_path_factory):
    source = bridge_copy(tmp_path_factory, "b", lambda pkg: (pkg / "__init__.py").open("a").write("# B\n"))
    bridge_pid = main_pid(host, "personaplex-bridge")
    result = redeploy_bridge(source)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "draining" in result.stdout and "is live and healthy" in result.stdout
    seen["B"] = current(host, BRIDGE)
    assert seen["B"] > seen["A"]
    assert releases(host, BRIDGE) == [seen["A"], seen["B"]]  # built next to A; A kept for rollback
    assert main_pid(host, "personaplex-bridge") != bridge_pid
    assert ready(host)["type"] == "ready"
    assert main_pid(host, "moshi-server") == seen["moshi_pid"]  # Moshi untouched
    assert current(host, MOSHI) == seen["moshi_release"]
    assert host.check_output(KEPT) == seen["kept"]


def test_broken_bridge_c_fails_its_gate_and_b_is_restored(host, tmp_path_factory):
    def break_entry_point(pkg: Path) -> None:
        (pkg / "__main__.py").write_text("import sys\n\n\ndef main():\n    return 1\n\n\nsys.exit(main())\n")

    source = bridge_copy(tmp_path_factory, "c", break_entry_point)
    result = redeploy_bridge(source)
    assert result.returncode != 0
    (failed,) = set(releases(host, BRIDGE)) - {seen["A"], seen["B"]}
    message = result.stdout
    assert "REDEPLOY FAILED, ROLLED BACK" in message, message[-3000:]
    assert f"failed release:   {failed}" in message
    assert f"restored release: {seen['B']}" in message
    assert "journal tail" in message
    assert host.file(f"{BRIDGE}/releases/{failed}/FAILED").exists
    assert current(host, BRIDGE) == seen["B"]  # restored and serving
    assert host.service("personaplex-bridge").is_running
    assert ready(host)["type"] == "ready"
    assert main_pid(host, "moshi-server") == seen["moshi_pid"]
    assert host.check_output(KEPT) == seen["kept"]
    seen["C"] = failed


def test_rollback_restores_the_previous_release(host):
    result = playbook("rollback.yml", "-l", "redeploy-host", "-t", "bridge")
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"rolled back to {seen['A']}" in result.stdout
    assert current(host, BRIDGE) == seen["A"]  # the failed C is never a rollback target
    assert ready(host)["type"] == "ready"
    assert main_pid(host, "moshi-server") == seen["moshi_pid"]
    assert host.check_output(KEPT) == seen["kept"]


def test_next_redeploy_prunes_to_keep_releases(host, tmp_path_factory):
    source = bridge_copy(tmp_path_factory, "d", lambda pkg: (pkg / "__init__.py").open("a").write("# D\n"))
    result = redeploy_bridge(source)
    assert result.returncode == 0, result.stdout[-3000:]
    new = current(host, BRIDGE)
    seen["D_source"] = str(source)
    # keep 2: the new release and the one it replaced (the rollback target); B and failed C are gone.
    assert releases(host, BRIDGE) == [seen["A"], new]
    assert ready(host)["type"] == "ready"
    assert releases(host, MOSHI) == [seen["moshi_release"]]
    assert main_pid(host, "moshi-server") == seen["moshi_pid"]
    assert host.check_output(KEPT) == seen["kept"]


def test_redeploy_leaves_unchanged_services_alone(host):
    before = {s: main_pid(host, s) for s in ("moshi-server", "personaplex-bridge")}
    releases_before = releases(host, BRIDGE), releases(host, MOSHI)
    extra = json.dumps({"personaplex_bridge_source_dir": seen["D_source"]})
    result = playbook("redeploy.yml", "-l", "redeploy-host", "-e", extra)
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("Not drained, not restarted") == 2
    assert {s: main_pid(host, s) for s in before} == before
    assert (releases(host, BRIDGE), releases(host, MOSHI)) == releases_before


def test_changed_moshi_config_is_redeployed_on_a_copied_venv_without_touching_the_bridge(host):
    """A configuration-only Moshi change: new release, venv copied from the live one (same packages,
    nothing reinstalled), Moshi restarted and probed; the bridge keeps running."""
    old = current(host, MOSHI)
    bridge_pid = main_pid(host, "personaplex-bridge")
    models = host.check_output("sha256sum $(find /opt/moshi/model -type f | sort)")
    extra = json.dumps({"moshi_server_extra_env": {"MOSHI_REDEPLOY_TEST": "1"}})
    result = playbook("redeploy.yml", "-l", "redeploy-host", "-t", "moshi", "-e", extra)
    assert result.returncode == 0, result.stdout[-3000:]
    assert task_status(result.stdout, "Start the new venv as a copy of the live release's") == "changed"
    assert task_status(result.stdout, "Install torch first") == "skipping"  # nothing reinstalled
    new = current(host, MOSHI)
    assert new > old
    assert releases(host, MOSHI) == [old, new]
    venv_keys = [host.check_output(f"sed -n 2p {MOSHI}/releases/{r}/FINGERPRINT") for r in (old, new)]
    assert venv_keys[0] == venv_keys[1]
    assert venv_keys[0].endswith(" python3.11")
    assert "MOSHI_REDEPLOY_TEST=1" in host.check_output("cat /etc/moshi-server/moshi-server.env")
    pid = main_pid(host, "moshi-server")
    assert pid != seen["moshi_pid"]
    assert host.run(f"grep -q {MOSHI}/releases/{new}/venv/ /proc/{pid}/maps").rc == 0  # runs the copy
    probe = host.run(PROBE)
    assert probe.rc == 0, probe.stdout + probe.stderr
    assert json.loads(probe.stdout)["handshake"] is True
    assert main_pid(host, "personaplex-bridge") == bridge_pid  # the bridge untouched
    assert host.check_output("sha256sum $(find /opt/moshi/model -type f | sort)") == models
