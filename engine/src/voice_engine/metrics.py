"""Prometheus text exposition (version 0.0.4): counters kept here, gauges read from the modules."""

from __future__ import annotations

from collections.abc import Iterable

Labels = tuple[tuple[str, str], ...]

COUNTERS: dict[str, str] = {
    "voice_engine_sessions_total": "Websocket sessions, by module and outcome (served, full, unauthorized).",
    "voice_engine_client_errors_total": "Error messages sent to clients for bad input, by module and reason.",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Metrics:
    def __init__(self) -> None:
        self._values: dict[tuple[str, Labels], float] = {}

    def inc(self, name: str, labels: Labels, value: float = 1.0) -> None:
        assert name in COUNTERS, name
        key = (name, labels)
        self._values[key] = self._values.get(key, 0.0) + value

    def get(self, name: str, labels: Labels) -> float:
        return self._values.get((name, labels), 0.0)

    def render(self, gauges: Iterable[tuple[str, str, str, list[tuple[Labels, float]]]]) -> str:
        """``gauges``: (name, type, help, samples) read at scrape time."""
        lines: list[str] = []
        for name, kind, help_text, samples in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{render_labels(lb)} {value:g}" for lb, value in samples]
        for name, help_text in COUNTERS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines += [
                f"{n}{render_labels(lb)} {v:g}" for (n, lb), v in sorted(self._values.items()) if n == name
            ]
        return "\n".join(lines) + "\n"
