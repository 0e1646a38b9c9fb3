"""Behaviour of a converged moshi_server host: service, hardening, offline start, real protocol."""

import json
import shlex

testinfra_hosts = ["ansible://moshi_servers"]

PYTHON = "/opt/moshi/venv/bin/python"
TOOLS = "PYTHONPATH=/opt/moshi/lib"


def main_pid(host) -> int:
    pid = int(host.check_output("systemctl show -p MainPID --value moshi-server"))
    assert pid > 0, "moshi-server has no main process"
    return pid


def unit_property(host, name: str) -> str:
    return host.check_output(f"systemctl show -p {name} --value moshi-server")


def test_service_is_enabled_and_running(host):
    service = host.service("moshi-server")
    assert service.is_enabled
    assert service.is_running


def test_runs_as_dedicated_user_with_hardening(host):
    pid = main_pid(host)
    assert host.check_output(f"ps -o user= -p {pid}") == "moshi"
    assert unit_property(host, "ProtectSystem") == "strict"
    assert unit_property(host, "ProtectHome") == "yes"
    assert unit_property(host, "NoNewPrivileges") == "yes"
    assert unit_property(host, "PrivateTmp") == "yes"
    assert unit_property(host, "Restart") == "on-failure"
    assert unit_property(host, "CapabilityBoundingSet") == ""
    # What the process sees (its own mount table): venv, model and config read-only, state writable.
    mounts = [line.split() for line in host.check_output(f"cat /proc/{pid}/mountinfo").splitlines()]

    def writable(path: str) -> bool:
        covering = max(
            (m for m in mounts if path == m[4] or path.startswith(m[4].rstrip("/") + "/")),
            key=lambda m: len(m[4]),
        )
        return "rw" in covering[5].split(",")

    for path in ("/opt/moshi/venv", "/opt/moshi/model", "/etc/moshi-server", "/home"):
        assert not writable(path), path
    assert writable("/var/lib/moshi-server")


def test_service_environment_is_offline_and_never_disables_cuda_graphs(host):
    environ = host.check_output(f"tr '\\0' '\\n' < /proc/{main_pid(host)}/environ").splitlines()
    env = dict(line.split("=", 1) for line in environ if "=" in line)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["NO_TORCH_COMPILE"] == "1"  # CPU mode: no inductor C++ compile at warmup
    assert env["OMP_NUM_THREADS"] == "1"
    assert "NO_CUDA_GRAPH" not in env
    assert "NO_CUDA_GRAPH" not in host.file("/etc/moshi-server/moshi-server.env").content_string
    exec_start = unit_property(host, "ExecStart")
    assert "--static none" in exec_start and "--device cpu" in exec_start


def test_stable_python_runs_the_deployed_environment(host):
    show = "import moshi, torch; print(moshi.__version__, torch.__version__, torch.cuda.is_available())"
    out = host.check_output(f"{PYTHON} -c '{show}'")
    assert out.split() == ["0.2.13", "2.13.0+cpu", "False"]


def test_q8_loader_fix_is_applied(host):
    out = host.run(f"{TOOLS} {PYTHON} -m moshi_tools.q8_patch --check")
    assert out.rc == 0, out.stderr
    assert out.stdout.strip().endswith("patched by moshi_tools")


def test_websocket_route_answers_400_to_plain_http(host):
    fetch = (
        "import urllib.request, urllib.error\n"
        "try: urllib.request.urlopen('http://127.0.0.1:8998/api/chat', timeout=5)\n"
        "except urllib.error.HTTPError as e: print(e.code)"
    )
    assert host.check_output(f"python3 -c {shlex.quote(fetch)}") == "400"


def test_real_protocol_handshake_then_audio_and_text(host):
    out = host.run(f"{TOOLS} {PYTHON} -m moshi_tools.probe --url ws://127.0.0.1:8998/api/chat --frames 25")
    result = json.loads(out.stdout)
    assert result["handshake"] is True
    assert result["frames_sent"] == 25
    assert result["audio_messages"] >= 20, result
    assert result["text_messages"] >= 1, result
    assert out.rc == 0


def test_moshi_bench_measures_the_service_configuration(host):
    out = host.run("moshi-bench --warmup 2 --frames 10 --json")
    assert out.rc == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] is True
    assert result["env_file"] == "/etc/moshi-server/moshi-server.env"
    assert result["model"] == "/opt/moshi/model"
    assert result["device"] == "cpu"
    assert result["median_ms"] > 0 and result["realtime_factor"] > 0
    assert result["compile"] is False  # NO_TORCH_COMPILE=1, read from the service's env file
    assert result["threads"] == 1  # OMP_NUM_THREADS=1, likewise
    assert "NO_CUDA_GRAPH" not in result["env"]
