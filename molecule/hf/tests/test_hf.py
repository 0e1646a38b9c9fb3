"""The `hf` model path against the hub stand-in: the converged fetch, then the gated repo through the
role as an operator runs it (no token, a wrong token, the right token). Tests run in file order."""

import hashlib
import json

from playbook_runner import PROJECT, run_playbook

testinfra_hosts = ["ansible://hf-host"]

MODEL_SET = PROJECT / "build" / "models" / "tiny-bf16"
MODEL_DIR = "/opt/moshi/model"
PUBLIC = "kyutai-test/tiny-moshi"
GATED = "kyutai-test/tiny-moshi-gated"
GOOD_TOKEN = "hf_molecule_gated_4f1c9a0e7b"  # prepare.yml's hub_standin_gated_token
WRONG_TOKEN = "hf_wrong_d3adb33f0000"
PLAYBOOK = PROJECT / "playbooks" / "moshi.yml"
PROBE = (
    "PYTHONPATH=/opt/moshi/lib /opt/moshi/venv/bin/python -m moshi_tools.probe "
    "--url ws://127.0.0.1:8998/api/chat --frames 5"
)


def hub_log(host) -> list[dict]:
    return [json.loads(line) for line in host.file("/var/log/hub-standin.jsonl").content_string.splitlines()]


def fetched_files_match(host) -> None:
    for path in sorted(MODEL_SET.iterdir()):
        remote = host.check_output(f"sha256sum {MODEL_DIR}/{path.name}").split()[0]
        assert remote == hashlib.sha256(path.read_bytes()).hexdigest(), path.name


def probe(host) -> dict:
    """moshi_tools.probe's JSON (its exit code also wants text from the model: not needed here)."""
    return json.loads(host.run(PROBE).stdout)


def stamp(host) -> str:
    return host.file(f"{MODEL_DIR}/.fetched").content_string


def fetch_through_the_role(**extra_vars):
    """playbooks/moshi.yml with the gated repo (and a token, if given); its whole output returned."""
    return run_playbook(PLAYBOOK, extra_vars={"moshi_server_model_hf_repo": GATED, **extra_vars})


def test_converge_fetched_every_file_from_the_stand_in(host):
    log = hub_log(host)
    info = {"method": "GET", "path": f"/api/models/{PUBLIC}/revision/main", "status": 200, "token": False}
    assert info in log
    files = [e["path"] for e in log if e["method"] == "GET" and "/resolve/" in e["path"]]
    downloaded = {path.rsplit("/", 1)[1] for path in files}
    assert downloaded == {p.name for p in MODEL_SET.iterdir()}
    fetched_files_match(host)
    assert stamp(host) == f"{PUBLIC}@main\n"


def test_moshi_serves_the_fetched_model(host):
    assert host.service("moshi-server").is_running
    assert probe(host)["handshake"] is True


def test_gated_repo_without_a_token_names_the_cause(host):
    result = fetch_through_the_role()
    assert result.returncode != 0, result.stdout
    assert f"{GATED} is a gated repo and no token was given (HTTP 401)" in result.stdout
    assert "moshi_server_hf_token" in result.stdout
    assert GOOD_TOKEN not in result.stdout
    # Nothing was claimed: the public repo's files and stamp stay, Moshi keeps serving them.
    assert stamp(host) == f"{PUBLIC}@main\n"
    fetched_files_match(host)
    assert host.service("moshi-server").is_running


def test_wrong_token_is_named_and_never_printed(host):
    result = fetch_through_the_role(moshi_server_hf_token=WRONG_TOKEN)
    assert result.returncode != 0, result.stdout
    assert "the hub refused the token (HTTP 401, invalid credentials)" in result.stdout
    assert WRONG_TOKEN not in result.stdout
    assert GOOD_TOKEN not in result.stdout
    assert stamp(host) == f"{PUBLIC}@main\n"
    entries = [e for e in hub_log(host) if e["token"]]
    assert entries and all(e["status"] == 401 for e in entries)


def test_right_token_fetches_the_gated_repo(host):
    before = len(hub_log(host))
    result = fetch_through_the_role(moshi_server_hf_token=GOOD_TOKEN)
    assert result.returncode == 0, result.stdout
    assert GOOD_TOKEN not in result.stdout
    assert stamp(host) == f"{GATED}@main\n"
    fetched_files_match(host)
    # Same bytes as the public repo's: huggingface_hub keeps them after a HEAD per file (same ETag).
    gated = [e for e in hub_log(host)[before:] if f"/{GATED}/resolve/" in e["path"]]
    assert {e["path"].rsplit("/", 1)[1] for e in gated} == {p.name for p in MODEL_SET.iterdir()}
    assert all(e["token"] and e["status"] == 200 for e in gated), gated
    assert host.service("moshi-server").is_running
    assert probe(host)["handshake"] is True
