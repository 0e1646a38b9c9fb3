"""Build the bridge's Moshi backend pool from the inventory.

``{{ groups['moshi_servers'] | moshi_backend_urls(hostvars, inventory_hostname) }}`` gives one
``ws://ADDRESS:PORT/api/chat`` per host whose ``moshi_server_enabled`` is not false. The address is
``moshi_server_address``, else ``ansible_host``, else the inventory name; the bridge's own host is
reached over 127.0.0.1.

``{{ groups['voice_engines'] | engine_chat_urls(hostvars, inventory_hostname) }}`` gives one
``ws://ADDRESS:PORT/api/chat`` per voice engine host whose ``voice_engine_modules`` has a ``chat``
module (Moshi's protocol, PersonaPlex's or Kyutai's model); the address is ``voice_engine_address``,
else ``ansible_host``, else the name; the port ``voice_engine_port`` (8080).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_PORT = 8998
ENGINE_PORT = 8080


def _address(host: str, facts: Mapping[str, Any], bridge_host: str, key: str) -> str:
    if host == bridge_host:
        return "127.0.0.1"
    return str(facts.get(key) or facts.get("ansible_host") or host)


def moshi_backend_urls(hosts: Iterable[str], hostvars: Mapping[str, Any], bridge_host: str) -> list[str]:
    urls: list[str] = []
    for host in hosts:
        facts = hostvars[host]
        if str(facts.get("moshi_server_enabled", True)).lower() in ("false", "no", "0"):
            continue
        address = _address(host, facts, bridge_host, "moshi_server_address")
        port = int(facts.get("moshi_server_port", DEFAULT_PORT))
        urls.append(f"ws://{address}:{port}/api/chat")
    return urls


def engine_chat_urls(hosts: Iterable[str], hostvars: Mapping[str, Any], bridge_host: str) -> list[str]:
    urls: list[str] = []
    for host in hosts:
        facts = hostvars[host]
        modules = facts.get("voice_engine_modules") or {}
        if not isinstance(modules, Mapping) or not any(
            isinstance(spec, Mapping) and str(spec.get("kind", name)) == "chat"
            for name, spec in modules.items()
        ):
            continue
        address = _address(host, facts, bridge_host, "voice_engine_address")
        port = int(facts.get("voice_engine_port", ENGINE_PORT))
        urls.append(f"ws://{address}:{port}/api/chat")
    return urls


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"moshi_backend_urls": moshi_backend_urls, "engine_chat_urls": engine_chat_urls}
