"""The client protocol: frame kinds, parsing of client frames, and builders for every server event.

Text frames are JSON objects with a ``type``. Binary frames start with Moshi's kind byte. The
builders here are the only place where event shapes are written down in code; the docs in
``docs/bridge-protocol.md`` describe the same shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from . import prompts
from .prompts import ReplyVoice

KIND_HANDSHAKE = 0x00
KIND_AUDIO = 0x01
KIND_TEXT = 0x02
KIND_METADATA = 0x04  # our engine's say channel: JSON metadata (say_start, say_word, say_end, cancel)
KIND_ERROR = 0x05  # our engine: an error message about the client's last frame

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
    # None: the setting (BRIDGE_VOICE_PROMPT, BRIDGE_TEXT_PROMPT, BRIDGE_REPLY_VOICE)
    voice_prompt: str | None = None
    text_prompt: str | None = None
    reply_voice: ReplyVoice | None = None


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
        return _voice_start(obj)
    if kind == "voice_stop":
        return VoiceStop()
    shown = kind if isinstance(kind, str) and len(kind) <= 40 else type(kind).__name__
    raise ProtocolError(
        E_UNKNOWN_TYPE, f"unknown message type {shown!r}; expected one of {', '.join(CLIENT_TYPES)}"
    )


def _voice_start(obj: dict[str, Any]) -> VoiceStart:
    mode = obj.get("mode")
    if mode is not None and mode not in VOICE_MODES:
        raise ProtocolError(E_BAD_MESSAGE, '\'mode\' must be "agent" or "duplex"')
    checks = {"voice_prompt": prompts.voice_name, "text_prompt": prompts.text_prompt}
    values: dict[str, str | None] = {}
    for key, check in checks.items():
        raw = obj.get(key)
        if raw is None:
            values[key] = None
            continue
        if not isinstance(raw, str):
            raise ProtocolError(E_BAD_MESSAGE, f"voice_start: '{key}' must be a string")
        try:
            values[key] = check(raw)
        except ValueError as exc:
            raise ProtocolError(E_BAD_MESSAGE, f"voice_start: '{key}' {exc}") from None
    raw_reply = obj.get("reply_voice")
    reply: ReplyVoice | None = None
    if raw_reply is not None:
        if not isinstance(raw_reply, str):
            raise ProtocolError(E_BAD_MESSAGE, 'voice_start: \'reply_voice\' must be "tts" or "chat"')
        try:
            reply = prompts.reply_voice(raw_reply)
        except ValueError as exc:
            raise ProtocolError(E_BAD_MESSAGE, f"voice_start: 'reply_voice' {exc}") from None
    return VoiceStart(mode, values["voice_prompt"], values["text_prompt"], reply)


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


def voice_ready(backend: str, mode: VoiceMode, **extra: Any) -> dict[str, Any]:
    return {"type": "voice_ready", "backend": backend, "mode": mode, **extra}


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


def reply_voice_fallback(reason: str, message: str, scope: Literal["session", "reply"]) -> dict[str, Any]:
    """Agent voice with ``reply_voice`` chat: replies are spoken by the TTS instead (``scope``: for the
    rest of the voice session, or for this one reply)."""
    return {"type": "reply_voice_fallback", "voice": "tts", "reason": reason, "message": message,
            "scope": scope}  # fmt: skip


def reply_spoken(text: str, reason: str) -> dict[str, Any]:
    """Agent voice with the chat reply voice: the words of a reply the chat model actually spoke."""
    return {"type": "reply_spoken", "voice": "chat", "text": text, "reason": reason}
