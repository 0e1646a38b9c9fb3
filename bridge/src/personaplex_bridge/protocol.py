"""The client protocol: frame kinds, parsing of client frames, and builders for every server event.

Text frames are JSON objects with a ``type``. Binary frames start with Moshi's kind byte. The
builders here are the only place where event shapes are written down in code; the docs in
``docs/bridge-protocol.md`` describe the same shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

KIND_HANDSHAKE = 0x00
KIND_AUDIO = 0x01
KIND_TEXT = 0x02

BackendState = Literal["up", "down"]
# MAS: "unknown" until the first call or health probe has an outcome.
MasState = Literal["up", "down", "unknown"]
MoshiSummary = Literal["up", "down", "busy"]
TtsState = Literal["up", "down", "off"]
# Where a MAS turn came from: typed, the user's words in agent voice mode, or (duplex mode with
# BRIDGE_DUPLEX_MOSHI_TO_MAS) Moshi's own words, labelled as the assistant's speech.
Source = Literal["text", "voice", "assistant_speech"]
VoiceMode = Literal["agent", "duplex"]
VOICE_MODES: tuple[VoiceMode, ...] = ("agent", "duplex")

# Error codes sent in {"type":"error","code":...}.
E_BAD_JSON = "bad_json"
E_UNKNOWN_TYPE = "unknown_type"
E_BAD_MESSAGE = "bad_message"
E_BINARY_BEFORE_VOICE = "binary_before_voice"
E_UNKNOWN_KIND = "unknown_kind"
E_FRAME_TOO_LARGE = "frame_too_large"
E_RATE_LIMITED = "rate_limited"
E_BUSY = "busy"
E_BAD_STATE = "bad_state"
E_DRAINING = "draining"
E_MAS_UNAVAILABLE = "mas_unavailable"
E_MAS_BAD_REPLY = "mas_bad_reply"
E_BAD_AUDIO = "bad_audio"

ERROR_CODES = (
    E_BAD_JSON,
    E_UNKNOWN_TYPE,
    E_BAD_MESSAGE,
    E_BINARY_BEFORE_VOICE,
    E_UNKNOWN_KIND,
    E_FRAME_TOO_LARGE,
    E_RATE_LIMITED,
    E_BUSY,
    E_BAD_STATE,
    E_DRAINING,
    E_MAS_UNAVAILABLE,
    E_MAS_BAD_REPLY,
    E_BAD_AUDIO,
)


class ProtocolError(Exception):
    """A client frame the bridge refuses; becomes an ``error`` event and the session stays open."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TextTurn:
    text: str


@dataclass(frozen=True)
class VoiceStart:
    mode: VoiceMode | None = None  # None: the default (agent when an STT is configured, else duplex)


@dataclass(frozen=True)
class VoiceStop:
    pass


ClientMessage = TextTurn | VoiceStart | VoiceStop

CLIENT_TYPES = ("text", "voice_start", "voice_stop")


def parse_client_text(data: str, max_text_chars: int) -> ClientMessage:
    """Parse one client text frame. Raises :class:`ProtocolError` with the error code to send."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise ProtocolError(E_BAD_JSON, "text frames must be JSON objects") from None
    if not isinstance(obj, dict):
        raise ProtocolError(E_BAD_JSON, "text frames must be JSON objects")
    kind = obj.get("type")
    if kind == "text":
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError(E_BAD_MESSAGE, "a text message needs a non-empty string 'text'")
        if len(text) > max_text_chars:
            raise ProtocolError(E_BAD_MESSAGE, f"'text' is longer than {max_text_chars} characters")
        return TextTurn(text)
    if kind == "voice_start":
        mode = obj.get("mode")
        if mode is None:
            return VoiceStart()
        if mode == "agent":
            return VoiceStart("agent")
        if mode == "duplex":
            return VoiceStart("duplex")
        raise ProtocolError(E_BAD_MESSAGE, '\'mode\' must be "agent" or "duplex"')
    if kind == "voice_stop":
        return VoiceStop()
    shown = kind if isinstance(kind, str) and len(kind) <= 40 else type(kind).__name__
    raise ProtocolError(
        E_UNKNOWN_TYPE, f"unknown message type {shown!r}; expected one of {', '.join(CLIENT_TYPES)}"
    )


def dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


# --- server events ---


def ready(session: str, moshi: MoshiSummary, mas: MasState, tts: TtsState, asr: TtsState) -> dict[str, Any]:
    return {"type": "ready", "session": session, "moshi": moshi, "mas": mas, "tts": tts, "asr": asr}


def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


def mas_response(
    text: str,
    tool_calls: list[Any],
    agent_activity: list[Any],
    memory: list[Any],
    extra: dict[str, Any],
    source: Source,
) -> dict[str, Any]:
    return {
        "type": "mas_response",
        "text": text,
        "tool_calls": tool_calls,
        "agent_activity": agent_activity,
        "memory": memory,
        "extra": extra,
        "source": source,
    }


def tts_done() -> dict[str, Any]:
    return {"type": "tts_done"}


def tts_skipped(reason: str, message: str) -> dict[str, Any]:
    return {"type": "tts_skipped", "reason": reason, "message": message}


def voice_ready(backend: str, mode: VoiceMode) -> dict[str, Any]:
    return {"type": "voice_ready", "backend": backend, "mode": mode}


def voice_unavailable(reason: str, message: str) -> dict[str, Any]:
    return {"type": "voice_unavailable", "reason": reason, "message": message}


def voice_stopped() -> dict[str, Any]:
    return {"type": "voice_stopped"}


def moshi_text(text: str) -> dict[str, Any]:
    return {"type": "moshi_text", "text": text}


def degraded(component: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": "degraded", "component": component, "reason": reason, "message": message, "mode": "text"}


def transcript(text: str, final: bool) -> dict[str, Any]:
    return {"type": "transcript", "text": text, "final": final}


def tts_interrupted(reason: str) -> dict[str, Any]:
    return {"type": "tts_interrupted", "reason": reason}
