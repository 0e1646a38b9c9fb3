"""Per-slot reproducible sampling for batched ``LMGen`` steps.

moshi's ``sample_token`` draws one random stream for the whole batch, so a slot's samples depend on
how many other slots sampled before it. Here every slot owns a ``torch.Generator`` seeded by its
session and reset with the slot; a slot's draws depend on its own seed and step count only.

Sampling is Gumbel-max over moshi's top-k: with ``vals, idx = topk(logits, k)`` (sorted), the token is
``idx[argmax(vals / temp + g)]`` where ``g`` is Gumbel noise. That has exactly the distribution of
moshi's ``sample_top_k(softmax(logits / temp), k)`` (a multinomial over the renormalised top-k). The
noise is drawn on the CPU from each executing slot's generator *before* the step and copied into
static buffers, so the sampling itself is pure tensor arithmetic on fixed buffers and can run inside a
CUDA graph (moshi graphs the depformer step). Masked (idle) slots draw nothing. A temperature of 0
(or less) is greedy; a per-slot ``top_k`` below the configured maximum masks the ranks above it.

:class:`SlotLMGen` is a small ``LMGen`` subclass that uses a :class:`SlotSampler` for both the text
token and the depformer's audio tokens, without touching moshi's module globals:

* the text token: moshi's ``_step`` samples the text logits with ``sample_token``; ``SlotLMGen`` runs
  with ``use_sampling=False`` (so that call is an argmax) and, in the ``on_text_logits_hook`` that
  moshi calls right before it, replaces the logits in place by a one-hot of the per-slot sample;
* the audio tokens: ``depformer_step`` is overridden (same loop over codebooks, per-slot sampler).

Classifier-free guidance by batch doubling (``cfg_coef != 1``) is not supported: the models served
here were trained with CFG distillation (the guidance is a condition, see ``models/tts.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from moshi.models.lm import LMGen, LMModel


@dataclass(frozen=True)
class SamplingParams:
    """One session's sampling settings (moshi semantics: temperature, then top-k)."""

    seed: int
    temp: float
    temp_text: float
    top_k: int
    top_k_text: int


