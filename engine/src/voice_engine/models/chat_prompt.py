"""PersonaPlex's prefill (the voice and text prompts a conversation starts with), as token tables.

What NVIDIA's fork (``NVIDIA/personaplex``, ``moshi/moshi/models/lm.py`` and ``server.py``) runs
before its handshake, re-expressed for PyPI moshi 0.2.13's ``LMGen`` (read there, written here):

1. the voice prompt, one frame per 80 ms: text PAD, the agent channel = the voice's Mimi codes, the
   user channel = the codes of a 440 Hz sine frame; from a WAV (any rate: resampled to 24 kHz, mono,
   normalised to -24 LUFS, Mimi-encoded frame by frame from a fresh state) or from a ``.pt`` file that
   holds the model's input embeddings for those steps plus a small token cache (:class:`VoicePt`);
2. 6 silent frames (text PAD, agent = the codes of a silent frame, user = sine);
3. the text prompt wrapped as ``<system> ... <system>``, one token per frame (agent silent, user sine);
4. 6 more silent frames.

A frame ``F_i`` lands at cache position ``i + delay_k`` in channel ``k``. moshi 0.2.13's step ``j``
reads position ``j`` and writes the sampled text and agent tokens at ``j + 1``, so prefill step ``j``
gets the user tokens of ``F_j`` as input and has channel ``k`` forced to ``F_{j+1-delay_k}`` where
that frame exists (``-1`` below: sampled). That is the fork's own sequence of model inputs (its
first call only fills the cache, so its step ``j + 1`` is our step ``j``).

A ``.pt`` voice replays its embeddings for the first ``R`` steps (the fork stores one per model call:
``R = voice frames - 1``), then the token cache positions ``R .. R + max_delay`` are restored from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sphn
import torch

SAMPLE_RATE = 24000
FRAME_SIZE = 1920
PAD_ID = 3  # the fork's zero_text_code: text PAD during prompts
SILENCE_FRAMES = 6  # int(0.5 s * 12.5 Hz), the fork's audio_silence_frame_cnt
TARGET_LUFS = -24.0
SYSTEM_TAG = "<system>"
# The fork's codes of a silent frame and of a 440 Hz sine frame for the real Mimi (8 codebooks,
# card 2048): the defaults when a model's config.json does not name its own (``personaplex``).
REAL_SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
REAL_SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)


class PromptError(ValueError):
    """A voice or text prompt that cannot be used, with the reason."""


@dataclass(frozen=True)
class Layout:
    """What the prefill needs to know about the LM."""

    delays: tuple[int, ...]  # per channel: text, agent audio (dep_q), user audio
    dep_q: int
    dim: int
    silence: tuple[int, ...]  # agent codes of a silent frame
    sine: tuple[int, ...]  # user codes of a 440 Hz sine frame

    @property
    def channels(self) -> int:
        return len(self.delays)

    @property
    def n_user(self) -> int:
        return self.channels - 1 - self.dep_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)


@dataclass(frozen=True)
class VoicePt:
    """A ``.pt`` voice as the fork stores it: ``embeddings`` ``[R, 1, 1, dim]``, ``cache`` ``[1, K, C]``."""

    embeddings: torch.Tensor
    cache: torch.Tensor


@dataclass(frozen=True)
class VoiceCodes:
    """A voice prompt from audio: its Mimi codes, ``[frames, dep_q]``."""

    codes: torch.Tensor


Voice = VoicePt | VoiceCodes


@dataclass(frozen=True)
class Prefill:
    """One slot's forced steps: ``replay`` steps first (``.pt``), then ``user``/``forced`` steps."""

    replay: torch.Tensor | None  # [R, dim] transformer inputs
    restore: torch.Tensor | None  # [K, max_delay + 1] tokens for cache positions R .. R + max_delay
    user: torch.Tensor  # [S, n_user] user-channel input tokens
    forced: torch.Tensor  # [S, 1 + dep_q] tokens forced at position j + 1 (-1: sampled)

    @property
    def replay_steps(self) -> int:
        return 0 if self.replay is None else int(self.replay.shape[0])

    @property
    def steps(self) -> int:
        return self.replay_steps + int(self.user.shape[0])


