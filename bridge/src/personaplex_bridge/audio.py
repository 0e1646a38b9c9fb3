"""Audio helpers of the agent voice mode: Ogg/Opus in, 24 kHz float32 chunks out, and page timing.

* :class:`OpusDecoder` turns the client's ``0x01`` Ogg/Opus frames into PCM (sphn's streaming reader).
* :class:`Chunker` cuts PCM into the 1920-sample (80 ms) chunks sent to the STT.
* :func:`level_dbfs` is the RMS level of a chunk, for the silence gate of turn-taking.
* :func:`ogg_end_s` reads the granule position of the last Ogg page in a buffer: the audio time at
  which that page ends, used to pace spoken replies to real time.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import sphn

SAMPLE_RATE = 24_000
CHUNK_SAMPLES = 1920  # 80 ms at 24 kHz: one STT step
CHUNK_S = CHUNK_SAMPLES / SAMPLE_RATE
_OPUS_GRANULE_RATE = 48_000  # Ogg/Opus granule positions always count 48 kHz samples

Pcm = npt.NDArray[np.float32]


class BadAudio(ValueError):
    """Client audio that is not Ogg/Opus; the decoder has been reset."""


class OpusDecoder:
    def __init__(self) -> None:
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)

    def decode(self, data: bytes) -> Pcm:
        """The PCM decoded from ``data`` (possibly empty). Raises :class:`BadAudio` and resets itself.

        Every client frame holds whole Ogg pages, so it must start with the capture pattern ``OggS``
        (sphn would buffer anything and only fail on the next frame).
        """
        if not data.startswith(b"OggS"):
            raise BadAudio("a frame must hold Ogg pages (starting with 'OggS')")
        try:
            pcm = self._reader.append_bytes(data)
        except ValueError as exc:
            self._reader = sphn.OpusStreamReader(SAMPLE_RATE)  # the reader keeps bad bytes otherwise
            raise BadAudio(f"not Ogg/Opus ({str(exc)[:80]})") from None
        out = np.asarray(pcm, dtype=np.float32)
        if out.ndim != 1:
            out = out.reshape(-1)
        return out


class Chunker:
    """Collects PCM and hands it out in chunks of exactly :data:`CHUNK_SAMPLES`."""

    def __init__(self) -> None:
        self._pending: Pcm = np.zeros(0, dtype=np.float32)

    def push(self, pcm: Pcm) -> list[Pcm]:
        buf = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        n = buf.size // CHUNK_SAMPLES
        chunks = [buf[i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES] for i in range(n)]
        self._pending = buf[n * CHUNK_SAMPLES :].copy()
        return chunks


def silence(samples: int = CHUNK_SAMPLES) -> Pcm:
    return np.zeros(samples, dtype=np.float32)


def level_dbfs(pcm: Pcm) -> float:
    """RMS level in dBFS (full scale = 1.0); ``-inf`` for digital silence."""
    if pcm.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64))))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def ogg_end_s(data: bytes) -> float | None:
    """Audio time (s) at the end of the last complete Ogg page in ``data``; ``None`` if it has none.

    A header page (granule 0) gives 0.0. The Opus pre-skip is ignored (a few ms).
    """
    end: float | None = None
    pos = 0
    while pos + 27 <= len(data) and data[pos : pos + 4] == b"OggS":
        nsegs = data[pos + 26]
        table_end = pos + 27 + nsegs
        if table_end > len(data):
            break
        size = sum(data[pos + 27 : table_end])
        if table_end + size > len(data):
            break
        granule = int.from_bytes(data[pos + 6 : pos + 14], "little", signed=True)
        if granule >= 0:  # -1: no packet ends on this page
            end = granule / _OPUS_GRANULE_RATE
        pos = table_end + size
    return end
