"""Print what runs where after `make demo`, and check it the way a user would.

It checks each service from this machine through the published ports: Moshi's websocket route and
protocol; the voice engine's /healthz and a real STT, TTS and PersonaPlex session (Kyutai's and
Moshi's protocols; PersonaPlex's NATF2.pt voice prompt); the bridge's /healthz and /status and a
duplex voice session through it (PersonaPlex or Moshi, from its pool); then the whole agent
loop, step by step: a typed turn answered by the echo agent (the demo's MAS) and spoken by the
engine's TTS, and a spoken turn (a WAV file streamed as the microphone) transcribed by the engine's
STT, answered and spoken. It exits non-zero if anything is unhealthy.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request

from agent_turns import spoken_turn, typed_turn
from bridge_client import voice
from moshi_tools.probe import probe
from voice_engine.probe import run as engine_probe

CONTAINER = "voice-local"
MOSHI = "127.0.0.1:8998"
BRIDGE = "127.0.0.1:8999"
ENGINE = "127.0.0.1:8080"


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int | None, str]:
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError as exc:
        return None, str(exc)


def unit_line(unit: str) -> str:
    out = subprocess.run(
        ["docker", "exec", CONTAINER, "systemctl", "show", unit, "-p", "ActiveState,MainPID,Description"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    state, pid = fields.get("ActiveState", "?"), fields.get("MainPID", "?")
    return f"{state:8} pid {pid:>6}  {fields.get('Description', '')}"


def engine_checks() -> list[tuple[str, bool]]:
    """The engine's /healthz, then one STT, one TTS and one chat session (voice_engine.probe)."""
    words = "hello from the demo"
    prompts = {"voice_prompt": "NATF2.pt", "text_prompt": "You are a friendly demo."}
    report = asyncio.run(
        engine_probe(f"http://{ENGINE}", "public_token", ["asr", "tts", "chat"], 2.0, words, "", 60, prompts)
    )
    asr, tts, chat = report.get("asr", {}), report.get("tts", {}), report.get("chat", {})
    return [
        (
            f"Engine GET /healthz -> {report.get('healthz', report.get('error'))}",
            report.get("healthz") == 200,
        ),
        (
            f"Engine STT session (/api/asr-streaming): Ready={asr.get('ready')}, {asr.get('frames_sent')} "
            f"frames sent, {asr.get('steps')} Step and {asr.get('words')} Word messages back, "
            f"Marker back={asr.get('marker')} {asr.get('error', '')}",
            bool(asr.get("ok")),
        ),
        (
            f"Engine TTS session (/api/tts_streaming): Ready={tts.get('ready')}, "
            f"{tts.get('audio_messages')} audio messages ({tts.get('samples')} samples) for {words!r} "
            f"{tts.get('error', '')}",
            bool(tts.get("ok")),
        ),
        (
            f"Engine PersonaPlex session (/api/chat, voice NATF2.pt and a text prompt): handshake="
            f"{chat.get('handshake')}, {chat.get('audio_messages')} audio messages for "
            f"{chat.get('frames_sent')} frames {chat.get('error', '')}",
            bool(chat.get("ok")),
        ),
    ]


def main() -> int:
    checks: list[tuple[str, bool]] = []
    print(f"\n== voice stack demo on container {CONTAINER} ==")
    print(f"moshi-server        {unit_line('moshi-server')}")
    print(f"voice-engine        {unit_line('voice-engine')}")
    print(f"personaplex-bridge  {unit_line('personaplex-bridge')}")
    print(f"mas-standin         {unit_line('mas-standin')}")

    status, _ = http_get(f"http://{MOSHI}/api/chat")
    checks.append((f"Moshi  GET /api/chat -> {status} (400: the websocket route is up)", status == 400))
    moshi = asyncio.run(probe(f"ws://{MOSHI}/api/chat", frames=20, timeout=30))
    checks.append(
        (
            f"Moshi  websocket: handshake={moshi.handshake} audio={moshi.audio_messages} "
            f"text={moshi.text_messages} (tiny random model: the words are noise)",
            moshi.ok,
        )
    )

    checks.extend(engine_checks())

    status, _ = http_get(f"http://{BRIDGE}/healthz")
    checks.append((f"Bridge GET /healthz -> {status}", status == 200))
    duplex = voice(f"ws://{BRIDGE}/ws", sessions=1, frames=20, start={"mode": "duplex"})
    session = asyncio.run(duplex)["sessions"][0]
    checks.append(
        (
            f"Bridge duplex voice session: ready moshi={session['ready']['moshi']}, "
            f"{session['answer']['type']} "
            f"{session['answer'].get('backend', '')}, audio frames back={session['audio']}",
            session["answer"]["type"] == "voice_ready" and session["audio"] > 0,
        )
    )
    checks.extend(asyncio.run(typed_turn(f"ws://{BRIDGE}/ws", "hello agent")))
    checks.extend(asyncio.run(spoken_turn(f"ws://{BRIDGE}/ws")))
    page, _ = http_get(f"http://{BRIDGE}/test-voice")
    # The page's module script is fetched with the page's Origin: the demo allows it.
    script, _ = http_get(f"http://{BRIDGE}/test-voice/page.js", {"Origin": f"http://{BRIDGE}"})
    checks.append(
        (f"Bridge test page GET /test-voice -> {page}, its script -> {script}", page == script == 200)
    )
    status, body = http_get(f"http://{BRIDGE}/status")
    checks.append((f"Bridge GET /status -> {status}", status == 200))
    print("")
    for line, ok in checks:
        print(f"[{'ok' if ok else 'FAIL'}] {line}")
    print(
        "[info] The MAS here is the demo's echo agent (mas-standin); set personaplex_bridge_mas_url to yours."
    )
    if body:
        print("\nBridge /status:\n" + json.dumps(json.loads(body), indent=2))
    print(f"\nPage:   http://{BRIDGE}/test-voice  (the bridge's test page: open it in a browser here)")
    print(f"Moshi:  ws://{MOSHI}/api/chat\nBridge: ws://{BRIDGE}/ws  (status: http://{BRIDGE}/status)")
    print(
        f"Engine: ws://{ENGINE}/api/asr-streaming, ws://{ENGINE}/api/tts_streaming, ws://{ENGINE}/api/chat "
        f"(status: http://{ENGINE}/status)"
    )
    print(
        f"Logs:   docker exec {CONTAINER} journalctl -u moshi-server -u voice-engine -u personaplex-bridge"
        " -u mas-standin -f"
    )
    print("Remove: make demo-down")
    healthy = all(ok for _, ok in checks)
    print("\nHEALTHY" if healthy else "\nUNHEALTHY: see the lines above")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