def wrap_system(text: str) -> str:
    """``<system> text <system>`` (as the fork wraps a text prompt that is not wrapped yet)."""
    cleaned = text.strip()
    if cleaned.startswith(SYSTEM_TAG) and cleaned.endswith(SYSTEM_TAG) and len(cleaned) > len(SYSTEM_TAG):
        return cleaned
    return f"{SYSTEM_TAG} {cleaned} {SYSTEM_TAG}"


def text_prompt_tokens(tokenizer: Any, text: str | None) -> list[int]:
    """The text prompt's tokens (none for an empty or absent prompt, as the fork)."""
    if not text:
        return []
    return [int(t) for t in tokenizer.encode(wrap_system(text))]


def build_prefill(layout: Layout, voice: Voice | None, text_tokens: Sequence[int]) -> Prefill:
    """The token tables of one prefill (see the module docstring)."""
    silent = [PAD_ID, *layout.silence, *layout.sine]
    frames: list[list[int]] = []
    replay: torch.Tensor | None = None
    voice_frames = 0
    if isinstance(voice, VoiceCodes):
        for row in voice.codes.tolist():
            frames.append([PAD_ID, *[int(c) for c in row], *layout.sine])
        voice_frames = len(frames)
    elif isinstance(voice, VoicePt):
        voice_frames = int(voice.embeddings.shape[0]) + 1
        frames = [silent] * voice_frames  # placeholders: never read (the cache restore has them)
        replay = voice.embeddings.reshape(-1, layout.dim)
    frames += [silent] * SILENCE_FRAMES
    frames += [[int(t), *layout.silence, *layout.sine] for t in text_tokens]
    frames += [silent] * SILENCE_FRAMES
    n = len(frames)
    k_total = layout.channels
    table = torch.full((k_total, n + layout.max_delay + 1), -1, dtype=torch.long)
    first = voice_frames if isinstance(voice, VoicePt) else 0
    for i in range(first, n):
        for k, delay in enumerate(layout.delays):
            table[k, i + delay] = frames[i][k]
    start = 0
    restore: torch.Tensor | None = None
    if isinstance(voice, VoicePt):
        start = voice_frames - 1
        ring = int(voice.cache.shape[-1])
        for k, delay in enumerate(layout.delays):
            for p in range(start, start + layout.max_delay + 1):
                if p - delay <= voice_frames - 1:  # a voice frame: only the stored cache has it
                    table[k, p] = int(voice.cache[0, k, p % ring])
        restore = table[:, start : start + layout.max_delay + 1].clone()
    user_rows: list[list[int]] = []
    forced_rows: list[list[int]] = []
    for j in range(start, n):
        user_rows.append(
            [int(table[k, j + layout.delays[k]]) for k in range(1 + layout.dep_q, k_total)],
        )
        forced_rows.append([int(table[k, j + 1]) for k in range(1 + layout.dep_q)])
    return Prefill(
        replay=replay,
        restore=restore,
        user=torch.tensor(user_rows, dtype=torch.long).reshape(-1, layout.n_user),
        forced=torch.tensor(forced_rows, dtype=torch.long).reshape(-1, 1 + layout.dep_q),
    )


# --- voice files ---


def _biquad(x: np.ndarray[Any, Any], b: Sequence[float], a: Sequence[float]) -> np.ndarray[Any, Any]:
    """Direct form I biquad (``a[0]`` is 1), in float64."""
    y = np.empty_like(x)
    x1 = x2 = y1 = y2 = 0.0
    b0, b1, b2 = b
    _, a1, a2 = a
    for i, xi in enumerate(x.tolist()):
        yi = b0 * xi + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2
        y[i] = yi
        x2, x1, y2, y1 = x1, xi, y1, yi
    return y


