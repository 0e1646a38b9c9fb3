"""Behaviour of a converged voice_engine host: the unit and its hardening, the real protocols, releases.

The STT and TTS sessions are real websocket sessions, run on the host by the engine's own client
(``python -m voice_engine.probe``, the role's health gate): audio in, ``Step`` messages and the
``Marker`` back; text in, audio back. Order matters (``-x``): the redeploy and rollback come last.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess

from playbook_runner import PROJECT, run_playbook

testinfra_hosts = ["ansible://voice_engines"]

PYTHON = "/opt/voice-engine/venv/bin/python"
CONFIG = "/etc/voice-engine/voice-engine.json"


def main_pid(host) -> int:
    pid = int(host.check_output("systemctl show -p MainPID --value voice-engine"))
    assert pid > 0, "voice-engine has no main process"
    return pid


def unit_property(host, name: str) -> str:
    return host.check_output(f"systemctl show -p {name} --value voice-engine")


def probe(host, *args: str) -> dict:
    result = host.run(f"{PYTHON} -m voice_engine.probe --json {' '.join(args)}")
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def http_get(host, path: str) -> tuple[int, str]:
    """GET on the host itself (its own python3): status and body."""
    script = (
        "import sys, urllib.request as u, urllib.error as e\n"
        "try:\n r = u.urlopen('http://127.0.0.1:8080' + sys.argv[1], timeout=10)\n"
        " print(r.status); print(r.read().decode())\n"
        "except e.HTTPError as x:\n print(x.code)\n"
    )
    out = host.check_output(f"python3 -c {shlex.quote(script)} {shlex.quote(path)}")
    status, _, body = out.partition("\n")
    return int(status), body


def task_block(stdout: str, name: str) -> str:
    """What ansible-playbook printed for the task (of any role) whose name starts with ``name``."""
    start = re.search(rf"TASK \[[\w.]+ : {re.escape(name)}", stdout).start()
    end = stdout.find("TASK [", start + 1)
    return stdout[start : end if end > 0 else None]


def live_release(host) -> str:
    return host.check_output("readlink /opt/voice-engine/current")


def playbook(name: str, *args: str) -> subprocess.CompletedProcess:
    return run_playbook(PROJECT / "playbooks" / name, "-l", "engine-host", "-t", "engine", *args)


def test_service_runs_as_its_user_with_hardening(host):
    service = host.service("voice-engine")
    assert service.is_enabled
    assert service.is_running
    assert host.check_output(f"ps -o user= -p {main_pid(host)}") == "voice-engine"
    for name, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",  # CPU mode: no device nodes
        "Restart": "on-failure",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit_property(host, name) == value, name
    exec_start = unit_property(host, "ExecStart")
    assert f"/opt/voice-engine/venv/bin/voice-engine serve --config {CONFIG}" in exec_start


def test_environment_is_offline_and_never_disables_cuda_graphs(host):
    environ = host.check_output(f"tr '\\0' '\\n' < /proc/{main_pid(host)}/environ").splitlines()
    env = dict(line.split("=", 1) for line in environ if "=" in line)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["NO_TORCH_COMPILE"] == "1"  # CPU: no inductor C++ compile at start
    assert env["OMP_NUM_THREADS"] == "1"
    assert "NO_CUDA_GRAPH" not in env


def test_config_holds_the_inventory_modules_and_is_not_world_readable(host):
    config = host.file(CONFIG)
    assert config.is_symlink
    target = host.file(config.linked_to)
    assert (target.user, target.group, target.mode) == ("root", "voice-engine", 0o640)
    cfg = json.loads(host.check_output(f"cat {CONFIG}"))
    assert cfg["port"] == 8080
    assert cfg["api_keys"] == ["public_token", "molecule-key"]
    assert cfg["modules"]["asr"] == {
        "kind": "asr",
        "model_dir": "/opt/voice-engine/models/stt",
        "slots": 2,
        "precision": "fp32",
        "device": "cpu",
    }
    assert cfg["modules"]["tts"]["voices_dir"] == "/opt/voice-engine/models/voices"
    chat = cfg["modules"]["chat"]
    assert (chat["model_dir"], chat["voices_dir"]) == (
        "/opt/voice-engine/models/personaplex",
        "/opt/voice-engine/models/personaplex_voices",
    )
    assert chat["options"] == {"flavor": "personaplex", "default_voice": "NATF2.pt"}
    assert host.file("/opt/voice-engine/models/stt/config.json").is_file
    assert host.file("/opt/voice-engine/models/personaplex_voices/NATF2.pt").is_file


def test_healthz_status_and_metrics_answer(host):
    assert http_get(host, "/healthz")[0] == 200
    code, body = http_get(host, "/status")
    assert code == 200
    modules = json.loads(body)["modules"]
    assert set(modules) == {"asr", "tts", "chat"}
    for name, entry in modules.items():
        # What the inventory chose, as the engine runs it.
        assert (entry["kind"], entry["precision"], entry["device"]) == (name, "fp32", "cpu")
        assert entry["slots_total"] == 2
        assert entry["slots_used"] == 0
    code, body = http_get(host, "/metrics")
    assert code == 200
    assert "# TYPE" in body


def test_stt_tts_and_chat_sessions_over_websockets(host):
    report = probe(host, "--config", CONFIG, "--seconds", "2")
    assert report["healthz"] == 200
    asr, tts, chat = report["asr"], report["tts"], report["chat"]
    # chat: the default voice's (NATF2.pt) prefill, the handshake, then Opus audio for the Opus sent.
    assert chat["handshake"], chat
    assert chat["audio_messages"] >= chat["frames_sent"] // 2, chat
    assert asr["ready"], asr
    assert asr["frames_sent"] == 25
    # One Step per 80 ms frame processed: at least the frames sent before the Marker came back.
    assert asr["steps"] >= asr["frames_sent"], asr
    assert asr["marker"], asr
    assert tts["ready"], tts
    assert tts["samples"] > 0, tts
    assert tts["closed"], tts
    assert report["ok"], report


def test_a_wrong_key_is_refused_and_the_second_key_works(host):
    wrong = probe(host, "--url", "http://127.0.0.1:8080", "--key", "nope", "--asr")
    assert not wrong["ok"]
    assert "401" in wrong["asr"]["error"], wrong
    second = probe(host, "--url", "http://127.0.0.1:8080", "--key", "molecule-key", "--tts")
    assert second["ok"], second


def test_redeploy_with_nothing_changed_touches_nothing(host):
    pid, release = main_pid(host), live_release(host)
    result = playbook("redeploy.yml")
    assert result.returncode == 0, result.stdout
    assert "Not drained, not restarted" in result.stdout
    assert (main_pid(host), live_release(host)) == (pid, release)


def test_changed_setting_is_redeployed_on_a_copied_venv_then_rolled_back(host):
    first = live_release(host)
    result = playbook("redeploy.yml", "-e", '{"voice_engine_extra_env": {"VOICE_ENGINE_MOLECULE": "1"}}')
    assert result.returncode == 0, result.stdout
    # Same packages as the live release: the venv is a copy, torch and moshi are not installed again.
    assert "changed:" in task_block(result.stdout, "Start the new venv as a copy")
    assert "changed:" not in task_block(result.stdout, "Install torch for this hardware")
    second = live_release(host)
    assert second != first
    assert "is live and healthy" in result.stdout
    assert probe(host, "--config", CONFIG)["ok"]

    result = playbook("rollback.yml")
    assert result.returncode == 0, result.stdout
    assert live_release(host) == first
    environ = host.check_output(f"tr '\\0' '\\n' < /proc/{main_pid(host)}/environ")
    assert "VOICE_ENGINE_MOLECULE" not in environ
    assert probe(host, "--config", CONFIG)["ok"]
