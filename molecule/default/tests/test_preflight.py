"""Preflight: an impossible setting stops the play with the fix, and the host is left unchanged."""

import pytest
from playbook_runner import PROJECT, run_playbook

testinfra_hosts = ["ansible://moshi_servers"]


def main_pid(host) -> int:
    return int(host.check_output("systemctl show -p MainPID --value moshi-server"))


@pytest.mark.parametrize(
    ("extra_vars", "expected"),
    [
        (
            {
                "moshi_server_mode": "gpu",
                "moshi_server_gpu_compute_capability": "6.1",
                "moshi_server_gpu_memory_mib": 11264,
                "moshi_server_model_params_billion": 7.69,
            },
            "set moshi_server_precision=fp16",
        ),
        ({"moshi_server_mode": "gpu"}, "no GPU is known on this host"),
        ({"moshi_server_extra_env": {"NO_CUDA_GRAPH": "1"}}, "never set NO_CUDA_GRAPH"),
        ({"moshi_server_precision": "int4"}, "moshi_server_precision"),
    ],
    ids=["bf16-on-pascal", "gpu-without-gpu", "no-cuda-graph", "unknown-precision"],
)
def test_preflight_refuses_impossible_settings_and_changes_nothing(host, extra_vars, expected):
    watched = "/etc/moshi-server/moshi-server.env /etc/systemd/system/moshi-server.service"
    before = host.check_output(f"sha256sum {watched}")
    pid = main_pid(host)
    result = run_playbook(PROJECT / "site.yml", extra_vars=extra_vars)
    assert result.returncode != 0
    assert expected in result.stdout
    assert host.check_output(f"sha256sum {watched}") == before
    assert main_pid(host) == pid
