"""The "say this" channel: forcing the words of a reply into a Moshi-layout model's inner monologue.

Each 80 ms step the model samples one text token; that token conditions the step's audio codebooks (the
depformer's first input) and the next step's temporal transformer. Forcing it makes the model speak
chosen words in the session's voice, at the model's own timing. The text stream's convention (read from
moshi): a word's tokens sit back to back from the word's onset, PAD (3) fills the time between words,
EPAD (0) replaces the last PAD before a word. Id 0 is also sentencepiece's ``<unk>``, so characters
outside the vocabulary are dropped (and reported), never forced.

* :class:`SayTokenizer` turns a text into :class:`SayText` (words, their tokens from the model's own
  sentencepiece tokenizer, what was dropped). Runs on the event loop (sentencepiece reads are
  thread-safe).
* :class:`SaySlot` is one conversation's forcing state, advanced by the stepper thread: before each step
  it returns a :class:`Decision` (force this token, or allow only these tokens and let the model's
  logits choose), after it, it reads the token the step took; it produces the ``say_*`` events.
* :class:`SayInbox` carries the session's commands (:class:`Say`, :class:`Cancel`) to the stepper
  thread under a lock; each command names its owner (the session's parameters object), so a command
  of a session that left never reaches the next session of the slot.

Pacing policies (per session):

* ``constrained``: between words only PAD, EPAD or the next word's first token are allowed and the
  model's logits choose among them (sampled with the session's text temperature); after EPAD the word's
  first token is forced, the rest of its tokens follow one per step; after ``max_pads`` PADs in a row the
  next word is forced (EPAD, then the word).
* ``fixed``: a word onset every ``frames_per_word`` frames (PADs, then EPAD, then the word; at least
  the EPAD between two words), ``frames_per_word`` more after a word ending a sentence (``.!?``) and
  half that after a clause (``,;:``).

A reply ends with ``tail_frames`` PAD steps (the last word's sound finishes) and ``say_end`` reason
``done``. Cancel, barge-in and replace end it at the end of the word being spoken (at once between
words). With ``after="hold"`` (speaker-only) the text is PAD outside replies; with ``"free"`` the model
generates freely there.
"""

from __future__ import annotations

import collections
import math
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Any

PAD_ID = 3
EPAD_ID = 0
RESERVED_IDS = frozenset({0, 1, 2, 3})  # <unk>/EPAD, <s>, </s>, PAD: never forced as a word's token
PACINGS = ("constrained", "fixed")
AFTERS = ("free", "hold")
QUEUES = ("queue", "replace")
MAX_PENDING = 4  # replies waiting behind the one being said
REASONS = ("done", "cancelled", "barge_in", "replaced")
SENTENCE_END = ".!?…"
CLAUSE_END = ",;:"
_SPECIAL = re.compile(r"^<[^<>]+>$")


class SayError(ValueError):
    """A text that cannot be said (the session gets the message as an error and carries on)."""


@dataclass(frozen=True)
class SayConfig:
    """One session's say settings (query parameters and module options)."""

    pacing: str = "constrained"
    after: str = "free"
    queue: str = "queue"
    max_pads: int = 8
    frames_per_word: int = 5
    tail_frames: int = 4
    barge_in_dbfs: float = -35.0
    barge_in_frames: int = 3  # 0: no barge-in from the audio

    def __post_init__(self) -> None:
        if self.pacing not in PACINGS:
            raise ValueError(f"say pacing {self.pacing!r} is not one of {', '.join(PACINGS)}")
        if self.after not in AFTERS:
            raise ValueError(f"say_after {self.after!r} is not one of {', '.join(AFTERS)}")
        if self.queue not in QUEUES:
            raise ValueError(f"say_queue {self.queue!r} is not one of {', '.join(QUEUES)}")
        if self.max_pads < 0 or self.frames_per_word < 1 or self.tail_frames < 0 or self.barge_in_frames < 0:
            raise ValueError(
                "say settings: max_pads, tail_frames, barge_in_frames >= 0; frames_per_word >= 1"
            )


@dataclass(frozen=True)
class SayWord:
    text: str  # as the model's tokens spell it (what the 0x02 text pieces will show)
    tokens: tuple[int, ...]
    pause: int = 0  # 0: none, 1: after a clause, 2: after a sentence


@dataclass(frozen=True)
class SayText:
    id: int
    words: tuple[SayWord, ...]
    dropped: str = ""

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    def start_event(self) -> dict[str, Any]:
        return {
            "type": "say_start",
            "id": self.id,
            "text": self.text,
            "words": len(self.words),
            "dropped": self.dropped,
        }


def decode_utf8(payload: bytes) -> str:
    try:
        return payload.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise SayError(f"say (0x02): the text is not valid UTF-8 (byte {exc.start})") from None


