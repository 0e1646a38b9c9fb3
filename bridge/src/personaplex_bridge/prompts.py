"""PersonaPlex prompts of a voice session: which voice, which text (role) prompt, which reply voice.

They come from the settings (``BRIDGE_VOICE_PROMPT``, ``BRIDGE_TEXT_PROMPT``, ``BRIDGE_REPLY_VOICE``)
and may be overridden per session in ``voice_start``; both paths use the checks here, which raise
:class:`ValueError` with a message fit for the client or the configuration error line. The prompts go
to the engine as the ``voice_prompt`` and ``text_prompt`` query of ``/api/chat``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

VOICE_SUFFIXES = (".pt", ".wav", ".mp3", ".flac", ".ogg")
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TEXT_PROMPT_MAX_CHARS = 1000
# The prompt travels in the request line; aiohttp refuses lines over 8190 bytes.
TEXT_PROMPT_MAX_QUERY_BYTES = 6000

ReplyVoice = Literal["tts", "chat"]
REPLY_VOICES: tuple[ReplyVoice, ...] = ("tts", "chat")


def voice_name(raw: str) -> str:
    """A voice file name of the engine's voice folder: a name only, with a known suffix."""
    if not VOICE_NAME.fullmatch(raw) or ".." in raw:
        shown = raw[:60]
        raise ValueError(
            f"{shown!r} is not a voice file name (letters, digits, '.', '_', '-'; at most 128 characters)"
        )
    if not raw.lower().endswith(VOICE_SUFFIXES):
        raise ValueError(f"{raw!r} must end in {', '.join(VOICE_SUFFIXES)}")
    return raw


def text_prompt(raw: str) -> str:
    """A text (role) prompt: UTF-8, no control characters but newline and tab, bounded."""
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8 text (a lone surrogate)") from None
    if len(raw) > TEXT_PROMPT_MAX_CHARS:
        raise ValueError(f"is longer than {TEXT_PROMPT_MAX_CHARS} characters ({len(raw)})")
    if any(not c.isprintable() and c not in "\n\t" for c in raw):
        raise ValueError("contains control characters (only newline and tab are allowed)")
    if len(quote(encoded, safe="")) > TEXT_PROMPT_MAX_QUERY_BYTES:
        raise ValueError(f"is longer than {TEXT_PROMPT_MAX_QUERY_BYTES} bytes once URL-encoded")
    return raw


def reply_voice(raw: str) -> ReplyVoice:
    value = raw.strip().lower()
    if value == "tts":
        return "tts"
    if value == "chat":
        return "chat"
    raise ValueError(f"must be tts or chat, got {raw[:40]!r}")


@dataclass(frozen=True)
class Prompts:
    """What a voice session asks its chat backend for. ``None``: leave the query parameter out (the
    engine's own default); ``text_prompt=""`` asks for no text prompt."""

    voice_prompt: str | None = None
    text_prompt: str | None = None

    def query(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.voice_prompt is not None:
            out["voice_prompt"] = self.voice_prompt
        if self.text_prompt is not None:
            out["text_prompt"] = self.text_prompt
        return out
