"""``python -m voice_engine.fetch`` (the role's ``hf`` model source) against a Hugging Face hub stand-in.

The stand-in is a real HTTP server answering the two calls ``huggingface_hub.snapshot_download`` makes:
the revision's file list (``/api/models/REPO/revision/REV``) and each file (``/REPO/resolve/REV/FILE``,
HEAD then GET). The fetch runs as a subprocess with ``HF_ENDPOINT`` pointing at it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = "kyutai/stt-tiny"
SHA = "0123456789abcdef0123456789abcdef01234567"
FILES = {"config.json": b'{"tiny": true}\n', "model.safetensors": b"weights" * 100, "notes.bin": b"skip"}


class Hub(ThreadingHTTPServer):
    requests: list[str]


class Handler(BaseHTTPRequestHandler):
    server: Hub

    def _file(self) -> bytes | None:
        prefix = f"/{REPO}/resolve/"
        if not self.path.startswith(prefix):
            return None
        name = self.path[len(prefix) :].split("/", 1)[-1]
        return FILES.get(name)

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _resolve(self, head: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        if self.path.startswith(f"/api/models/{REPO}/revision/"):
            listing = {"id": REPO, "sha": SHA, "siblings": [{"rfilename": name} for name in FILES]}
            self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, head)
            return
        body = self._file()
        if body is None:
            self._send(
                404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepositoryNotFound"}, head
            )
            return
        etag = '"' + hashlib.sha256(body).hexdigest() + '"'
        self._send(200, body, {"X-Repo-Commit": SHA, "ETag": etag}, head)

    def do_HEAD(self) -> None:
        self._resolve(head=True)

    def do_GET(self) -> None:
        self._resolve(head=False)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def hub() -> Iterator[Hub]:
    server = Hub(("127.0.0.1", 0), Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def fetch(hub: Hub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "voice_engine.fetch", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_fetches_once_and_then_finds_it_present(hub: Hub, tmp_path: Path):
    dest = tmp_path / "stt"
    first = fetch(hub, tmp_path, "--repo", REPO, "--dest", str(dest))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "fetched"
    assert (dest / "config.json").read_bytes() == FILES["config.json"]
    assert (dest / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert not (dest / "notes.bin").exists()  # only what the engine reads
    asked = len(hub.requests)

    again = fetch(hub, tmp_path, "--repo", REPO, "--dest", str(dest))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "present"
    assert len(hub.requests) == asked  # the stamp answers: the hub is not asked again

    other = fetch(hub, tmp_path, "--repo", REPO, "--dest", str(dest), "--pattern", "*.json")
    assert other.stdout.strip() == "fetched"  # other patterns: fetched again


def test_a_missing_repo_is_one_clear_line(hub: Hub, tmp_path: Path):
    result = fetch(hub, tmp_path, "--repo", "kyutai/nope", "--dest", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr.startswith("voice-engine-fetch: could not fetch kyutai/nope@main: HTTP 404")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "nope" / ".fetched").exists()


def test_a_failed_fetch_over_an_earlier_one_writes_no_stamp(hub: Hub, tmp_path: Path):
    """The files of an earlier fetch stay, but nothing claims the new repo was fetched."""
    dest = tmp_path / "stt"
    assert fetch(hub, tmp_path, "--repo", REPO, "--dest", str(dest)).returncode == 0
    (dest / ".fetched").unlink()  # as if another repo or revision were asked for next
    result = fetch(hub, tmp_path, "--repo", "kyutai/nope", "--dest", str(dest))
    assert result.returncode == 1
    assert result.stdout.strip() != "fetched"
    assert not (dest / ".fetched").exists()


def _tgz(members: dict[str, bytes], link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def test_extract_unpacks_a_voices_archive_once(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """As PersonaPlex's repository ships its voices: voices.tgz holding voices/NAME.pt."""
    monkeypatch.setitem(FILES, "voices.tgz", _tgz({"voices/NATF2.pt": b"pt", "voices/NATM0.wav": b"wav"}))
    dest = tmp_path / "voices"
    args = ("--repo", REPO, "--dest", str(dest), "--pattern", "voices.tgz", "--extract", "voices.tgz")
    first = fetch(hub, tmp_path, *args)
    assert first.returncode == 0, first.stderr
    assert (dest / "voices" / "NATF2.pt").read_bytes() == b"pt"
    assert (dest / "voices" / "NATM0.wav").read_bytes() == b"wav"
    assert fetch(hub, tmp_path, *args).stdout.strip() == "present"


def test_extract_refuses_links_and_escapes(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for bad in ({"../outside.pt": b"x"}, {"voices/ok.pt": b"x", "link": None}):
        files = {k: v for k, v in bad.items() if v is not None}
        monkeypatch.setitem(
            FILES, "voices.tgz", _tgz(files, link="voices/link.pt" if "link" in bad else None)
        )
        dest = tmp_path / "v"
        result = fetch(
            hub,
            tmp_path,
            "--repo",
            REPO,
            "--dest",
            str(dest),
            "--pattern",
            "voices.tgz",
            "--extract",
            "voices.tgz",
        )
        assert result.returncode == 1
        assert (
            result.stderr.strip()
            .splitlines()[-1]
            .startswith("voice-engine-fetch: kyutai/stt-tiny@main: voices.tgz: refused to unpack")
        )
        assert not (tmp_path / "outside.pt").exists()
        assert not (dest / "voices" / "ok.pt").exists()  # nothing unpacked
        assert not (dest / ".fetched").exists()
