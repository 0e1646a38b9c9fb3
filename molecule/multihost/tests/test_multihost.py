"""The whole stack across two hosts, exercised through the bridge only, as the browser does."""

import json
import os
import time
from pathlib import Path

import pytest

testinfra_hosts = ["ansible://gpu01"]

CLIENT = Path(__file__).resolve().parents[3] / "scripts" / "bridge_client.py"
PYTHON = "PYTHONPATH=/opt/moshi/lib /opt/moshi/venv/bin/python"


@pytest.fixture(scope="module")
def client(host):
    """Copy the client onto gpu01; it runs with the Moshi venv (aiohttp, sphn)."""
    host.check_output(f"cat > /tmp/bridge_client.py <<'EOF'\n{CLIENT.read_text()}\nEOF")

    def run(*args: str) -> dict:
        return json.loads(host.check_output(f"{PYTHON} /tmp/bridge_client.py {' '.join(args)}"))

    return run


def status(host) -> dict:
    return json.loads(
        host.check_output(
            'python3 -c "import urllib.request; '
            "print(urllib.request.urlopen('http://127.0.0.1:8999/status').read().decode())\""
        )
    )


def test_bridge_pool_holds_both_moshi_servers(host):
    env = host.file("/etc/personaplex-bridge/personaplex-bridge.env").content_string
    urls = next(line for line in env.splitlines() if line.startswith("BRIDGE_MOSHI_URLS=")).split("=", 1)[1]
    assert sorted(urls.split(",")) == ["ws://127.0.0.1:8998/api/chat", "ws://wsl2:8998/api/chat"]


def test_bridge_unit_is_active_and_hardened(host):
    assert host.service("personaplex-bridge").is_running
    show = host.check_output("systemctl show personaplex-bridge -p User -p ProtectSystem -p NoNewPrivileges")
    for setting in ("User=personaplex-bridge", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert setting in show
    assert host.file("/etc/personaplex-bridge/personaplex-bridge.env").mode == 0o600


def test_voice_session_gets_moshi_audio_back(client):
    session = client("voice", "--sessions", "1")["sessions"][0]
    assert session["ready"]["moshi"] == "up"
    assert session["answer"]["type"] == "voice_ready"
    assert session["audio"] >= 10


def test_two_concurrent_voice_sessions_use_both_backends(client):
    sessions = client("voice", "--sessions", "2", "--frames", "12")["sessions"]
    backends = {s["answer"].get("backend") for s in sessions}
    assert {s["answer"]["type"] for s in sessions} == {"voice_ready"}
    assert backends == {"ws://127.0.0.1:8998/api/chat", "ws://wsl2:8998/api/chat"}
    assert all(s["audio"] >= 6 for s in sessions)


def test_text_session_reaches_the_mas_endpoint(host, client):
    outcome = client("text", "--text", "what-is-the-weather")
    assert outcome["ready"]["mas"] == "up"
    assert outcome["reply"]["type"] == "mas_response"
    assert outcome["reply"]["text"] == "MAS heard: what-is-the-weather"
    assert outcome["reply"]["tool_calls"] == [{"name": "lookup", "arguments": {"q": "what-is-the-weather"}}]
    log = host.file("/var/lib/mas-standin/requests.jsonl").content_string
    sent = [json.loads(line) for line in log.splitlines()]
    assert {"text": "what-is-the-weather", "source": "text"}.items() <= sent[-1].items()


def test_with_one_moshi_stopped_a_new_session_still_gets_a_backend(host, client):
    wsl2 = host.get_host("ansible://wsl2", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])
    wsl2.check_output("systemctl stop moshi-server")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            backends = {b["url"]: b["state"] for b in status(host)["moshi"]["backends"]}
            if backends.get("ws://wsl2:8998/api/chat") == "down":
                break
            time.sleep(1)
        session = client("voice", "--sessions", "1", "--frames", "12")["sessions"][0]
        assert session["answer"]["type"] == "voice_ready"
        assert session["answer"]["backend"] == "ws://127.0.0.1:8998/api/chat"
        assert session["audio"] >= 6
    finally:
        wsl2.check_output("systemctl start moshi-server")
