"""Build the bridge's Moshi backend pool from the inventory.

``{{ groups['moshi_servers'] | moshi_backend_urls(hostvars, inventory_hostname) }}`` gives one
``ws://ADDRESS:PORT/api/chat`` per host whose ``moshi_server_enabled`` is not false. The address is
``moshi_server_address``, else ``ansible_host``, else the inventory name; the bridge's own host is
reached over 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_PORT = 8998


def moshi_backend_urls(hosts: Iterable[str], hostvars: Mapping[str, Any], bridge_host: str) -> list[str]:
    urls: list[str] = []
    for host in hosts:
        facts = hostvars[host]
        if str(facts.get("moshi_server_enabled", True)).lower() in ("false", "no", "0"):
            continue
        if host == bridge_host:
            address = "127.0.0.1"
        else:
            address = str(facts.get("moshi_server_address") or facts.get("ansible_host") or host)
        port = int(facts.get("moshi_server_port", DEFAULT_PORT))
        urls.append(f"ws://{address}:{port}/api/chat")
    return urls


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"moshi_backend_urls": moshi_backend_urls}
