"""docs/bridge-protocol.md and the code describe the same settings, error codes and events."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from typing import get_args

from conftest import REPO
from personaplex_bridge import metrics, protocol
from personaplex_bridge.chat_voice import SAY_REASONS
from personaplex_bridge.config import OPTIONS, Settings, help_text
from personaplex_bridge.prompts import ReplyVoice

DOC = (REPO / "docs" / "bridge-protocol.md").read_text()


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, (int, str)) and value != "":
        return f"`{value}`"
    return ""


def test_every_setting_is_documented_with_its_flag_and_default():
    defaults = {f.name: f.default for f in fields(Settings)}
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(BRIDGE_[A-Z_]+)` \|.*$", DOC, re.M)}
    assert set(rows) == {opt.env for opt in OPTIONS}
    for opt in OPTIONS:
        row = rows[opt.env]
        assert f"`{opt.flag}`" in row
        default = defaults[opt.name]
        if default is not MISSING:
            assert _default_text(default) in row, (opt.env, row)
        assert opt.flag in help_text()


def test_every_error_code_and_event_is_documented():
    for code in protocol.ERROR_CODES:
        assert f"| `{code}` |" in DOC, code
    events = [
        protocol.ready("s", "up", "up", "off", "off"),
        protocol.error("bad_json", "m"),
        protocol.mas_response("t", [], [], [], {}, "text"),
        protocol.tts_done(),
        protocol.tts_skipped("off", "m"),
        protocol.voice_ready("ws://x", "agent"),
        protocol.voice_unavailable("busy", "m"),
        protocol.voice_stopped(),
        protocol.moshi_text("w"),
        protocol.degraded("moshi", "backend_lost", "m"),
        protocol.transcript("w", False),
        protocol.tts_interrupted("barge_in"),
        protocol.voice_ready("ws://x", "agent", reply_voice="chat"),
        protocol.reply_voice_fallback("busy", "m", "session"),
        protocol.reply_spoken("w", "done"),
    ]
    for event in events:
        assert f'{{"type":"{event["type"]}"' in DOC, event["type"]
        for key in event:
            assert f'"{key}"' in DOC, (event["type"], key)


def test_agent_voice_values_are_documented():
    # The values the code can send, written the way the event tables write alternatives.
    assert '"mode":"' + "\\|".join(protocol.VOICE_MODES) + '"' in DOC
    assert '"source":"' + "\\|".join(get_args(protocol.Source)) + '"' in DOC
    assert '"reason":"barge_in\\|voice_stopped"' in DOC
    assert '"component":"moshi\\|asr"' in DOC
    assert '"reply_voice":"' + "\\|".join(get_args(ReplyVoice)) + '"' in DOC
    assert '"reason":"' + "\\|".join(SAY_REASONS) + '"' in DOC
    # Every metric the bridge declares is listed in the /metrics paragraph.
    for name in metrics.DECLARED:
        assert f"`{name}" in DOC, name
