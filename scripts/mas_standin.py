"""A stand-in for the external MAS orchestrator, an echo agent: a real HTTP server (a systemd unit) for
the multihost scenario and for `make demo` (playbooks/demo-mas.yml, the demo inventory only).

POST /api/chat with {"session_id", "text", "source"} answers a MAS-shaped reply and appends the
request to a JSON-lines log, so tests can see what the bridge sent. GET /health answers 200.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOG = Path("/var/lib/mas-standin/requests.jsonl")


class Handler(BaseHTTPRequestHandler):
    def _reply(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/api/chat":
            self._reply(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        with LOG.open("a", encoding="utf-8") as log:
            log.write(json.dumps(request) + "\n")
        self._reply(
            200,
            {
                "response": f"MAS heard: {request.get('text', '')}",
                "tool_calls": [{"name": "lookup", "arguments": {"q": request.get("text", "")}}],
                "agent_activity": [{"agent": "standin", "state": "done"}],
                "memory": [],
            },
        )

    def log_message(self, format: str, *args: object) -> None:
        return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    LOG.parent.mkdir(parents=True, exist_ok=True)
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
