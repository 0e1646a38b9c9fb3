"""Guard (issue 7): the role's real env file and unit, rendered for every mode/GPU profile.

No rendered unit or environment file may set NO_CUDA_GRAPH (it makes a GPU 6-10x slower than real
time, field notes section 2), and every Pascal profile must set NO_TORCH_COMPILE=1 (Triton needs
CC >= 7.0) and pass --half (no bf16 below CC 8.0).

The templates are rendered by ansible-core's own Templar with the role's defaults and vars and our
filter plugin, the way the template module renders them (trim_blocks on).
"""

from __future__ import annotations

import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from moshi_tools.bench import parse_env_file

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "moshi_server"
FILTERS = ROOT / "plugins" / "filter"

# name: (mode, precision, compute capability, GPU memory MiB)
PROFILES: dict[str, tuple[str, str, str | None, int | None]] = {
    "cpu-bf16": ("cpu", "bf16", None, None),
    "cpu-q8": ("cpu", "q8", None, None),
    "gtx1080ti-24g-fp16": ("gpu", "fp16", "6.1", 24576),
    "tesla-p40-fp16": ("gpu", "fp16", "6.1", 24576),
    "v100-32g-fp16": ("gpu", "fp16", "7.0", 32768),
    "rtx2080ti-q8": ("gpu", "q8", "7.5", 11264),
    "rtx5090-bf16": ("gpu", "bf16", "12.0", 32607),
    "h100-bf16": ("gpu", "bf16", "9.0", 81559),
    "h100-fp16": ("gpu", "fp16", "9.0", 81559),
    "h100-q8": ("gpu", "q8", "9.0", 81559),
}


@cache
def _base_vars() -> dict[str, Any]:
    from ansible.parsing.dataloader import DataLoader

    loader = DataLoader()
    variables: dict[str, Any] = {}
    for name in ("defaults/main.yml", "vars/main.yml"):
        variables.update(loader.load_from_file(str(ROLE / name), trusted_as_template=True))
    return variables


def render(
    mode: str, precision: str, cc: str | None, memory_mib: int | None, nproc: int = 16, **extra: Any
) -> dict[str, Any]:
    """Render the env file and the unit for one host; also return the profile the role computed."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import filter_loader
    from ansible.template import Templar, trust_as_template

    filter_loader.add_directory(str(FILTERS))
    variables = dict(_base_vars())
    variables.update(
        ansible_managed="Ansible managed",
        ansible_facts={"processor_nproc": nproc},
        moshi_server_mode=mode,
        moshi_server_precision=precision,
        moshi_server_gpu_compute_capability=cc,
        moshi_server_gpu_memory_mib=memory_mib,
        **extra,
    )
    templar = Templar(loader=DataLoader(), variables=variables)
    out: dict[str, Any] = {}
    for key, name in (("env", "moshi-server.env.j2"), ("unit", "moshi-server.service.j2")):
        source = trust_as_template((ROLE / "templates" / name).read_text(encoding="utf-8"))
        out[key] = templar.template(source, escape_backslashes=False, overrides={"trim_blocks": True})
    out["profile"] = templar.template(trust_as_template("{{ _moshi_server_profile }}"))
    return out


def env_assignments(text: str) -> dict[str, str]:
    """The env file as systemd reads it: the project's one parser (moshi_tools.bench, the bench's
    --env-file), which refuses any line that is not KEY=VALUE."""
    return parse_env_file(text, "the rendered env file")


def unit_settings(text: str) -> list[tuple[str, str]]:
    settings = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


@pytest.fixture(scope="module", params=sorted(PROFILES))
def rendered(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"name": request.param, **render(*PROFILES[request.param])}


def test_profile_is_deployable(rendered: dict[str, Any]):
    # The matrix holds real, accepted configurations: preflight would refuse one with problems.
    assert rendered["profile"]["problems"] == []


def test_no_rendered_file_sets_no_cuda_graph(rendered: dict[str, Any]):
    env = env_assignments(rendered["env"])
    assert "NO_CUDA_GRAPH" not in env
    for key, value in unit_settings(rendered["unit"]):
        # Neither Environment=, nor ExecStart (e.g. `env NO_CUDA_GRAPH=1 ...`), nor anything else.
        assert "NO_CUDA_GRAPH" not in f"{key}={value}", f"{rendered['name']}: {key}={value}"


def test_pascal_profiles_disable_compile_and_run_in_fp16(rendered: dict[str, Any]):
    profile = rendered["profile"]
    cc = PROFILES[rendered["name"]][2]
    is_pascal = cc is not None and 6.0 <= float(cc) < 7.0
    assert (profile["family"] == "pascal") is is_pascal
    if not is_pascal:
        return
    assert env_assignments(rendered["env"]).get("NO_TORCH_COMPILE") == "1"
    exec_start = dict(unit_settings(rendered["unit"]))["ExecStart"]
    argv = shlex.split(exec_start)
    assert "--half" in argv
    assert argv[argv.index("--device") + 1] == "cuda"


def test_unit_reads_the_env_file_and_passes_the_profile_args(rendered: dict[str, Any]):
    mode, precision, _, _ = PROFILES[rendered["name"]]
    settings = dict(unit_settings(rendered["unit"]))
    assert settings["EnvironmentFile"] == _base_vars()["_moshi_server_env_file"]
    argv = shlex.split(settings["ExecStart"])
    assert argv[argv.index("--device") + 1] == ("cuda" if mode == "gpu" else "cpu")
    assert ("--half" in argv) is (precision == "fp16")


def test_matrix_covers_the_issue_profiles():
    families = {render(*spec)["profile"]["family"] for spec in PROFILES.values()}
    assert families == {"cpu", "pascal", "volta-or-newer"}
    assert "NO_CUDA_GRAPH" in _base_vars()["_moshi_server_forbidden_env"]


def test_guard_detects_a_forbidden_setting():
    # The checks above would see NO_CUDA_GRAPH if anything rendered it: here extra env does.
    poisoned = render("gpu", "bf16", "9.0", 81559, moshi_server_extra_env={"NO_CUDA_GRAPH": "1"})
    assert env_assignments(poisoned["env"])["NO_CUDA_GRAPH"] == "1"
