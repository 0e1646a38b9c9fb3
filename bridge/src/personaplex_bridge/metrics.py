"""Counters and summaries, rendered by hand in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]

# name -> (type, help, label). Only metrics declared here are rendered; a metric without a label is
# rendered as 0 before its first update.
DECLARED: dict[str, tuple[str, str, str | None]] = {
    "bridge_sessions_total": ("counter", "Client sessions accepted.", None),
    "bridge_rejected_total": ("counter", "Connections refused before the websocket opened.", "reason"),
    "bridge_client_frames_total": ("counter", "Frames received from clients.", "kind"),
    "bridge_client_errors_total": ("counter", "Error events sent to clients.", "code"),
    "bridge_dropped_frames_total": ("counter", "Frames dropped by the bridge.", "reason"),
    "bridge_voice_sessions_total": ("counter", "Voice session attempts.", "outcome"),
    "bridge_moshi_frames_total": ("counter", "Frames relayed from Moshi to clients.", "kind"),
    "bridge_degraded_total": ("counter", "Sessions degraded to text mode.", "component"),
    "bridge_mas_requests_total": ("counter", "MAS calls.", "outcome"),
    "bridge_mas_request_seconds": ("summary", "Duration of MAS calls that reached the MAS.", None),
    "bridge_tts_turns_total": (
        "counter",
        "Spoken replies: done, or the reason they were skipped.",
        "outcome",
    ),
    "bridge_tts_frames_total": ("counter", "Ogg/Opus frames relayed from the TTS to clients.", None),
    "bridge_asr_sessions_total": (
        "counter",
        "STT streams of agent voice sessions: ready, busy, down, no_backend, or lost mid-session.",
        "outcome",
    ),
    "bridge_asr_audio_seconds_total": (
        "counter",
        "Seconds of client audio (and flush silence) sent to the STT.",
        None,
    ),
    "bridge_asr_messages_total": ("counter", "Messages received from the STT.", "kind"),
    "bridge_voice_turns_total": ("counter", "Ends of spoken user turns: sent to MAS, or empty.", "outcome"),
    "bridge_turn_flush_seconds": ("summary", "From a detected end of turn to the STT's flush Marker.", None),
    "bridge_chat_voice_sessions_total": (
        "counter",
        "Chat reply voice connections of agent voice sessions: ready, or why the TTS speaks instead.",
        "outcome",
    ),
    "bridge_reply_voice_fallback_total": (
        "counter",
        "Replies or sessions of the chat reply voice spoken by the TTS instead, by reason.",
        "reason",
    ),
    "bridge_barge_in_total": ("counter", "Spoken replies stopped because the user spoke.", None),
    "bridge_barge_in_seconds": (
        "summary",
        "From the first loud chunk of the user's speech to the stop.",
        None,
    ),
}


@dataclass(frozen=True)
class Gauge:
    """A value read at scrape time."""

    name: str
    help: str
    samples: tuple[tuple[Labels, float], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _fmt_value(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Metrics:
    """In-process counters; cheap to update from the hot path (a dict lookup and an add)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, Labels], float] = {}
        self._keys: dict[tuple[str, str | None], tuple[str, Labels]] = {}

    def inc(self, name: str, labels: Labels = (), value: float = 1.0) -> None:
        key = (name, labels)
        self._values[key] = self._values.get(key, 0.0) + value

    def count(self, name: str, label_value: str | None = None, value: float = 1.0) -> None:
        """Add to a declared counter, giving only the value of its one label (if it has one)."""
        key = self._keys.get((name, label_value))
        if key is None:
            label = DECLARED[name][2]
            labels: Labels = ((label, label_value),) if label is not None and label_value is not None else ()
            key = self._keys[(name, label_value)] = (name, labels)
        values = self._values
        values[key] = values.get(key, 0.0) + value

    def value(self, name: str, label_value: str | None = None) -> float:
        label = DECLARED[name][2]
        labels: Labels = ((label, label_value),) if label is not None and label_value is not None else ()
        return self.get(name, labels)

    def observe(self, name: str, seconds: float, labels: Labels = ()) -> None:
        self.inc(name + "_sum", labels, seconds)
        self.inc(name + "_count", labels)

    def get(self, name: str, labels: Labels = ()) -> float:
        return self._values.get((name, labels), 0.0)

    def render(self, gauges: Iterable[Gauge] = ()) -> str:
        lines: list[str] = []
        for gauge in gauges:
            lines.append(f"# HELP {gauge.name} {gauge.help}")
            lines.append(f"# TYPE {gauge.name} gauge")
            lines.extend(f"{gauge.name}{_fmt_labels(lb)} {_fmt_value(v)}" for lb, v in gauge.samples)
        for name, (kind, help_text, label) in DECLARED.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for suffix in ("_sum", "_count") if kind == "summary" else ("",):
                series = name + suffix
                samples = sorted((lb, v) for (n, lb), v in self._values.items() if n == series)
                if not samples and label is None:
                    samples = [((), 0.0)]
                lines.extend(f"{series}{_fmt_labels(lb)} {_fmt_value(v)}" for lb, v in samples)
        return "\n".join(lines) + "\n"