class SayTokenizer:
    """Words and tokens of a text with the model's own sentencepiece tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.sp = tokenizer
        size = int(tokenizer.get_piece_size())
        self.unk_id = int(tokenizer.unk_id())
        specials: set[int] = set(RESERVED_IDS)
        strings: list[str] = []
        for i in range(size):
            piece = str(tokenizer.id_to_piece(i))
            byte = bool(tokenizer.is_byte(i))
            if tokenizer.is_control(i) or tokenizer.is_unknown(i) or (_SPECIAL.match(piece) and not byte):
                specials.add(i)
                if _SPECIAL.match(piece) and not byte:
                    strings.append(piece)
        self.special_ids = frozenset(specials)
        # Longest first: "<system>" before a shorter tag that it contains.
        self.special_strings = tuple(sorted(set(strings), key=len, reverse=True))
        self._char_ok: dict[str, bool] = {}

    def _ok(self, char: str) -> bool:
        known = self._char_ok.get(char)
        if known is None:
            if unicodedata.category(char).startswith("C"):
                known = False
            else:
                known = not any(int(t) in self.special_ids for t in self.sp.encode(char))
            if len(self._char_ok) < 100_000:
                self._char_ok[char] = known
        return known

    def _spelled(self, tokens: list[int]) -> str:
        return "".join(str(self.sp.id_to_piece(t)) for t in tokens).replace("▁", " ").strip()

    def prepare(self, text: str, reply_id: int, max_chars: int) -> SayText:
        """The words to say (raises :class:`SayError` for an empty or too long text)."""
        if len(text) > max_chars:
            raise SayError(
                f"say (0x02): the text has {len(text)} characters, more than the limit {max_chars}"
            )
        dropped: list[str] = []
        for special in self.special_strings:
            if special in text:
                dropped.extend([special] * text.count(special))
                text = text.replace(special, " ")
        words: list[SayWord] = []
        for raw in text.split():
            kept = []
            for char in raw:
                if self._ok(char):
                    kept.append(char)
                else:
                    dropped.append(char)
            word = "".join(kept)
            if not word:
                continue
            tokens = [int(t) for t in self.sp.encode(word)]
            if not tokens or any(t in self.special_ids for t in tokens):
                dropped.append(word)  # defensive: a combination the per-character check let through
                continue
            stripped = raw.rstrip("\"')]}\u00bb\u201d\u2019")
            pause = (
                2
                if stripped.endswith(tuple(SENTENCE_END))
                else 1
                if stripped.endswith(tuple(CLAUSE_END))
                else 0
            )
            words.append(SayWord(self._spelled(tokens), tuple(tokens), pause))
        if not words:
            raise SayError(
                "say (0x02): nothing to say (the text is empty once unknown characters are dropped)"
            )
        return SayText(reply_id, tuple(words), "".join(dropped))


# --- commands (session -> stepper thread) ---


@dataclass(frozen=True)
class Say:
    item: SayText


@dataclass(frozen=True)
class Cancel:
    pass


Command = Say | Cancel


class SayInbox:
    """Per-slot commands, handed from the event loop to the stepper thread under a lock."""

    def __init__(self, slots: int) -> None:
        self._lock = threading.Lock()
        self._items: list[list[tuple[object, Command]]] = [[] for _ in range(slots)]
        self._any = False

    def put(self, slot: int, owner: object, command: Command) -> None:
        with self._lock:
            self._items[slot].append((owner, command))
            self._any = True

    def take(self) -> list[tuple[int, object, Command]]:
        if not self._any:  # a plain read: a command put meanwhile is taken at the next step
            return []
        with self._lock:
            out = [(slot, owner, cmd) for slot, items in enumerate(self._items) for owner, cmd in items]
            for items in self._items:
                items.clear()
            self._any = False
        return out


# --- the per-slot state machine (stepper thread) ---


@dataclass(frozen=True)
class Decision:
    """What a slot's text token is this step: ``force`` (set after sampling) or one of ``allowed``
    (the logits of every other token are set to -inf before sampling)."""

    force: int | None = None
    allowed: tuple[int, ...] | None = None


@dataclass
class _Pending:
    item: SayText
    drop: str | None = None  # dropped before it started, with that reason


@dataclass
class _Reply:
    item: SayText
    word: int = 0  # the next word to start (or the word being spoken, when token > 0)
    token: int = 0  # the next token of that word (0: between words)
    pads: int = 0  # PADs since the last word ended (constrained)
    epad: bool = False  # EPAD taken: the word starts at the next step
    gap: int = 1  # fixed pacing: frames to the next onset (the last one is the EPAD)
    tail: int = 0
    stop: str | None = None
    spoken: list[str] = field(default_factory=list)


def level_dbfs(frame: Any) -> float:
    """RMS level of a float frame (full scale 1.0) in dBFS; -inf for silence."""
    import numpy as np  # noqa: PLC0415 - keeps this module's import light for the session side

    rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64))))
    return 20.0 * math.log10(rms) if rms > 0 else float("-inf")


class SaySlot:
    """One conversation's say state. Call :meth:`command`, then per step :meth:`before` and
    :meth:`after`; :meth:`take_events` returns the events produced since the last call."""

    def __init__(self, config: SayConfig) -> None:
        self.config = config
        self.current: _Reply | None = None
        self.queue: collections.deque[_Pending] = collections.deque()
        self.events: list[dict[str, Any]] = []
        self._loud = 0
        self._kind = ""  # what this step's decision was: pad, epad, onset, next, choose, tail, hold

    @property
    def busy(self) -> bool:
        """Whether this slot's steps are touched at all (a reply, a queue, or speaker-only hold)."""
        return self.current is not None or bool(self.queue) or self.config.after == "hold"

    def take_events(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out

    # --- commands ---

    def command(self, cmd: Command) -> None:
        if isinstance(cmd, Say):
            if self.config.queue == "replace":
                self._stop("replaced")
            self.queue.append(_Pending(cmd.item))
        else:
            self._stop("cancelled")

    def _stop(self, reason: str) -> None:
        if self.current is not None and self.current.stop is None:
            self.current.stop = reason
        for pending in self.queue:
            if pending.drop is None:
                pending.drop = reason

    # --- stepping ---

    def before(self, level: float | None) -> Decision | None:
        """This step's decision (None: the model's own token). ``level``: the user frame's dBFS."""
        cfg = self.config
        if self.current is not None and level is not None and cfg.barge_in_frames > 0:
            self._loud = self._loud + 1 if level > cfg.barge_in_dbfs else 0
            if self._loud >= cfg.barge_in_frames:
                self._stop("barge_in")
        elif self.current is None:
            self._loud = 0
        while True:
            reply = self.current
            if reply is None:
                if not self.queue:
                    self._kind = "hold"
                    return Decision(force=PAD_ID) if cfg.after == "hold" else None
                pending = self.queue.popleft()
                self.events.append(pending.item.start_event())
                if pending.drop is not None:
                    self.events.append(self._end_event(pending.item, [], pending.drop))
                    continue
                self.current = _Reply(pending.item, tail=cfg.tail_frames)
                continue
            if reply.token == 0 and (reply.stop is not None or reply.word >= len(reply.item.words)):
                finished = reply.word >= len(reply.item.words)
                if finished and reply.stop is None and reply.tail > 0:
                    reply.tail -= 1
                    self._kind = "tail"
                    return Decision(force=PAD_ID)
                self.events.append(
                    self._end_event(reply.item, reply.spoken, "done" if finished else reply.stop)
                )
                self.current = None
                self._loud = 0
                continue
            return self._plan(reply)

    def _plan(self, reply: _Reply) -> Decision:
        word = reply.item.words[reply.word]
        if reply.token > 0:
            self._kind = "next"
            return Decision(force=word.tokens[reply.token])
        if self.config.pacing == "fixed":
            if reply.gap > 1:
                self._kind = "pad"
                return Decision(force=PAD_ID)
            if reply.gap == 1:
                self._kind = "epad"
                return Decision(force=EPAD_ID)
            self._kind = "onset"
            return Decision(force=word.tokens[0])
        if reply.epad:
            self._kind = "onset"
            return Decision(force=word.tokens[0])
        if reply.pads >= self.config.max_pads:
            self._kind = "epad"
            return Decision(force=EPAD_ID)
        self._kind = "choose"
        return Decision(allowed=(PAD_ID, EPAD_ID, word.tokens[0]))

    def after(self, token: int) -> None:
        """The token the step took (the forced one, or the model's choice)."""
        reply, kind = self.current, self._kind
        self._kind = ""
        if reply is None or kind in ("hold", "tail", ""):
            return
        word = reply.item.words[reply.word]
        if kind == "next":
            reply.token += 1
        elif kind == "pad" or (kind == "choose" and token == PAD_ID):
            reply.pads += 1
            reply.gap -= 1
        elif kind == "epad" or (kind == "choose" and token == EPAD_ID):
            reply.epad = True
            reply.gap = 0
        else:  # the word's first token
            self.events.append(
                {"type": "say_word", "id": reply.item.id, "index": reply.word, "word": word.text}
            )
            reply.spoken.append(word.text)
            reply.token = 1
        if reply.token >= len(word.tokens) and reply.token > 0:
            reply.word += 1
            reply.token = 0
            reply.pads = 0
            reply.epad = False
            extra = (0, self.config.frames_per_word // 2, self.config.frames_per_word)[word.pause]
            reply.gap = max(1, self.config.frames_per_word + extra - len(word.tokens))

    @staticmethod
    def _end_event(item: SayText, spoken: list[str], reason: str | None) -> dict[str, Any]:
        return {"type": "say_end", "id": item.id, "spoken": " ".join(spoken), "reason": reason or "done"}
