"""Print what runs where after `make demo`, and check it the way a user would.

It checks each service from this machine through the published ports: Moshi's websocket route and
protocol, the bridge's /healthz and /status, and a voice session through the bridge. It exits
non-zero if anything is unhealthy.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request

from bridge_client import text, voice
from moshi_tools.probe import probe

CONTAINER = "voice-local"
MOSHI = "127.0.0.1:8998"
BRIDGE = "127.0.0.1:8999"


def http_get(url: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
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


def main() -> int:
    checks: list[tuple[str, bool]] = []
    print(f"\n== voice stack demo on container {CONTAINER} ==")
    print(f"moshi-server        {unit_line('moshi-server')}")
    print(f"personaplex-bridge  {unit_line('personaplex-bridge')}")

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

    status, _ = http_get(f"http://{BRIDGE}/healthz")
    checks.append((f"Bridge GET /healthz -> {status}", status == 200))
    session = asyncio.run(voice(f"ws://{BRIDGE}/ws", sessions=1, frames=20))["sessions"][0]
    checks.append(
        (
            f"Bridge voice session: ready moshi={session['ready']['moshi']}, {session['answer']['type']} "
            f"{session['answer'].get('backend', '')}, audio frames back={session['audio']}",
            session["answer"]["type"] == "voice_ready" and session["audio"] > 0,
        )
    )
    turn = asyncio.run(text(f"ws://{BRIDGE}/ws", "hello"))
    reply = turn["reply"]
    status, body = http_get(f"http://{BRIDGE}/status")
    checks.append((f"Bridge GET /status -> {status}", status == 200))
    print("")
    for line, ok in checks:
        print(f"[{'ok' if ok else 'FAIL'}] {line}")
    print(
        f"[info] Bridge text turn -> {reply['type']}"
        f" {reply.get('code', '')} (the MAS is external; set personaplex_bridge_mas_url to yours)"
    )
    if body:
        print("\nBridge /status:\n" + json.dumps(json.loads(body), indent=2))
    print(f"\nMoshi:  ws://{MOSHI}/api/chat\nBridge: ws://{BRIDGE}/ws  (status: http://{BRIDGE}/status)")
    print(f"Logs:   docker exec {CONTAINER} journalctl -u moshi-server -u personaplex-bridge -f")
    print("Remove: make demo-down")
    healthy = all(ok for _, ok in checks)
    print("\nHEALTHY" if healthy else "\nUNHEALTHY: see the lines above")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
