"""The diagnose table (plugins/filter/diagnose_table.py): one row per host, columns padded, '|' kept out."""

from __future__ import annotations

from diagnose_table import FilterModule, diagnose_row, diagnose_table


def test_diagnose_row_and_table():
    diagnosis = {
        "gpu": True,
        "torch_build": "torch==2.9.1 from cpu",
        "compile_ok": False,
        "bf16_ok": False,
        "q8_ok": False,
        "largest_precision": None,
        "realtime_factors": {"cpu/bf16": 10.25},
        "recommended_mode": "cpu",
        "recommended_precision": "bf16",
        "recommended_realtime": False,
        "inventory": "gpu/fp16",
        "blockers": ["the model needs about 16.3 GiB | more"],
    }
    runtime = {
        "is_wsl2": False,
        "gpu_present": True,
        "gpu_name": "GeForce GTX 1080 Ti",
        "gpu_compute_capability": "6.1",
        "gpu_compute_capability_source": "name table",
        "gpu_memory_mib": 11264,
        "driver_version": "470.256.02",
    }
    row = diagnose_row(diagnosis, "gpu01", "Ubuntu 22.04", runtime)
    assert row[:7] == [
        "gpu01",
        "Ubuntu 22.04",
        "native",
        "GeForce GTX 1080 Ti",
        "6.1 (name table)",
        "11264 MiB",
        "470.256.02",
    ]
    assert row[7:] == [
        "torch==2.9.1 from cpu",
        "no",
        "no",
        "no",
        "none",
        "cpu/bf16 10.25x",
        "cpu/bf16 (NOT real time)",
        "gpu/fp16",
        "the model needs about 16.3 GiB | more",
        "-",
    ]
    lines = diagnose_table([row]).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("| host ")
    assert set(lines[1]) == {"|", "-"}
    assert lines[2].startswith("| gpu01 ")
    assert lines[2].count("|") == lines[0].count("|")  # a '|' inside a cell does not add a column
    assert len({len(line) for line in lines}) == 1


def test_filters_are_registered_for_ansible():
    assert FilterModule().filters() == {"diagnose_row": diagnose_row, "diagnose_table": diagnose_table}
