"""Print the hardware decision table in Markdown, from the one decision plugin.

docs/hardware.md embeds its output between the markers ``<!-- hardware-table:start -->`` and
``<!-- hardware-table:end -->``; a unit test keeps them equal.
Usage: python scripts/hardware_table.py [--write docs/hardware.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "filter"))
from moshi_profile import moshi_recommend, torch_build_name

START, END = "<!-- hardware-table:start -->", "<!-- hardware-table:end -->"

# (host, compute capability, memory MiB); None: no GPU.
HOSTS: list[tuple[str, str | None, int | None]] = [
    ("No GPU (any x86-64 Linux)", None, None),
    ("GTX 1080 Ti (gpu01)", "6.1", 11264),
    ("Tesla P40", "6.1", 24576),
    ("Tesla V100 32 GB", "7.0", 32768),
    ("RTX 2080 Ti", "7.5", 11264),
    ("RTX 3090 / 4090", "8.6", 24576),
    ("RTX 5090, the user's WSL2 PC (24 GB, see the note)", "12.0", 24463),
    ("RTX 5090 desktop card (32 GB)", "12.0", 32607),
    ("H100 80 GB", "9.0", 81559),
]


NOTE = (
    "Speeds: `python -m moshi_tools.bench --random-7b` on an NVIDIA H200 machine (GPU rows: the H200, a\n"
    "lower bound for smaller cards; CPU rows: 16 CPU threads of that machine), from docs/benchmarks.md.\n"
    'The RTX 5090: the user\'s write-up says "RTX 5090 (24GB)"; the desktop RTX 5090 has 32 GB, 24 GB is\n'
    "the laptop part. bf16 (16.3 GiB at peak) fits either way; `diagnose.yml` reads the real figure."
)


def speed(profile: dict[str, Any]) -> str:
    step, factor = profile["expected_step_ms"], profile["realtime_factor"]
    if profile["mode"] == "cpu":
        return f"~{step:g} ms (16 CPU threads): {factor}x, **not real time**"
    return f"{step:g} ms on an H200 (lower bound): {factor}x, real time"


def table() -> str:
    rows = [
        "| host GPU | CC | memory | mode | precision | torch build | flags | peak memory "
        "| Moshi 7B per 80 ms frame |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cc, memory in HOSTS:
        profile = moshi_recommend(cc, memory)
        flags = " ".join([*(f"{k}={v}" for k, v in profile["env"].items()), *profile["server_args"]])
        rows.append(
            f"| {name} | {cc or '-'} | {f'{memory / 1024:.0f} GiB' if memory else '-'} | {profile['mode']} "
            f"| {profile['precision']} | {torch_build_name(profile)} | `{flags}` "
            f"| {profile['peak_gib']} GiB | {speed(profile)} |"
        )
    return "\n".join(rows) + "\n\n" + NOTE


def embed(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", nargs="*", type=Path, default=[])
    args = parser.parse_args(argv)
    if not args.write:
        print(table())
    for path in args.write:
        path.write_text(embed(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
