"""Settings: environment variables (and matching CLI flags) turned into one typed, validated object.

Every setting has an environment variable ``BRIDGE_*`` and a flag ``--*``; a flag wins over the
variable. A bad value raises :class:`ConfigError`, whose text names the variable, so that
``personaplex-bridge`` can exit with one clear line.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn
from urllib.parse import urlsplit

from . import prompts
from .prompts import ReplyVoice


class ConfigError(ValueError):
    """A setting is missing or invalid. ``str()`` is one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    """Everything the bridge reads at start. Field ``x`` comes from ``BRIDGE_X`` or ``--x``."""

    mas_url: str
    host: str = "0.0.0.0"
    port: int = 8999
    moshi_urls: tuple[str, ...] = ()
    moshi_key: str | None = None
    mas_health_url: str | None = None
    mas_timeout_s: float = 15.0
    mas_backoff_s: float = 1.0
    mas_backoff_max_s: float = 30.0
    mas_max_reply_bytes: int = 256 * 1024
    mas_request_fields: tuple[tuple[str, str], ...] = ()
    mas_reply_fields: tuple[tuple[str, str], ...] = ()
    tts_url: str | None = None
    tts_voice: str = ""
    tts_key: str | None = None
    tts_timeout_s: float = 5.0
    tts_max_s: float = 120.0
    asr_url: str | None = None
    asr_key: str | None = None
    asr_timeout_s: float = 5.0
    asr_pause_threshold: float = 0.6
    asr_pause_head: int = 2
    asr_min_silence_s: float = 0.3
    asr_silence_dbfs: float = -45.0
    asr_flush_s: float = 0.5
    asr_barge_in_threshold: float = 0.4
    playback_lead_s: float = 0.15
    duplex_moshi_to_mas: bool = False
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    token: str | None = None
    drain_timeout_s: float = 20.0
    max_sessions: int = 128
    max_frame_bytes: int = 64 * 1024
    rate_per_s: float = 25.0
    rate_burst: int = 50
    max_pending_turns: int = 4
    max_text_chars: int = 4000
    out_queue_frames: int = 128
    send_timeout_s: float = 10.0
    idle_timeout_s: float = 900.0
    heartbeat_s: float = 20.0
    probe_interval_s: float = 5.0
    probe_timeout_s: float = 2.0
    moshi_connect_timeout_s: float = 10.0
    moshi_stall_s: float = 15.0
    utterance_gap_s: float = 0.8
    voice_prompt: str | None = None
    text_prompt: str | None = None
    reply_voice: ReplyVoice = "tts"
    log_level: str = "info"

    @property
    def hard_frame_bytes(self) -> int:
        """Frames above this are refused by the websocket layer itself (close 1009), unread."""
        return 4 * self.max_frame_bytes

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-able values, secrets replaced by ``"***"`` (or ``None`` if unset)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRETS:
                value = None if value is None else "***"
            elif f.name in ("mas_request_fields", "mas_reply_fields"):
                value = dict(value)
            elif isinstance(value, (tuple, frozenset)):
                value = sorted(value) if isinstance(value, frozenset) else list(value)
            out[f.name] = value
        return out


_SECRETS = frozenset({"token", "tts_key", "asr_key", "moshi_key"})

# The MAS contract's field names, as the bridge calls them; BRIDGE_MAS_REQUEST_FIELDS and
# BRIDGE_MAS_REPLY_FIELDS map each to the MAS's own name (or dotted path). The defaults are the identity.
MAS_REQUEST_FIELDS = ("session_id", "text", "source")
MAS_REPLY_FIELDS = ("response", "tool_calls", "agent_activity", "memory")
# Fields that cannot be left out (mapped to nothing).
_MAS_REQUIRED = frozenset({"text", "response"})
_LOG_LEVELS = ("debug", "info", "warning", "error")


# --- value parsers: each takes the raw string and returns the typed value or raises ValueError ---


def _str(raw: str) -> str:
    return raw.strip()


def _optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number, got {raw!r}")
    return value


def _float_range(low: float, high: float, what: str = "a number") -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"must be {what}, got {raw!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, got {raw.strip()!r}")
        return value

    return parse


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"must be true or false (1/0, yes/no, on/off), got {raw!r}")


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(
                f"must be a {' or '.join(s + '://' for s in schemes)} URL with a host, got {value!r}"
            )
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"has an invalid port: {value!r}") from None
        return value

    return parse


def _optional_url(schemes: tuple[str, ...]) -> Callable[[str], str | None]:
    inner = _url(schemes)

    def parse(raw: str) -> str | None:
        return inner(raw) if raw.strip() else None

    return parse


def _url_list(raw: str) -> tuple[str, ...]:
    parse = _url(("ws", "wss"))
    urls = tuple(parse(item) for item in raw.split(",") if item.strip())
    if len(set(urls)) != len(urls):
        raise ValueError("lists the same URL twice")
    return urls


