"""PersonaPlex on the engine's chat module, with PersonaPlex's voice names, and through the bridge beside it.

The set is the tiny PersonaPlex-shaped one (make models); its voice folder holds ``NATF2.pt`` (a ``.pt``
prompt as NVIDIA's fork stores them) and ``NATM0.wav`` (an audio prompt). The bridge's sessions are run
on the host by ``scripts/bridge_client.py``, a real client of the bridge's websocket, as the browser is.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from test_engine import PYTHON, http_get, probe

testinfra_hosts = ["ansible://voice_engines"]

CLIENT = Path(__file__).resolve().parents[3] / "scripts" / "bridge_client.py"
ENV_FILE = "/etc/personaplex-bridge/personaplex-bridge.env"


def chat_status(host) -> dict:
    code, body = http_get(host, "/status")
    assert code == 200
    return json.loads(body)["modules"]["chat"]


@pytest.fixture(scope="module")
def client(host):
    host.check_output(f"cat > /tmp/bridge_client.py <<'EOF'\n{CLIENT.read_text()}\nEOF")

    def run(*args: str) -> dict:
        return json.loads(host.check_output(f"{PYTHON} /tmp/bridge_client.py {shlex.join(args)}"))

    return run


def test_engine_serves_personaplex_with_its_voice_folder(host):
    chat = chat_status(host)
    assert chat["flavor"] == "personaplex"
    assert chat["voices"] == ["NATF2.pt", "NATM0.wav"]
    assert chat["default_voice"] == "NATF2.pt"
    assert chat["slots_total"] == 2


def test_a_session_with_an_audio_voice_and_a_text_prompt_is_prefilled_then_speaks(host):
    before = chat_status(host)["prefills"]
    args = ("--url", "http://127.0.0.1:8080", "--key", "molecule-key", "--chat", "--chat-voice", "NATM0.wav")
    report = probe(host, *args, "--chat-text", shlex.quote("You are a kind assistant."))
    assert report["ok"], report
    assert report["chat"]["handshake"] and report["chat"]["audio_messages"] > 0
    after = chat_status(host)
    assert after["prefills"] == before + 1
    assert after["prefill_ms_p50"] is not None


def test_a_voice_name_that_is_a_path_is_refused_before_the_upgrade(host):
    report = probe(
        host,
        "--url",
        "http://127.0.0.1:8080",
        "--key",
        "molecule-key",
        "--chat",
        "--chat-voice",
        "../NATF2.pt",
    )
    assert not report["ok"]
    assert "400" in report["chat"]["error"], report


def test_the_bridge_pool_is_the_engines_chat_module_with_its_key(host):
    env = host.file(ENV_FILE)
    assert env.mode == 0o600
    lines = dict(line.split("=", 1) for line in env.content_string.splitlines() if "=" in line)
    assert lines["BRIDGE_MOSHI_URLS"] == "ws://127.0.0.1:8080/api/chat"
    assert lines["BRIDGE_MOSHI_KEY"] == "molecule-key"


def test_a_duplex_session_through_the_bridge_gets_personaplex_audio_in_the_default_voice(host, client):
    before = chat_status(host)["prefills"]
    session = client("voice", "--mode", "duplex", "--sessions", "1")["sessions"][0]
    assert session["answer"]["type"] == "voice_ready", session
    assert session["audio"] >= 10, session
    assert chat_status(host)["prefills"] == before + 1  # the engine ran NATF2.pt's prefill for it


def test_the_opt_in_say_selftest_ran_and_left_its_report(host):
    """voice_engine_selftest_say: every sentence said to its end under both policies, transcribed by the
    engine's own asr (a word error rate; meaningless on the tiny models, as the report says)."""
    folder = "/var/lib/voice-engine/selftest-say"
    report = json.loads(host.file(f"{folder}/report.json").content_string)
    assert report["tiny_model"] is True
    for policy in ("constrained", "fixed"):
        entry = report["policies"][policy]
        assert entry["wer"] is not None, entry
        for sentence in entry["sentences"]:
            assert sentence["end"] == "done", sentence
            assert host.file(f"{folder}/{sentence['wav']}").size > 44