def _k_weighting(rate: int) -> list[tuple[tuple[float, float, float], tuple[float, float, float]]]:
    """ITU-R BS.1770's two K-weighting stages for ``rate`` (a high shelf, then a high pass)."""
    stages = []
    # High shelf: +4 dB above about 1.5 kHz.
    gain, q, fc = 4.0, 1 / math.sqrt(2), 1500.0
    amp = 10 ** (gain / 40.0)
    w0 = 2 * math.pi * fc / rate
    alpha = math.sin(w0) / (2 * q)
    cos = math.cos(w0)
    b0 = amp * ((amp + 1) + (amp - 1) * cos + 2 * math.sqrt(amp) * alpha)
    b1 = -2 * amp * ((amp - 1) + (amp + 1) * cos)
    b2 = amp * ((amp + 1) + (amp - 1) * cos - 2 * math.sqrt(amp) * alpha)
    a0 = (amp + 1) - (amp - 1) * cos + 2 * math.sqrt(amp) * alpha
    a1 = 2 * ((amp - 1) - (amp + 1) * cos)
    a2 = (amp + 1) - (amp - 1) * cos - 2 * math.sqrt(amp) * alpha
    stages.append(((b0 / a0, b1 / a0, b2 / a0), (1.0, a1 / a0, a2 / a0)))
    # High pass at 38 Hz.
    q, fc = 0.5, 38.0
    w0 = 2 * math.pi * fc / rate
    alpha = math.sin(w0) / (2 * q)
    cos = math.cos(w0)
    a0 = 1 + alpha
    stages.append(
        (((1 + cos) / 2 / a0, -(1 + cos) / a0, (1 + cos) / 2 / a0), (1.0, -2 * cos / a0, (1 - alpha) / a0))
    )
    return stages


def integrated_loudness(pcm: np.ndarray[Any, Any], rate: int) -> float:
    """Mono integrated loudness in LUFS (BS.1770: K-weighting, 400 ms blocks, -70 / -10 gates)."""
    x = pcm.astype(np.float64)
    for b, a in _k_weighting(rate):
        x = _biquad(x, b, a)
    block = int(0.4 * rate)
    hop = block // 4
    if x.shape[0] < block:
        return -math.inf
    starts = range(0, x.shape[0] - block + 1, hop)
    power = np.array([np.mean(x[s : s + block] ** 2) for s in starts])
    with np.errstate(divide="ignore"):
        loud = -0.691 + 10 * np.log10(power)
    gated = power[loud > -70.0]
    if gated.size == 0:
        return -math.inf
    relative = -0.691 + 10 * math.log10(float(np.mean(gated))) - 10.0
    gated = power[(loud > -70.0) & (loud > relative)]
    if gated.size == 0:
        return -math.inf
    return -0.691 + 10 * math.log10(float(np.mean(gated)))


def normalise_loudness(
    pcm: np.ndarray[Any, Any], rate: int, target: float = TARGET_LUFS
) -> np.ndarray[Any, Any]:
    """``pcm`` scaled to ``target`` LUFS (silence, or audio too short to measure, is left as it is)."""
    loudness = integrated_loudness(pcm, rate)
    if not math.isfinite(loudness):
        return pcm.astype(np.float32)
    gain = 10 ** ((target - loudness) / 20.0)
    return (pcm.astype(np.float64) * gain).astype(np.float32)


def read_voice_audio(path: Path) -> np.ndarray[Any, Any]:
    """An audio voice prompt as the fork prepares it: first channel, 24 kHz, -24 LUFS, float32."""
    try:
        pcm, rate = sphn.read(str(path))
    except Exception as exc:  # sphn raises plain exceptions with the decoder's message
        raise PromptError(f"voice prompt {path.name}: not readable audio ({exc})") from None
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 2 or pcm.shape[-1] == 0:
        raise PromptError(f"voice prompt {path.name}: no audio")
    if int(rate) != SAMPLE_RATE:
        pcm = sphn.resample(pcm, src_sample_rate=int(rate), dst_sample_rate=SAMPLE_RATE)
    return normalise_loudness(np.asarray(pcm[0], dtype=np.float32), SAMPLE_RATE)


@torch.no_grad()
def encode_voice(mimi: Any, pcm: np.ndarray[Any, Any], device: torch.device) -> VoiceCodes:
    """Mimi codes ``[frames, n]`` of ``pcm``, frame by frame from a fresh streaming state (the last
    frame zero-padded), with a Mimi of its own (batch 1), as the fork encodes a voice prompt."""
    frames = max(1, math.ceil(pcm.shape[0] / FRAME_SIZE))
    padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    padded[: pcm.shape[0]] = pcm
    rows = []
    with mimi.streaming(1):
        for i in range(frames):
            chunk = torch.from_numpy(padded[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]).to(device)
            rows.append(mimi.encode(chunk[None, None])[0, :, 0].cpu())
    return VoiceCodes(torch.stack(rows))


