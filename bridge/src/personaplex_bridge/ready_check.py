"""Protocol check of a running bridge: open /ws and expect the ``ready`` event first.

    python -m personaplex_bridge.ready_check ENV_FILE ws://127.0.0.1:8999/ws

The health gate of playbooks/redeploy.yml and rollback.yml runs it with the live release's venv.
Reads BRIDGE_TOKEN from the service's environment file (root only), so no secret is on the command
line. Prints the ready event as JSON and exits 0; exits 1 with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp


def read_env(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {key: value for key, value in pairs}


async def first_event(url: str, token: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.ws_connect(url, headers=headers) as ws:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"expected a text frame, got {msg.type.name}")
        event: dict[str, object] = json.loads(msg.data)
        return event


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m personaplex_bridge.ready_check ENV_FILE WS_URL", file=sys.stderr)
        return 2
    env_file, url = argv
    try:
        event = asyncio.run(first_event(url, read_env(env_file).get("BRIDGE_TOKEN", "")))
    except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
        print(f"no ready event from {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(event))
    if event.get("type") != "ready":
        print(f"first event from {url} is not ready: {event}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
