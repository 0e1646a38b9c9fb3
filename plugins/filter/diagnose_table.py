"""The table playbooks/diagnose.yml prints: one row per host, from its nvidia_runtime facts and the
verdict of moshi_profile.moshi_diagnose, padded for a terminal (docs/diagnose.md explains the columns).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

DIAGNOSE_COLUMNS = (
    "host",
    "OS",
    "kernel",
    "GPU",
    "CC",
    "VRAM",
    "driver",
    "torch build",
    "compile",
    "bf16",
    "q8",
    "7B fits",
    "7B real-time factor (< 1 is real time)",
    "recommended",
    "inventory",
    "blocked by",
    "runtime notes",
)


def _yes_no(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def diagnose_row(
    diagnosis: Mapping[str, Any],
    host: str,
    os_name: str = "",
    runtime: Mapping[str, Any] | None = None,
) -> list[str]:
    """One row of the diagnose table: the host's runtime facts and moshi_diagnose's verdict."""
    facts = runtime or {}
    memory = facts.get("gpu_memory_mib")
    name = facts.get("gpu_name") or ("NVIDIA GPU (name unknown)" if facts.get("gpu_present") else "none")
    rtf = "; ".join(f"{key} {value:.2f}x" for key, value in diagnosis.get("realtime_factors", {}).items())
    recommended = f"{diagnosis.get('recommended_mode')}/{diagnosis.get('recommended_precision')}" + (
        " (real time)" if diagnosis.get("recommended_realtime") else " (NOT real time)"
    )
    blockers = list(diagnosis.get("blockers") or [])
    cc = facts.get("gpu_compute_capability")
    source = facts.get("gpu_compute_capability_source")
    return [
        host,
        os_name or "-",
        "WSL2" if facts.get("is_wsl2") else ("WSL1" if facts.get("wsl_version") == 1 else "native"),
        str(name),
        f"{cc} ({source})" if cc and source not in (None, "nvidia-smi") else str(cc or "-"),
        f"{memory} MiB" if memory else "-",
        str(facts.get("driver_version") or "-"),
        str(diagnosis.get("torch_build") or "-"),
        _yes_no(diagnosis.get("compile_ok")),
        _yes_no(diagnosis.get("bf16_ok")),
        _yes_no(diagnosis.get("q8_ok")),
        str(diagnosis.get("largest_precision") or "none") if diagnosis.get("gpu") else "-",
        rtf or "-",
        recommended,
        str(diagnosis.get("inventory") or "not set"),
        "; ".join(blockers) if blockers else "-",
        "; ".join([*(facts.get("problems") or []), *(facts.get("notes") or [])]) or "-",
    ]


def diagnose_table(rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table (columns padded for a terminal) of diagnose rows, header first."""
    body = [[str(cell).replace("|", "/") for cell in row] for row in rows]
    table = [list(DIAGNOSE_COLUMNS), *body]
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(DIAGNOSE_COLUMNS))]
    lines = ["| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {"diagnose_row": diagnose_row, "diagnose_table": diagnose_table}
