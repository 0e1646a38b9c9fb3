"""A deterministic sentencepiece tokenizer for the tiny model sets.

Trained from an in-memory iterator over a few KB of text generated here from a seeded word list, into
memory, single-threaded: the model records no file paths, and the same seed gives the same bytes.
Ids 0..3 are sentencepiece's ``<unk>``, ``<s>``, ``</s>`` and one user-defined ``<pad>``-like
piece, as in Kyutai's tokenizers: 0 doubles as EPAD and 3 as PAD in the text stream.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import sentencepiece as spm

TOKENIZER_NAME = "tokenizer.model"
DEFAULT_VOCAB_SIZE = 64

WORDS: tuple[str, ...] = (
    "hello", "moshi", "this", "is", "a", "tiny", "model", "for", "tests", "it", "speaks", "random",
    "words", "about", "the", "weather", "bridge", "server", "and", "voice", "page", "morning",
    "evening", "night", "coffee", "tea", "music", "one", "two", "three", "four", "five", "six",
    "seven", "eight", "nine", "ten", "yes", "no", "maybe", "thanks", "please", "agent", "listen",
)  # fmt: skip


def training_text(seed: int, lines: int = 400, words_per_line: int = 12) -> list[str]:
    """The seeded training corpus (about 25 KB at the defaults)."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_line)) for _ in range(lines)]


def tokenizer_bytes(
    seed: int, vocab_size: int = DEFAULT_VOCAB_SIZE, extra_symbols: tuple[str, ...] = ()
) -> bytes:
    """A serialised sentencepiece unigram model (``vocab_size`` pieces; ``extra_symbols`` are single
    pieces after ``<pad>``, for example PersonaPlex's ``<system>``)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text(seed)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,
        user_defined_symbols=["<pad>", *extra_symbols],
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer(
    out: Path, seed: int, vocab_size: int = DEFAULT_VOCAB_SIZE, extra_symbols: tuple[str, ...] = ()
) -> Path:
    """Write ``tokenizer.model`` into ``out`` (a directory) and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_NAME
    path.write_bytes(tokenizer_bytes(seed, vocab_size, extra_symbols))
    return path
