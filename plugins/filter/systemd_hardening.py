"""The sandboxing directives every service unit of this project carries, in one place.

``{{ writable_paths | systemd_hardening(devices=False) }}`` returns the ``[Service]`` lines: a
read-only system (``ProtectSystem=strict``), no home, private /tmp, no new privileges, no
capabilities, and only ``writable_paths`` writable. ``devices=True`` keeps /dev (GPU device nodes).
"""

from __future__ import annotations

from typing import Any

BASE = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "SystemCallArchitectures=native",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "UMask=0077",
)


def systemd_hardening(writable_paths: list[str] | None = None, devices: bool = False) -> str:
    lines = list(BASE)
    if writable_paths:
        lines.append("ReadWritePaths=" + " ".join(writable_paths))
    # GPU device nodes (/dev/nvidia*) must stay reachable in GPU mode.
    lines.append("PrivateDevices=no" if devices else "PrivateDevices=yes")
    return "\n".join(lines)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"systemd_hardening": systemd_hardening}
