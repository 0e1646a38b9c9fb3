"""The playbooks parse against both inventories, and production maps the user's hosts as designed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ["site.yml", "playbooks/diagnose.yml"]


def ansible_playbook(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ansible-playbook", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=os.environ | {"ANSIBLE_NOCOLOR": "1"},
    )


@pytest.mark.parametrize("inventory", ["inventory/production", "inventory/local"])
@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_parses(inventory: str, playbook: str):
    result = ansible_playbook("-i", inventory, playbook, "--syntax-check")
    assert result.returncode == 0, result.stderr


def test_production_plays_target_the_right_hosts():
    result = ansible_playbook("-i", "inventory/production", "site.yml", "--list-hosts")
    assert result.returncode == 0, result.stderr
    plays = result.stdout.split("play #")[1:]
    hosts = [set(line.strip() for line in play.splitlines()[3:] if line.strip()) for play in plays]
    # nvidia, moshi, engine, bridge
    assert hosts == [{"gpu01", "wsl2pc"}, {"gpu01", "wsl2pc"}, {"gpu01", "wsl2pc"}, {"gpu01"}]


def test_tags_select_one_concern():
    result = ansible_playbook("-i", "inventory/production", "site.yml", "--list-tasks", "--tags", "bridge")
    assert result.returncode == 0, result.stderr
    # The release steps are include_role tasks (roles/service_release): listed by name, without a role prefix.
    assert "personaplex_bridge : Check the bridge settings" in result.stdout
    assert "Install the bridge wheel into a new release" in result.stdout
    assert "moshi_server : Check the settings" not in result.stdout
    assert "Install the Moshi venv" not in result.stdout
    assert "voice_engine : Check the settings" not in result.stdout


def test_engine_tag_selects_the_engine_on_gpu01():
    result = ansible_playbook("-i", "inventory/production", "site.yml", "--list-tasks", "--tags", "engine")
    assert result.returncode == 0, result.stderr
    assert "voice_engine : Check the settings against the hardware" in result.stdout
    assert "personaplex_bridge : Install" not in result.stdout
    for playbook in ("playbooks/redeploy.yml", "playbooks/rollback.yml"):
        listed = ansible_playbook("-i", "inventory/production", playbook, "--list-hosts", "--tags", "engine")
        assert listed.returncode == 0, listed.stderr
        assert "play #2 (voice_engines)" in listed.stdout


def test_the_bridge_pool_is_the_wsl2_pcs_personaplex_engine():
    """Production: neither Kyutai server is in the pool (both disabled); the WSL2 PC's chat module is."""
    from moshi_backends import engine_chat_urls, moshi_backend_urls

    hostvars = {
        host: yaml.safe_load((ROOT / "inventory/production/host_vars" / f"{host}.yml").read_text())
        for host in ("gpu01", "wsl2pc")
    }
    assert moshi_backend_urls(["gpu01", "wsl2pc"], hostvars, "gpu01") == []
    assert engine_chat_urls(["gpu01", "wsl2pc"], hostvars, "gpu01") == ["ws://192.168.0.50:8080/api/chat"]
    # On the engine's own host the bridge would use loopback; voice_engine_address wins over ansible_host.
    assert engine_chat_urls(["wsl2pc"], hostvars, "wsl2pc") == ["ws://127.0.0.1:8080/api/chat"]
    hostvars["wsl2pc"]["voice_engine_address"] = "wsl2pc.lan"
    assert engine_chat_urls(["wsl2pc"], hostvars, "gpu01") == ["ws://wsl2pc.lan:8080/api/chat"]