def load_voice_pt(path: Path, layout: Layout) -> VoicePt:
    """A ``.pt`` voice (``torch.load(weights_only=True)``), checked against the model's shape."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad or unsafe file
        raise PromptError(
            f"voice prompt {path.name}: not a voice embedding file ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or not {"embeddings", "cache"} <= set(state):
        raise PromptError(f"voice prompt {path.name}: needs 'embeddings' and 'cache' tensors")
    emb, cache = state["embeddings"], state["cache"]
    if not isinstance(emb, torch.Tensor) or not isinstance(cache, torch.Tensor):
        raise PromptError(f"voice prompt {path.name}: 'embeddings' and 'cache' must be tensors")
    if emb.dim() != 4 or tuple(emb.shape[1:]) != (1, 1, layout.dim) or emb.shape[0] < layout.max_delay + 1:
        raise PromptError(
            f"voice prompt {path.name}: embeddings {tuple(emb.shape)} do not fit this model "
            f"([frames, 1, 1, {layout.dim}], at least {layout.max_delay + 1} frames)"
        )
    if cache.dim() != 3 or cache.shape[0] != 1 or cache.shape[1] != layout.channels:
        raise PromptError(
            f"voice prompt {path.name}: cache {tuple(cache.shape)} does not fit this model "
            f"([1, {layout.channels}, ring])"
        )
    if cache.shape[2] < layout.max_delay + 1:
        raise PromptError(f"voice prompt {path.name}: cache ring of {cache.shape[2]} is too short")
    if not torch.isfinite(emb.float()).all():
        raise PromptError(f"voice prompt {path.name}: embeddings are not finite")
    return VoicePt(emb.float(), cache.long())


@torch.no_grad()
def voice_pt_from_codes(lm: Any, layout: Layout, voice: VoiceCodes) -> dict[str, torch.Tensor]:
    """What the fork saves for a voice prompt, computed from its codes with ``lm``'s embedding tables.

    ``embeddings``: for each model call during the voice frames but the first, the LM's input
    embedding (audio embeddings summed in codebook order, then the text embedding, as moshi's
    ``forward_text`` sums them); ``cache``: the token ring ``[1, K, max_delay + 3]`` after the voice
    frames, in the fork's layout (position ``p`` at index ``p % ring``).
    """
    frames = voice.codes.shape[0]
    if frames < layout.max_delay + 2:
        raise PromptError(f"a voice prompt needs at least {layout.max_delay + 2} frames, got {frames}")
    rows = [[PAD_ID, *[int(c) for c in row], *layout.sine] for row in voice.codes.tolist()]
    initial = lm._get_initial_token()[0, :, 0].cpu()
    ring = layout.max_delay + 3

    def token(k: int, p: int) -> int:
        i = p - layout.delays[k]
        return int(initial[k]) if i < 0 or p <= layout.delays[k] else rows[i][k]

    device = next(iter(lm.parameters())).device
    embeddings = []
    for p in range(frames - 1):
        seq = torch.tensor([[token(k, p)] for k in range(layout.channels)], device=device)[None]
        emb = None
        for cb in range(lm.num_audio_codebooks):
            audio = lm.emb[cb](seq[:, cb + lm.audio_offset])
            emb = audio if emb is None else emb + audio
        text = lm.text_emb(seq[:, 0])
        emb = text if emb is None else emb + text
        embeddings.append(emb.cpu())
    cache = torch.full((1, layout.channels, ring), -2, dtype=torch.long)
    for k, delay in enumerate(layout.delays):
        for p in range(max(0, frames - 3), frames + layout.max_delay):
            if 0 <= p - delay <= frames - 1:
                cache[0, k, p % ring] = token(k, p)
    return {"embeddings": torch.stack(embeddings, dim=0), "cache": cache}
