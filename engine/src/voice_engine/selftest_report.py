"""What both ways of ``voice-engine selftest --say`` share: the sentences, what was spoken, the WAVs, the
transcription by an engine's ``/api/asr-streaming``, the word error rate and the report.

See :mod:`voice_engine.selftest` for the command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from . import wav
from .models.say import PACINGS

FRAME = 1920
SAMPLE_RATE = 24000
FRAME_S = FRAME / SAMPLE_RATE
ASR_ROUTE = "/api/asr-streaming"
SENTENCES: tuple[str, ...] = (
    "hello, this is a test of the voice.",
    "the weather is nice this morning.",
    "please listen to the music and tell me about it.",
    "one two three four five six seven eight nine ten.",
    "thanks for the coffee, it was good.",
)
TAIL_FRAMES = 12  # after say_end: the last word's sound fades out
TINY_DIM = 1024  # an LM narrower than this is a test model


class SelftestError(RuntimeError):
    """The measurement failed (exit 1)."""


class UsageError(SelftestError):
    """A bad argument, configuration or address (exit 2)."""


def normalise(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / number of reference words."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            cur = min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
            prev, row[j] = row[j], cur
    return row[-1] / len(ref)


def write_wav(path: Path, pcm: np.ndarray[Any, Any]) -> None:
    wav.write_wav(path, pcm, SAMPLE_RATE)


@dataclasses.dataclass
class Spoken:
    """One sentence said under one pacing policy: its audio, its steps and the time they took."""

    policy: str
    index: int
    sentence: str
    forced: str
    dropped: str
    reason: str | None
    pcm: np.ndarray[Any, Any]
    steps: int
    compute_s: float  # in process: the steps' compute time; through an engine: their wall time
    transcript: str | None = None


def tiny_of_dim(dim: int) -> bool:
    return dim < TINY_DIM


# --- transcribing with an engine's asr module (Kyutai's protocol) ---


async def transcribe_one(url: str, key: str, pcm: np.ndarray[Any, Any], timeout_s: float) -> str:
    """The words of one clip, by the asr module of the engine at ``url`` (the probe's STT session)."""
    import aiohttp  # noqa: PLC0415

    from .probe import probe_asr  # noqa: PLC0415

    async with aiohttp.ClientSession() as http:
        try:
            samples = [float(x) for x in pcm.astype(np.float32)]
            result = await probe_asr(http, url.rstrip("/"), key, samples, timeout_s)
        except (ValueError, TimeoutError) as exc:
            raise SelftestError(f"{url}{ASR_ROUTE}: {exc}") from None
    return str(result["text"])


async def transcribe_all(
    url: str, key: str, clips: list[np.ndarray[Any, Any]], timeout_s: float
) -> list[str]:
    """Every clip through ``url``'s ``/api/asr-streaming``; any failure is a :class:`SelftestError`."""
    import aiohttp  # noqa: PLC0415

    texts = []
    try:
        for pcm in clips:
            texts.append(await transcribe_one(url, key, pcm, timeout_s))
    except aiohttp.WSServerHandshakeError as exc:
        raise SelftestError(f"{url}{ASR_ROUTE}: HTTP {exc.status} {exc.message}") from None
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise SelftestError(f"{url}{ASR_ROUTE}: {type(exc).__name__}: {exc}") from None
    return texts


def transcribe_remote(url: str, key: str, clips: list[np.ndarray[Any, Any]], timeout_s: float) -> list[str]:
    return asyncio.run(transcribe_all(url, key, clips, timeout_s))


# --- the report ---


def report(
    results: list[Spoken], tiny: bool | None, stt: str | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    policies: dict[str, Any] = {}
    for policy in PACINGS:
        mine = [r for r in results if r.policy == policy]
        steps = sum(r.steps for r in mine)
        compute = sum(r.compute_s for r in mine)
        wers = [word_error_rate(r.sentence, r.transcript) for r in mine if r.transcript is not None]
        policies[policy] = {
            "wer": round(sum(wers) / len(wers), 4) if wers and len(wers) == len(mine) else None,
            "rtf": round(compute / (steps * FRAME_S), 4) if steps else None,
            "step_ms": round(1000 * compute / steps, 2) if steps else None,
            "sentences": [
                {
                    "sentence": r.sentence,
                    "forced": r.forced,
                    "dropped": r.dropped,
                    "end": r.reason,
                    "seconds": round(r.pcm.shape[0] / SAMPLE_RATE, 2),
                    "transcript": r.transcript,
                    "wav": f"{r.policy}-{r.index}.wav",
                }
                for r in mine
            ],
        }
    return {"tiny_model": tiny, "stt": stt, **(extra or {}), "policies": policies}
