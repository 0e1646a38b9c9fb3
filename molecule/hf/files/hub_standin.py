"""A stand-in for the Hugging Face hub, for the `hf` Molecule scenario (stdlib only, Python >= 3.9).

Serves the model repos under ROOT (``ROOT/ORG/NAME/FILE``) on the routes huggingface_hub uses:

- ``GET /api/models/ORG/NAME/revision/REV``: the repo's info (``sha``, ``siblings``, ``gated``);
- ``HEAD`` and ``GET /ORG/NAME/resolve/REV/FILE``: the file, with ``ETag`` (its sha256),
  ``X-Repo-Commit`` and ``Content-Length`` (``Range: bytes=N-`` answered with 206).

REV is ``main`` or the repo's commit (a sha1 of its file list); any other is 404 ``RevisionNotFound``.
An unknown repo is 401 ``RepoNotFound``, as on the hub. ``--gated ORG/NAME=TOKEN`` makes a repo
gated: its info stays public, its files answer 401 ``GatedRepo`` without a token. A bearer token
that is none of the gated tokens gets 401 "Invalid credentials in Authorization header" on every
route, as the hub answers a wrong token. Each request is appended to ``--log`` as one JSON line
(method, path, status, and whether a token came: never the token).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

INFO = re.compile(r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
INVALID = "Invalid credentials in Authorization header"


class Hub:
    def __init__(self, root: Path, gated: dict[str, str], log: Path | None) -> None:
        self.root = root
        self.gated = gated
        self.log = log

    def files(self, repo: str) -> list[str] | None:
        base = self.root / repo
        if not base.is_dir() or ".." in repo:
            return None
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def commit(self, repo: str) -> str:
        listing = "\n".join(
            f"{name}:{(self.root / repo / name).stat().st_size}" for name in self.files(repo) or []
        )
        return hashlib.sha1(f"{repo}\n{listing}".encode()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else None

    def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self.hub.log is not None:
            entry = {
                "method": self.command,
                "path": self.path,
                "status": status,
                "token": self._token() is not None,
            }
            with self.hub.log.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._answer(status, body, headers)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        token = self._token()
        if token is not None and token not in self.hub.gated.values():
            self._error(401, "", INVALID)
            return
        path = self.path.split("?", 1)[0]
        info, resolve = INFO.match(path), RESOLVE.match(path)
        match = info or resolve
        if match is None:
            self._error(404, "", "no such route")
            return
        repo, revision = match.group(1), match.group(2)
        files = self.hub.files(repo)
        if files is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return
        commit = self.hub.commit(repo)
        if revision not in ("main", commit):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return
        gate = self.hub.gated.get(repo)
        if info is not None:
            body = {
                "_id": commit[:24],
                "id": repo,
                "modelId": repo,
                "sha": commit,
                "private": False,
                "gated": "manual" if gate else False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": name} for name in files],
            }
            self._answer(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
            return
        if gate is not None and token != gate:
            self._error(
                401,
                "GatedRepo",
                f"Access to model {repo} is restricted. You must be authenticated to access it.",
            )
            return
        name = match.group(3)
        if name not in files:
            self._error(404, "EntryNotFound", f"{name} does not exist on {revision}")
            return
        data = (self.hub.root / repo / name).read_bytes()
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": '"' + hashlib.sha256(data).hexdigest() + '"',
            "X-Repo-Commit": commit,
            "Accept-Ranges": "bytes",
        }
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if ranged is not None and self.command == "GET":
            start = min(int(ranged.group(1)), len(data))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._answer(206, data[start:], headers)
            return
        headers["Content-Length"] = str(len(data))
        self._answer(200, data, headers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hub-standin")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--gated", action="append", default=[], metavar="ORG/NAME=TOKEN")
    parser.add_argument("--log", type=Path)
    args = parser.parse_args(argv)
    gated = dict(item.split("=", 1) for item in args.gated)
    Handler.hub = Hub(args.root, gated, args.log)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"hub stand-in on http://{args.host}:{server.server_port}, root {args.root}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