def _gumbel(shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    # -log(E), E ~ Exp(1): the same construction as moshi's `multinomial` (probs / Exp(1)).
    exp = torch.empty(tuple(shape), dtype=torch.float32).exponential_(1.0, generator=gen)
    return -torch.log(exp.clamp_(min=1e-30))


class SlotSampler:
    """Per-slot generators and the static noise buffers one batched step samples with.

    ``max_top_k``/``max_top_k_text`` fix the buffer widths (the largest top-k a session may ask for);
    ``card``/``text_card`` cap them at the vocabulary sizes. ``codebooks`` is the number of audio
    tokens sampled per step (the depformer's ``dep_q``; 0 for a text-only model).
    """

    def __init__(
        self,
        slots: int,
        *,
        codebooks: int,
        card: int,
        text_card: int,
        max_top_k: int,
        max_top_k_text: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.slots = slots
        self.codebooks = codebooks
        self.k_audio = max(1, min(max_top_k, card)) if max_top_k > 0 else card
        self.k_text = max(1, min(max_top_k_text, text_card)) if max_top_k_text > 0 else text_card
        self.device = torch.device(device)
        self._gens = [torch.Generator() for _ in range(slots)]
        self._params: list[SamplingParams | None] = [None] * slots
        # Static buffers (updated in place: a captured CUDA graph keeps reading the same memory).
        self.text_noise = torch.zeros(slots, self.k_text, device=self.device)
        self.audio_noise = torch.zeros(slots, max(codebooks, 1), self.k_audio, device=self.device)
        self.text_scale = torch.ones(slots, 1, device=self.device)  # 1 / temperature
        self.audio_scale = torch.ones(slots, 1, device=self.device)
        self.text_rank_bias = torch.zeros(slots, self.k_text, device=self.device)
        self.audio_rank_bias = torch.zeros(slots, self.k_audio, device=self.device)
        self._cpu_text = torch.zeros(slots, self.k_text)
        self._cpu_audio = torch.zeros(slots, max(codebooks, 1), self.k_audio)

    def reset(self, slot: int, params: SamplingParams) -> None:
        """Start ``slot`` afresh with its session's seed and settings."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} outside 0..{self.slots - 1}")
        self._gens[slot].manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        self._params[slot] = params
        self.text_scale[slot] = 1.0 / params.temp_text if params.temp_text > 0 else 1.0
        self.audio_scale[slot] = 1.0 / params.temp if params.temp > 0 else 1.0
        self.text_rank_bias[slot] = self._rank_bias(params.top_k_text, self.k_text)
        self.audio_rank_bias[slot] = self._rank_bias(params.top_k, self.k_audio)

    @staticmethod
    def _rank_bias(k: int, width: int) -> torch.Tensor:
        bias = torch.zeros(width)
        if 0 < k < width:
            bias[k:] = float("-inf")
        return bias

    def prepare(self, executing: Sequence[int]) -> None:
        """Draw this step's noise for the ``executing`` slots (each from its own generator)."""
        self._cpu_text.zero_()
        self._cpu_audio.zero_()
        for slot in executing:
            params = self._params[slot]
            if params is None:
                raise RuntimeError(f"slot {slot} steps before its sampler was reset")
            gen = self._gens[slot]
            # Both draws happen every step, greedy or not, so the stream position only depends on
            # the number of steps the slot took.
            text = _gumbel((self.k_text,), gen)
            audio = _gumbel((self._cpu_audio.shape[1], self.k_audio), gen)
            if params.temp_text > 0:
                self._cpu_text[slot] = text
            if params.temp > 0:
                self._cpu_audio[slot] = audio
        self.text_noise.copy_(self._cpu_text, non_blocking=True)
        self.audio_noise.copy_(self._cpu_audio, non_blocking=True)

    @staticmethod
    def _pick(
        logits: torch.Tensor, k: int, scale: torch.Tensor, noise: torch.Tensor, rank_bias: torch.Tensor
    ) -> torch.Tensor:
        """``logits`` [B, V] -> tokens [B] (Gumbel-max over the top-k)."""
        vals, idx = torch.topk(logits.float(), k, dim=-1)
        scores = vals * scale + noise + rank_bias
        choice = scores.argmax(dim=-1, keepdim=True)
        return idx.gather(-1, choice)[:, 0]

    def sample_text(self, logits: torch.Tensor) -> torch.Tensor:
        """Text logits ``[B, ..., V]`` (one stream) -> tokens ``[B]``."""
        flat = logits.reshape(logits.shape[0], logits.shape[-1])
        return self._pick(flat, self.k_text, self.text_scale, self.text_noise, self.text_rank_bias)

    def sample_audio(self, logits: torch.Tensor, codebook: int) -> torch.Tensor:
        """Codebook ``codebook``'s logits ``[B, ..., card]`` -> tokens ``[B]``."""
        flat = logits.reshape(logits.shape[0], logits.shape[-1])
        noise = self.audio_noise[:, codebook]
        return self._pick(flat, self.k_audio, self.audio_scale, noise, self.audio_rank_bias)


class SlotLMGen(LMGen):
    """``LMGen`` whose text and audio tokens come from a :class:`SlotSampler`.

    Call ``sampler.prepare(executing_slots)`` before every :meth:`step`. ``on_text_logits_hook`` (if
    given) still sees the raw logits first, for instance to add a padding bonus.
    """

    def __init__(
        self,
        lm_model: LMModel,
        sampler: SlotSampler,
        *,
        on_text_logits_hook: Callable[[torch.Tensor], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("cfg_coef", 1.0) != 1.0:
            raise ValueError("SlotLMGen does not support cfg_coef != 1 (batch-doubling CFG)")
        kwargs.pop("use_sampling", None)
        self._user_text_logits_hook = on_text_logits_hook
        super().__init__(lm_model, use_sampling=False, on_text_logits_hook=self._sample_text, **kwargs)
        self.sampler = sampler

    def _sample_text(self, text_logits: torch.Tensor) -> None:
        if self._user_text_logits_hook is not None:
            self._user_text_logits_hook(text_logits)
        tokens = self.sampler.sample_text(text_logits)
        # moshi then takes argmax(text_logits): make the sampled token the only maximum.
        flat = text_logits.view(text_logits.shape[0], -1, text_logits.shape[-1])
        flat.zero_()
        flat.scatter_(-1, tokens.view(-1, 1, 1).expand(-1, flat.shape[1], 1), 1.0)

    def depformer_step(self, text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        lm = self.lm_model
        assert lm.depformer is not None
        (batch,) = text_token.shape
        prev = text_token
        tokens: list[torch.Tensor] = []
        with lm.depformer.streaming(batch):
            for cb_index in range(lm.dep_q):
                logits = lm.forward_depformer(cb_index, prev[:, None, None], transformer_out)
                prev = self.sampler.sample_audio(logits, cb_index)
                tokens.append(prev)
        return torch.stack(tokens, dim=1)