def _origins(raw: str) -> frozenset[str]:
    out: set[str] = set()
    for item in raw.split(","):
        origin = item.strip().rstrip("/").lower()
        if not origin:
            continue
        if origin != "*":
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
                raise ValueError(
                    f"each origin must look like https://host[:port] or be *, got {item.strip()!r}"
                )
        out.add(origin)
    return frozenset(out)


def _token(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if any(c.isspace() for c in value) or not value.isprintable():
        raise ValueError("must not contain whitespace or control characters")
    return value


def _field_map(names: tuple[str, ...]) -> Callable[[str], tuple[tuple[str, str], ...]]:
    """``ours=theirs`` pairs, comma-separated; ``theirs`` is a name or a dotted path, empty to leave out."""

    def parse(raw: str) -> tuple[tuple[str, str], ...]:
        pairs: dict[str, str] = {}
        for item in raw.split(","):
            if not item.strip():
                continue
            ours, sep, theirs = (part.strip() for part in item.partition("="))
            if not sep:
                raise ValueError(f"each item must look like NAME=FIELD, got {item.strip()!r}")
            if ours not in names:
                raise ValueError(f"{ours!r} is not one of {', '.join(names)}")
            if ours in pairs:
                raise ValueError(f"maps {ours!r} twice")
            if theirs and not all(seg.strip() and seg == seg.strip() for seg in theirs.split(".")):
                raise ValueError(f"{theirs!r} is not a field name or a dotted path (a.b)")
            if not theirs and ours in _MAS_REQUIRED:
                raise ValueError(f"{ours!r} cannot be left out")
            pairs[ours] = theirs
        paths = [theirs for ours, theirs in _merged(names, pairs) if theirs]
        for a in paths:
            for b in paths:
                if a != b and b.startswith(a + "."):
                    raise ValueError(f"{a!r} and {b!r} overlap")
            if paths.count(a) > 1:
                raise ValueError(f"two fields map to {a!r}")
        return tuple(sorted(pairs.items()))

    return parse


def _merged(names: tuple[str, ...], pairs: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(name, pairs.get(name, name)) for name in names]


def mas_field_paths(names: tuple[str, ...], pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Every field of ``names`` with the MAS's name for it (``""``: left out), the defaults filled in."""
    return dict(_merged(names, dict(pairs)))


def _optional(parse: Callable[[str], str]) -> Callable[[str], str | None]:
    def inner(raw: str) -> str | None:
        value = raw.strip()
        return parse(value) if value else None

    return inner


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}, got {raw!r}")
    return value


@dataclass(frozen=True)
class _Option:
    name: str
    parse: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        return "BRIDGE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_HTTP = ("http", "https")
_WS = ("ws", "wss")

OPTIONS: tuple[_Option, ...] = (
    _Option("host", _str, "address to listen on"),
    _Option("port", _int_range(1, 65535), "port to listen on"),
    _Option("moshi_urls", _url_list, "comma-separated Moshi websocket URLs (ws://host:8998/api/chat)"),
    _Option(
        "moshi_key", _optional_str, "key of the engines' chat modules, sent as the kyutai-api-key header"
    ),
    _Option("mas_url", _url(_HTTP), "full URL of the MAS chat endpoint (required)"),
    _Option("mas_health_url", _optional_url(_HTTP), "optional MAS health URL, probed with GET (2xx = up)"),
    _Option("mas_timeout_s", _positive_float, "timeout of one MAS call"),
    _Option("mas_backoff_s", _positive_float, "first backoff after a failed MAS call (doubles)"),
    _Option("mas_backoff_max_s", _positive_float, "longest backoff after failed MAS calls"),
    _Option("mas_max_reply_bytes", _int_range(1024, 64 * 1024 * 1024), "largest MAS reply body accepted"),
    _Option(
        "mas_request_fields",
        _field_map(MAS_REQUEST_FIELDS),
        "MAS request field names: NAME=FIELD,... (session_id, text, source; FIELD a.b nests, empty omits)",
    ),
    _Option(
        "mas_reply_fields",
        _field_map(MAS_REPLY_FIELDS),
        "MAS reply field names: NAME=FIELD,... (response, tool_calls, agent_activity, memory)",
    ),
    _Option(
        "tts_url", _optional_url(_WS), "Kyutai streaming TTS endpoint (ws://host:port/api/tts_streaming)"
    ),
    _Option("tts_voice", _str, "TTS voice; empty lets the TTS server choose"),
    _Option("tts_key", _optional_str, "TTS API key, sent as the kyutai-api-key header"),
    _Option("tts_timeout_s", _positive_float, "longest wait for the TTS to connect or send its next message"),
    _Option("tts_max_s", _positive_float, "longest spoken reply, in seconds of wall time"),
    _Option(
        "asr_url", _optional_url(_WS), "Kyutai streaming STT endpoint (ws://host:port/api/asr-streaming)"
    ),
    _Option("asr_key", _optional_str, "STT API key, sent as the kyutai-api-key header"),
    _Option(
        "asr_timeout_s", _positive_float, "longest wait for the STT to connect, be Ready, or answer audio"
    ),
    _Option("asr_pause_threshold", _float_range(0.0, 1.0), "pause prediction that ends the user's turn"),
    _Option("asr_pause_head", _int_range(0, 63), "which of the STT's pause prediction heads to use"),
    _Option("asr_min_silence_s", _float_range(0.0, 60.0, "seconds"), "silence needed to end a turn"),
    _Option(
        "asr_silence_dbfs", _float_range(-200.0, 0.0, "a dBFS level"), "level below which audio is silence"
    ),
    _Option("asr_flush_s", _float_range(0.0, 10.0, "seconds"), "silence sent to flush the STT at turn end"),
    _Option(
        "asr_barge_in_threshold", _float_range(0.0, 1.0), "pause prediction below which speech interrupts"
    ),
    _Option("playback_lead_s", _float_range(0.0, 10.0, "seconds"), "lead of agent-mode replies on real time"),
    _Option("duplex_moshi_to_mas", _bool, "duplex: post Moshi's words to MAS as assistant_speech"),
    _Option("allowed_origins", _origins, "comma-separated browser origins allowed to connect, or *"),
    _Option("token", _token, "optional bearer token clients must present"),
    _Option("drain_timeout_s", _positive_float, "on SIGTERM, longest wait for active sessions"),
    _Option("max_sessions", _int_range(1, 100_000), "most concurrent client sessions"),
    _Option("max_frame_bytes", _int_range(256, 16 * 1024 * 1024), "largest client frame"),
    _Option("rate_per_s", _positive_float, "client frames per second allowed per session (sustained)"),
    _Option("rate_burst", _int_range(1, 100_000), "client frames allowed in a burst per session"),
    _Option("max_pending_turns", _int_range(1, 1000), "MAS turns queued per session"),
    _Option("max_text_chars", _int_range(1, 1_000_000), "longest text turn, in characters"),
    _Option("out_queue_frames", _int_range(8, 100_000), "frames queued per session towards the client"),
    _Option("send_timeout_s", _positive_float, "longest wait to write to a stalled client"),
    _Option("idle_timeout_s", _positive_float, "close a session silent this long"),
    _Option("heartbeat_s", _positive_float, "websocket ping interval towards clients"),
    _Option("probe_interval_s", _positive_float, "interval of the background backend probes"),
    _Option("probe_timeout_s", _positive_float, "timeout of one probe"),
    _Option("moshi_connect_timeout_s", _positive_float, "longest wait for a Moshi connection and handshake"),
    _Option("moshi_stall_s", _positive_float, "degrade a voice session when Moshi answers nothing this long"),
    _Option("utterance_gap_s", _positive_float, "Moshi silence that ends an utterance (duplex_moshi_to_mas)"),
    _Option(
        "voice_prompt",
        _optional(prompts.voice_name),
        "PersonaPlex voice file for chat backends (e.g. NATF2.pt); empty: the engine's default",
    ),
    _Option(
        "text_prompt",
        _optional(prompts.text_prompt),
        "PersonaPlex text (role) prompt for chat backends; empty: the engine's default",
    ),
    _Option("reply_voice", prompts.reply_voice, "agent voice: who speaks MAS's replies, tts or chat"),
    _Option("log_level", _log_level, "debug, info, warning or error"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError("command line", message)


def _argument_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="personaplex-bridge",
        description="PersonaPlex websocket bridge. Every flag has an environment variable BRIDGE_<NAME>.",
    )
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.env, help=opt.help)
    return parser


def load_settings(environ: Mapping[str, str], argv: Sequence[str] = ()) -> Settings:
    """Build :class:`Settings` from ``environ`` and ``argv`` (flags win). Raises :class:`ConfigError`."""
    args = vars(_argument_parser().parse_args(list(argv)))
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = args[opt.name]
        source = f"{opt.env} ({opt.flag})" if raw is not None else opt.env
        if raw is None:
            raw = environ.get(opt.env)
        if raw is None:
            continue
        try:
            values[opt.name] = opt.parse(raw)
        except ValueError as exc:
            raise ConfigError(source, str(exc)) from None
    if values.get("mas_url") is None:
        raise ConfigError("BRIDGE_MAS_URL", "is required: the full URL of the MAS chat endpoint")
    settings = Settings(**values)
    if settings.mas_backoff_max_s < settings.mas_backoff_s:
        raise ConfigError("BRIDGE_MAS_BACKOFF_MAX_S", "must not be smaller than BRIDGE_MAS_BACKOFF_S")
    if settings.rate_burst < settings.rate_per_s:
        raise ConfigError("BRIDGE_RATE_BURST", "must be at least BRIDGE_RATE_PER_S")
    if not settings.host:
        raise ConfigError("BRIDGE_HOST", "must not be empty")
    return settings


def help_text() -> str:
    """The ``--help`` text (used by the docs test to check every variable is documented)."""
    return _argument_parser().format_help()
