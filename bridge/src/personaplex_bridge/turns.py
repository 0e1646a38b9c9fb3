"""Turn-taking of the agent voice mode: when the user's turn ends, and when the user barges in.

Pure logic, no I/O: the session feeds it what it sends to the STT (each 80 ms chunk and its level) and
what the STT answers (words and steps), and asks two questions.

**End of turn** (as Unmute does it): the turn has words, the STT's pause prediction is at least
``BRIDGE_ASR_PAUSE_THRESHOLD``, and the user has been silent for ``BRIDGE_ASR_MIN_SILENCE_S``. The
pause prediction is ``Step.prs[BRIDGE_ASR_PAUSE_HEAD]`` (the last head when the model has fewer),
smoothed like Unmute's (an exponential average with 10 ms attack and release, i.e. almost none),
ignoring the first 12 steps of a stream (the heads are unreliable there) and reset to 0 on the first
word of a turn (so that a turn never ends right after its first word). "Silent" means the audio sent
since the last chunk louder than ``BRIDGE_ASR_SILENCE_DBFS``, in audio time: a level gate, not the
STT's words (they lag the audio by the STT's delay, and a model may hear words in silence, as the tiny
random test model does). Background noise above the gate keeps a turn open: raise the gate there.

**Barge-in** (while a reply is being spoken): the last chunk is louder than
``BRIDGE_ASR_SILENCE_DBFS``, and the STT heard a word since the playback started or its pause
prediction fell below ``BRIDGE_ASR_BARGE_IN_THRESHOLD``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WARMUP_STEPS = 12  # Unmute: the pause prediction "is all over the place in the first few steps"
_SMOOTH_HALF_LIFE_S = 0.01
_STEP_S = 0.08


@dataclass(frozen=True)
class TurnSettings:
    pause_threshold: float = 0.6
    pause_head: int = 2
    min_silence_s: float = 0.3
    silence_dbfs: float = -45.0
    barge_in_threshold: float = 0.4


class TurnDetector:
    def __init__(self, settings: TurnSettings) -> None:
        self._s = settings
        self.audio_s = 0.0  # audio time sent to the STT
        self.pause = 1.0  # smoothed pause prediction (1: the user is not speaking)
        self.steps = 0
        self.words: list[str] = []  # words of the turn in progress
        self._last_voiced_at = -math.inf
        self._last_chunk_voiced = False
        self._word_since_playback = False

    # --- what is sent ---

    def audio(self, seconds: float, dbfs: float) -> None:
        self.audio_s += seconds
        self._last_chunk_voiced = dbfs > self._s.silence_dbfs
        if self._last_chunk_voiced:
            self._last_voiced_at = self.audio_s

    # --- what the STT answers ---

    def word(self, text: str) -> None:
        if not text.strip():
            return  # the STT may send an empty first word; it is not speech
        if not self.words:
            self.pause = 0.0
        self.words.append(text.strip())
        self._word_since_playback = True

    def step(self, prs: tuple[float, ...]) -> None:
        self.steps += 1
        if self.steps <= WARMUP_STEPS or not prs:
            return
        value = prs[min(self._s.pause_head, len(prs) - 1)]
        if not math.isfinite(value):
            return
        alpha = 1.0 - math.exp(-_STEP_S / _SMOOTH_HALF_LIFE_S * math.log(2))
        self.pause = (1.0 - alpha) * self.pause + alpha * min(1.0, max(0.0, value))

    # --- questions ---

    @property
    def silence_s(self) -> float:
        return self.audio_s - self._last_voiced_at

    def turn_ended(self) -> bool:
        return (
            bool(self.words)
            and self.pause >= self._s.pause_threshold
            and self.silence_s >= self._s.min_silence_s
        )

    def take_turn(self) -> str:
        """The words of the turn, which starts a new (empty) one."""
        text = " ".join(self.words)
        self.words = []
        return text

    def playback_started(self) -> None:
        self._word_since_playback = False

    def barge_in(self) -> bool:
        if not self._last_chunk_voiced:
            return False
        return self._word_since_playback or self.pause < self._s.barge_in_threshold
