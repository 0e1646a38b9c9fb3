"""Print what runs where after `make demo`, and check it the way a user would.

It reads the demo inventory's ports, checks each service from this machine through the published
ports, speaks the real Moshi protocol, and exits non-zero if anything is unhealthy.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request

from moshi_tools.probe import probe

CONTAINER = "voice-local"
MOSHI_PORT = 8998


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


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
    healthy = True
    print(f"\n== voice stack demo on container {CONTAINER} ==")
    print(f"moshi-server        {unit_line('moshi-server')}")
    status = http_status(f"http://127.0.0.1:{MOSHI_PORT}/api/chat")
    print(f"  GET /api/chat     -> {status} (400 means the websocket route is up)")
    healthy &= status == 400
    result = asyncio.run(probe(f"ws://127.0.0.1:{MOSHI_PORT}/api/chat", frames=20, timeout=30))
    print(
        f"  websocket         handshake={result.handshake} audio_frames={result.audio_messages} "
        f"text_pieces={result.text_messages} (tiny random model: the words are noise)"
    )
    healthy &= result.ok
    print(f"\nMoshi websocket: ws://127.0.0.1:{MOSHI_PORT}/api/chat")
    print("Logs: docker exec voice-local journalctl -u moshi-server -f")
    print("Remove: make demo-down")
    print("\nHEALTHY" if healthy else "\nUNHEALTHY: see the lines above")
    if not result.ok:
        print(json.dumps(result.__dict__), file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
